"""In-register loading of a base-weight tile, dense or 4-bit (shared by forward and dX).

The packed layout is ``lorart.quant``'s: byte ``k // 2`` of row ``n`` holds the code of
``k`` in its low nibble when ``k`` is even, high nibble when odd; one scale (and, for
``asym``, one offset) per row per group of ``GROUP`` values along K. Callers keep a tile
inside one group (their K block divides ``GROUP``), so the scale is one load per row.

    asym:  W = scale · q + offset        sym:  W = scale · (q − 8)
    nf4:   W = scale · NF4[q]            (16-entry table lookup)
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def weight_tile(w_ptr, q_ptr, s_ptr, o_ptr, t_ptr, n2, k2, n_ok, mask, K, GROUPS, group_idx,
                QUANT: tl.constexpr, SCHEME: tl.constexpr):
    """W[n2, k2] as fp32 (quantized) or the weight's dtype (dense); 0 where ``mask`` is off.

    ``n2`` and ``k2`` are broadcastable index tensors (either orientation); ``n_ok`` masks
    rows in ``n2``'s shape; ``group_idx`` is the (scalar) group of every k in the tile.
    """
    if QUANT:
        byte = tl.load(q_ptr + n2 * (K // 2) + k2 // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((k2 & 1) * 4)) & 15
        scale = tl.load(s_ptr + n2 * GROUPS + group_idx, mask=n_ok, other=0.0).to(tl.float32)
        if SCHEME == 0:
            offset = tl.load(o_ptr + n2 * GROUPS + group_idx, mask=n_ok, other=0.0)
            value = code.to(tl.float32) * scale + offset.to(tl.float32)
        elif SCHEME == 1:
            value = (code - 8).to(tl.float32) * scale
        else:
            value = tl.load(t_ptr + code) * scale
        value = tl.where(mask, value, 0.0)
    else:
        value = tl.load(w_ptr + n2 * K + k2, mask=mask, other=0.0)
    return value
