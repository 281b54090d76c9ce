"""In-register loading of a base-weight tile, dense, 4-bit or 8-bit (shared by forward and dX).

The packed layouts are ``lorart.quant``'s. 4-bit: byte ``k // 2`` of row ``n`` holds the
code of ``k`` in its low nibble when ``k`` is even, high nibble when odd. 8-bit (``int8``):
one signed code a byte, ``[N, K]``. One scale (and, with ``OFFSETS``, one offset) per
row per group of ``GROUP`` values along K:

    asym:  W = scale · q + offset        sym:   W = scale · (q − 8)
    nf4:   W = scale · NF4[q]            int8:  W = scale · q (+ offset when OFFSETS)

A tile normally lies inside one group (the caller's K block divides ``GROUP``), so the
scale is one load per row; a K block wider than the group (8-bit group 16: tl.dot's
operands want K blocks of 32, see ``configs.quant_block_k``) loads one per column.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Scheme ids (lorart.backend.base.SCHEME_IDS; lorart::Scheme in csrc/common/quant_math.h).
ASYM = tl.constexpr(0)
SYM = tl.constexpr(1)
NF4 = tl.constexpr(2)
INT8 = tl.constexpr(3)


@triton.jit
def _group_param(p_ptr, rn, n_ok, k0, GROUPS, GROUP: tl.constexpr, BLOCK_K: tl.constexpr):
    """Scales (or offsets) of the tile as fp32: ``[BLOCK_N, 1]`` when the K block lies in
    one group, else ``[BLOCK_N, BLOCK_K]`` (a group per column). Masked rows read 0."""
    if BLOCK_K > GROUP:  # K may end inside the block (a multiple of GROUP, not of BLOCK_K)
        group = (k0 + tl.arange(0, BLOCK_K)) // GROUP
        value = tl.load(p_ptr + rn[:, None] * GROUPS + group[None, :],
                        mask=n_ok[:, None] & (group < GROUPS)[None, :], other=0.0)
    else:
        value = tl.load(p_ptr + rn * GROUPS + k0 // GROUP, mask=n_ok, other=0.0)[:, None]
    return value.to(tl.float32)


@triton.jit
def weight_tile(w_ptr, q_ptr, s_ptr, o_ptr, t_ptr, rn, k0, N, K, GROUPS,
                BLOCK_K: tl.constexpr, QUANT: tl.constexpr, SCHEME: tl.constexpr,
                GROUP: tl.constexpr, OFFSETS: tl.constexpr):
    """``W[rn, k0 : k0 + BLOCK_K]`` as a ``[BLOCK_N, BLOCK_K]`` tile; rows ``>= N`` are 0.

    Quantized: fp32 values; K is a multiple of the group, so a K block inside one group
    needs row masks only (masked rows load scale 0 and offset 0: their values are exactly
    0); an 8-bit block spanning groups masks columns past K too. 4-bit groups are >= 32,
    so 4-bit tiles always lie inside one group.
    4-bit bytes are loaded as one ``[BLOCK_N, BLOCK_K / 2]`` tile, contiguous along K
    (vectorized loads, each byte read once), and their two nibbles interleaved back into
    k order; 8-bit codes as one ``[BLOCK_N, BLOCK_K]`` tile of int8.
    Dense: the weight's own dtype, rows and columns masked (K may be odd).
    """
    n_ok = rn < N
    if QUANT:
        scale = _group_param(s_ptr, rn, n_ok, k0, GROUPS, GROUP, BLOCK_K)
        if SCHEME == INT8:
            rk = k0 + tl.arange(0, BLOCK_K)
            mask = n_ok[:, None]
            if BLOCK_K > GROUP:  # see _group_param
                mask = mask & (rk < K)[None, :]
            code = tl.load(q_ptr + rn[:, None] * K + rk[None, :], mask=mask, other=0)
            value = code.to(tl.float32) * scale
        else:
            rj = k0 // 2 + tl.arange(0, BLOCK_K // 2)
            byte = tl.load(q_ptr + rn[:, None] * (K // 2) + rj[None, :], mask=n_ok[:, None],
                           other=0).to(tl.int32)
            code = tl.interleave(byte & 15, byte >> 4)  # low nibble = even k
            if SCHEME == ASYM:
                value = code.to(tl.float32) * scale
            elif SCHEME == SYM:
                value = (code - 8).to(tl.float32) * scale
            else:
                # The 16-entry table is gathered from registers/shared memory (tl.gather),
                # not by a global load per element, which Triton's pipeliner would stage
                # through ~70 KB of shared memory (seen when compiling for sm_90).
                table = tl.load(t_ptr + tl.arange(0, 16))
                flat = tl.gather(table, tl.reshape(code, [code.shape[0] * code.shape[1]]),
                                 axis=0)
                value = tl.reshape(flat, [code.shape[0], code.shape[1]]) * scale
        if OFFSETS:  # asym always, int8 optionally (GGUF Q5_1 / Q5_K mins)
            value = value + _group_param(o_ptr, rn, n_ok, k0, GROUPS, GROUP, BLOCK_K)
    else:
        rk = k0 + tl.arange(0, BLOCK_K)
        value = tl.load(w_ptr + rn[:, None] * K + rk[None, :],
                        mask=n_ok[:, None] & (rk < K)[None, :], other=0.0)
    return value
