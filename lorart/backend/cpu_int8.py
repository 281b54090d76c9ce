"""The ``cpu`` backend's 8-bit path: C++ kernels for an ``int8`` ``QuantizedWeight``.

Reached through the cpu backend's one op chain (``lorart.backend.cpu``):
``CpuBackend.forward`` → ``torch.ops.lorart.cpu_lora_forward`` with scheme 3
(``SCHEME_IDS["int8"]``; the int8 codes ``[N, K]`` as its weight) → :func:`forward` here →
``lorart._C.cpu_int8_forward`` (pointers, sizes; the GIL is released) → the 8-bit kernel
table of the instruction set in use (``csrc/cpu/int8_impl.h``).

    y[i] = x[i] Wᵀ + bias + c_s · (x[i] A_sᵀ) B_sᵀ      W[n, k] = scale · q (+ offset)

x/A/B/bias float32 or bfloat16 (fp32 accumulation, output in x's dtype); scales fp16 or
fp32; offsets optional. The backward (a frozen base) dequantizes W to x's dtype in C++
(:func:`int8_dequantize`) and runs the cpu backend's dense backward: training through an
8-bit base needs a transient dense copy of one layer's W, never the whole model's.
"""

from __future__ import annotations

import torch

from .. import _C
from ..quant import QuantizedWeight
from .base import buffer

_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1}
_SCALE_DTYPE_CODE = {torch.float32: 0, torch.float16: 2}

# Rows up to which the forward runs the decode GEMV (W dequantized on the fly, each code
# read once for up to 4 rows of x); above it, each 32-row block of W is dequantized once
# into a per-thread fp32 buffer and reused by every row of x. Measured 2026-12-02 with
# `OMP_NUM_THREADS=1 python benchmarks/bench_int8.py` (AVX-512, machine shared, load ~11
# on 2 cores, so +-50%), median ms, 2048x2048 g32 fp32:
#   rows        1      2      4      8      16     64
#   decode    0.26   0.31   0.50   1.16   8.30   27.9
#   many      0.49   0.52   0.61   1.14   1.76   21.7
#   torch     0.84   1.99   1.75   6.25  10.9    27.3   (F.linear on the dense fp32 W)
INT8_DECODE_MAX_ROWS = 4


def _weight_args(codes, scales, offsets, group_size) -> list:
    """``[n, k, codes, scales, offsets, scale_dtype, group_size]`` for ``_C``."""
    return [codes.shape[0], codes.shape[1], buffer(codes), buffer(scales), buffer(offsets),
            _SCALE_DTYPE_CODE[scales.dtype], group_size]


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


def forward(x, codes, scales, offsets, group_size, bias, a, b, rank_offsets, lora_scales,
            adapter_ids, decode_max_rows) -> torch.Tensor:
    """``y [M, N]`` (x's dtype) = ``x [M, K] Wᵀ + bias + LoRA`` for ``codes [N, K]`` int8 and
    ``scales``/``offsets [N, K/g]``; ``a [R, K]``, ``b [N, R]``; ids ``[M]`` or None (the
    body of ``lorart::cpu_lora_forward`` for scheme 3)."""
    x = x.contiguous()
    m, n = x.shape[0], codes.shape[0]
    y = torch.empty((m, n), dtype=x.dtype)
    if m == 0 or n == 0:
        return y
    codes, scales, offsets = codes.contiguous(), scales.contiguous(), _contig(offsets)
    bias, a, b = _contig(bias), _contig(a), _contig(b)
    ids = None if adapter_ids is None else adapter_ids.to(torch.int32).contiguous()
    _C.cpu_int8_forward(m, _DTYPE_CODE[x.dtype], buffer(x), x.shape[1],
                        *_weight_args(codes, scales, offsets, group_size),
                        buffer(bias), buffer(a), buffer(b), 0 if b is None else b.shape[1],
                        rank_offsets, lora_scales, buffer(ids), buffer(y), n, decode_max_rows)
    return y


def int8_dequantize(base: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``W [N, K]`` in ``dtype`` (float32 or bfloat16), dequantized in C++."""
    codes, scales, offsets = base.qweight.contiguous(), base.scales.contiguous(), _contig(
        base.offsets)
    n, k = codes.shape
    out = torch.empty((n, k), dtype=dtype)
    _C.cpu_int8_dequantize(*_weight_args(codes, scales, offsets, base.group_size), 0, n,
                           buffer(out), _DTYPE_CODE[dtype])
    return out
