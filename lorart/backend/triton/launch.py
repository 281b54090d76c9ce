"""What every Triton launcher shares: operand dtypes and weight arguments.

Kernels take plain pointers and sizes. This module turns a ``QuantizedWeight`` into
those arguments (adapter metadata comes from ``LoRAArgs.device_meta``, the batch's
segments from its ``AdapterBatch``), and chooses the ``tl.dot`` operand dtype per call:

- on a GPU, the input dtype itself (bf16 / fp16 tensor cores; fp32 with
  ``input_precision="ieee"`` so fp32 results are exact, not TF32);
- under ``TRITON_INTERPRET=1``, bf16 operands are upcast to fp32, because the
  interpreter multiplies bf16 bit patterns as integers (triton-lang/triton#11584).
"""

from __future__ import annotations

import os
import sys

import torch
import triton.language as tl

from ...quant import ALL_SCHEMES, SCHEMES_8BIT, code_table
from ..base import WeightArgs, segments_of

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def interpreting() -> bool:
    """Whether kernels run in Triton's CPU interpreter (read at call time, never at import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def kernels_interpreted() -> bool:
    """False if the kernels were already built for a GPU (TRITON_INTERPRET unset when they
    were first imported); triton fixes that choice when it decorates a kernel."""
    module = sys.modules.get("lorart.backend.triton.fused_linear")
    if module is None:
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(module.fused_lora_linear_kernel, InterpretedFunction)


def dot_dtype(dtype: torch.dtype):
    """The ``tl.dot`` operand dtype for inputs of ``dtype`` (see the module doc)."""
    if dtype == torch.bfloat16 and interpreting():
        return tl.float32
    return _TL_DTYPES[dtype]


def dot_precision(dtype: torch.dtype) -> str:
    """``"ieee"`` for fp32 operands (exact fp32 on a GPU); the default TF32 flag otherwise,
    where it does not apply (bf16/fp16 operands)."""
    return "ieee" if dot_dtype(dtype) == tl.float32 else "tf32"


def weight_pointers(w: WeightArgs, like: torch.Tensor) -> tuple:
    """The weight's pointers in kernel order: w, qweight, scales, offsets, table (unused
    ones point at ``like``; 8-bit codes need no table)."""
    if not w.quantized:
        return w.data, like, like, like, like
    scheme = ALL_SCHEMES[w.scheme]
    table = like if scheme in SCHEMES_8BIT else _code_table(scheme, w.data.device)
    return like, w.data, w.scales, w.scales if w.offsets is None else w.offsets, table


_TABLES: dict[tuple[str, str], torch.Tensor] = {}


def _code_table(scheme: str, device: torch.device) -> torch.Tensor:
    key = (scheme, str(device))
    if key not in _TABLES:
        _TABLES[key] = code_table(scheme, device).contiguous()
    return _TABLES[key]


def batch_segments(batch, num_adapters: int, m: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order [M] int64, seg_starts [S+2] int64)`` of the batch (``AdapterBatch.segments``,
    computed once per batch for every layer). Without a batch every row uses adapter 0
    (device fills only: no host-to-device copy)."""
    if batch is not None:
        return segments_of(batch, num_adapters)
    seg_starts = torch.full((num_adapters + 2,), m, dtype=torch.int64, device=device)
    seg_starts[:2] = 0
    return torch.arange(m, dtype=torch.int64, device=device), seg_starts
