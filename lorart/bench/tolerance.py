"""The one tolerance table (tests, GPU check, benchmarks): a kernel's max error against the
fp32/fp64 reference as a fraction of max |expected|. fp32 accumulation order differs between
kernels (~1e-6 at K=4096); bf16 and fp16 carry one rounding of 2^-8 and 2^-11 plus the
inputs'."""

from __future__ import annotations

import torch

TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def tolerance(dtype: torch.dtype | str) -> float:
    """``TOLERANCE`` for a dtype given as ``torch.bfloat16`` or ``"bfloat16"``."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."))
    return TOLERANCE[dtype]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``max |actual - expected| / max |expected|`` in float64 (0-safe)."""
    e = expected.double()
    return float((actual.double() - e).abs().max() / e.abs().max().clamp_min(1e-30))
