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
def weight_tile(w_ptr, q_ptr, s_ptr, o_ptr, t_ptr, rn, k0, N, K, GROUPS, group_idx,
                BLOCK_K: tl.constexpr, QUANT: tl.constexpr, SCHEME: tl.constexpr):
    """``W[rn, k0 : k0 + BLOCK_K]`` as a ``[BLOCK_N, BLOCK_K]`` tile; rows ``>= N`` are 0.

    Quantized: fp32 values; the caller's K block lies inside one group (``group_idx``),
    and K is a multiple of the group, so only rows need masks. The packed bytes are
    loaded as one ``[BLOCK_N, BLOCK_K / 2]`` tile, contiguous along K (vectorized loads,
    each byte read once), and their two nibbles interleaved back into k order.
    Dense: the weight's own dtype, rows and columns masked (K may be odd).
    """
    n_ok = rn < N
    if QUANT:
        rj = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        byte = tl.load(q_ptr + rn[:, None] * (K // 2) + rj[None, :], mask=n_ok[:, None],
                       other=0).to(tl.int32)
        code = tl.interleave(byte & 15, byte >> 4)  # low nibble = even k
        # Masked rows load scale 0 (and offset 0), so their values are exactly 0.
        scale = tl.load(s_ptr + rn * GROUPS + group_idx, mask=n_ok, other=0.0).to(tl.float32)
        if SCHEME == 0:
            offset = tl.load(o_ptr + rn * GROUPS + group_idx, mask=n_ok, other=0.0)
            value = code.to(tl.float32) * scale[:, None] + offset.to(tl.float32)[:, None]
        elif SCHEME == 1:
            value = (code - 8).to(tl.float32) * scale[:, None]
        else:
            # The 16-entry table is gathered from registers/shared memory (tl.gather), not
            # by a global load per element, which Triton's pipeliner would stage through
            # ~70 KB of shared memory (seen when compiling for sm_90).
            table = tl.load(t_ptr + tl.arange(0, 16))
            flat = tl.gather(table, tl.reshape(code, [code.shape[0] * code.shape[1]]), axis=0)
            value = tl.reshape(flat, [code.shape[0], code.shape[1]]) * scale[:, None]
    else:
        rk = k0 + tl.arange(0, BLOCK_K)
        value = tl.load(w_ptr + rn[:, None] * K + rk[None, :],
                        mask=n_ok[:, None] & (rk < K)[None, :], other=0.0)
    return value
