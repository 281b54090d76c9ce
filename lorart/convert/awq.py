"""AWQ GEMM (AutoAWQ ``WQLinear_GEMM``) -> ``QuantizedWeight``.

AWQ stores ``W [N, K]`` packed along N, eight columns an int32, in the interleaved
order ``[0, 2, 4, 6, 1, 3, 5, 7]`` (nibble i, bits 4i..4i+3, holds column
``8j + order[i]``):

    qweight  int32 [K, N/8]
    qzeros   int32 [K/g, N/8]   same packing
    scales   fp16  [K/g, N]

    W[n, k] = scales[G, n] · (q − zero),  G = k // g   (no off-by-one in zeros)
"""

from __future__ import annotations

import torch

from ..quant import QuantizedWeight
from .gptq import _check, from_codes_and_zeros, unpack_int32

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def from_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
             group_size: int) -> QuantizedWeight:
    """Convert AWQ GEMM tensors (see module doc) to a ``QuantizedWeight [N, K]``."""
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be int32 [K, N/8], got shape {tuple(qweight.shape)}")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    if k % group_size:
        raise ValueError(f"K={k} is not divisible by group_size={group_size}")
    groups = k // group_size
    _check("qweight", qweight, torch.int32, (k, n // 8))
    _check("qzeros", qzeros, torch.int32, (groups, n // 8))
    _check("scales", scales, torch.float16, (groups, n))
    codes = unpack_int32(qweight, 1, AWQ_ORDER).T  # [N, K]
    zeros = unpack_int32(qzeros, 1, AWQ_ORDER).T  # [N, K/g]
    return from_codes_and_zeros(codes, zeros, scales.T, group_size)
