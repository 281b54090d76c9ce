"""GPTQ (AutoGPTQ / GPTQModel / transformers checkpoints) -> ``QuantizedWeight``.

GPTQ stores a linear layer ``W [N, K]`` as (``g`` = group size, no act-order):

    qweight  int32 [K/8, N]     qweight[i, n] bits 4j..4j+3 = code of W[n, 8i + j]
    qzeros   int32 [K/g, N/8]   qzeros[G, j] bits 4t..4t+3 = zero of column 8j + t
    scales   fp16  [K/g, N]
    g_idx    int32 [K] (optional; must be k // g: act-order is not supported)

    W[n, k] = scales[G, n] · (q − zero),  G = k // g

The common "v1" checkpoint format stores ``zero − 1`` (``zero_offset=1``, default).
Symmetric checkpoints (every zero = 8) become scheme ``sym`` with the fp16 scales;
others become ``asym`` with ``offset = −zero · scale`` in float32 (exact: an fp16
scale times a 4-bit integer fits float32's mantissa).
"""

from __future__ import annotations

import torch

from ..quant import QuantizedWeight, pack_codes


def unpack_int32(packed: torch.Tensor, dim: int, order: list[int] | None = None) -> torch.Tensor:
    """Split each int32 into 8 nibbles (bits 4i..4i+3 -> position ``order[i]``) along ``dim``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nib = (packed.unsqueeze(-1) >> shifts) & 15  # [..., 8], nibble i at index i
    if order is not None:
        inv = [order.index(c) for c in range(8)]  # position c holds nibble inv[c]
        nib = nib[..., inv]
    nib = nib.movedim(-1, dim + 1) if dim != packed.dim() - 1 else nib
    shape = list(packed.shape)
    shape[dim] *= 8
    return nib.reshape(shape).to(torch.int64)


def _check(name: str, t: torch.Tensor, dtype, shape) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(shape):
        got = (getattr(t, "dtype", type(t).__name__), tuple(getattr(t, "shape", ())))
        raise ValueError(f"{name} must be {dtype} of shape {list(shape)}, got {got}")


def from_codes_and_zeros(codes: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                         group_size: int) -> QuantizedWeight:
    """``W[n, k] = scales[n, G] · (codes[n, k] − zeros[n, G])`` -> ``QuantizedWeight``."""
    qweight = pack_codes(codes).contiguous()
    if bool((zeros == 8).all()):
        return QuantizedWeight(qweight, scales.to(torch.float16).contiguous(), None,
                               group_size, "sym")
    s32 = scales.float()
    return QuantizedWeight(qweight, s32.contiguous(), (-zeros.float() * s32).contiguous(),
                           group_size, "asym")


def from_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              group_size: int, g_idx: torch.Tensor | None = None, zero_offset: int = 1,
              ) -> QuantizedWeight:
    """Convert GPTQ tensors (see module doc) to a ``QuantizedWeight [N, K]``."""
    if qweight.dim() != 2:
        raise ValueError(f"qweight must be int32 [K/8, N], got shape {tuple(qweight.shape)}")
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    if k % group_size:
        raise ValueError(f"K={k} is not divisible by group_size={group_size}")
    groups = k // group_size
    _check("qweight", qweight, torch.int32, (k // 8, n))
    _check("qzeros", qzeros, torch.int32, (groups, n // 8))
    _check("scales", scales, torch.float16, (groups, n))
    if g_idx is not None:
        expected = torch.arange(k, device=g_idx.device) // group_size
        if not torch.equal(g_idx.to(torch.int64), expected):
            raise ValueError("g_idx is not k // group_size: act-order (desc_act) GPTQ "
                             "checkpoints are not supported")
    codes = unpack_int32(qweight, 0).T  # [N, K]
    zeros = (unpack_int32(qzeros, 1) + zero_offset).T  # [N, K/g]
    return from_codes_and_zeros(codes, zeros, scales.T, group_size)
