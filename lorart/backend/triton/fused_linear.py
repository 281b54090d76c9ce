"""Fused forward: base GEMM/GEMV (dense, 4-bit or 8-bit) + bias + LoRA in one launch.

    y[i] = x[i] Wᵀ + bias + c_s · (x[i] A_sᵀ) B_sᵀ      s = adapter_ids[i] (or 0)

One program owns a ``[BLOCK_M, BLOCK_N]`` tile of y and writes it once. The base
weight tile is dequantized in registers inside the K loop and never materialized.
At decode sizes the grid is too small for a GPU, so K is split over ``SPLIT_K``
programs that write fp32 partials; ``splitk_reduce_kernel`` (a second, tiny launch)
sums them in split order and writes y once (``configs.fused_forward_blocks`` decides).
LoRA modes (``LORA``, a tl.constexpr):

- 0: base only.
- 1: one adapter for every row (``lora_linear``): ``x·Aᵀ`` is accumulated by tl.dot in
  the same K loop as the base, then ``·Bᵀ`` is one more dot in the epilogue.
- 2: per-row adapters, BGMV style (decode): each row gathers its own rows of A and
  columns of B (ragged ranks, looped in blocks of ``BLOCK_R`` with masks; id -1 rows
  get the base only), while the base weight tile is read once for all rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..base import weight_args
from . import configs
from .launch import dot_dtype, dot_precision, weight_pointers
from .weights import weight_tile


@triton.jit
def fused_lora_linear_kernel(
    x_ptr, w_ptr, q_ptr, s_ptr, o_ptr, t_ptr, bias_ptr, y_ptr,
    a_ptr, b_ptr, ids_ptr, offs_ptr, lscale_ptr,
    M, N, K, R, MAX_RANK, GROUPS, K_PER_SPLIT,
    QUANT: tl.constexpr, SCHEME: tl.constexpr, GROUP: tl.constexpr, OFFSETS: tl.constexpr,
    HAS_BIAS: tl.constexpr, LORA: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # Split-K: this program covers K range [k_lo, k_hi). Every term of y is linear in x's
    # K slice (x·Aᵀ too), so partial base and partial LoRA sums add up exactly.
    k_lo = tl.program_id(2) * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rr = tl.arange(0, BLOCK_R)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    xa = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    rank0 = 0
    if LORA == 1:  # adapter 0 owns rank rows offs[0]=0 .. offs[1]
        rank0 = tl.load(offs_ptr + 1)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x = tl.load(x_ptr + rm[:, None] * K + kk[None, :], mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0).to(DOT)
        w = weight_tile(w_ptr, q_ptr, s_ptr, o_ptr, t_ptr, rn, k0, N, K, GROUPS,
                        BLOCK_K, QUANT, SCHEME, GROUP, OFFSETS)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(x, tl.trans(w.to(DOT)), acc, input_precision=PREC)
        if LORA == 1:
            at = tl.load(a_ptr + rr[None, :] * K + kk[:, None],
                         mask=(rr[None, :] < rank0) & k_ok[:, None], other=0.0)  # Aᵀ tile
            xa = tl.dot(x, at.to(DOT), xa, input_precision=PREC)
    if LORA == 1:
        bt = tl.load(b_ptr + rn[None, :] * R + rr[:, None],
                     mask=(rr[:, None] < rank0) & n_ok[None, :], other=0.0)  # Bᵀ tile
        acc += tl.load(lscale_ptr) * tl.dot(xa.to(DOT), bt.to(DOT), input_precision=PREC)
    if LORA == 2:
        sid = tl.load(ids_ptr + rm, mask=m_ok, other=-1)
        has = sid >= 0
        sid0 = tl.where(has, sid, 0)
        lo = tl.load(offs_ptr + sid0, mask=has, other=0)
        rank = tl.where(has, tl.load(offs_ptr + sid0 + 1, mask=has, other=0) - lo, 0)
        row_scale = tl.load(lscale_ptr + sid0, mask=has, other=0.0)
        # Ragged ranks: every row loops to the largest rank of the stack, masked to its own.
        for r0 in range(0, MAX_RANK, BLOCK_R):
            r_ok = (r0 + rr)[None, :] < rank[:, None]  # [BLOCK_M, BLOCK_R]
            xa_g = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
            for k0 in range(k_lo, k_hi, BLOCK_K):
                kk = k0 + rk
                k_ok = kk < K
                x = tl.load(x_ptr + rm[:, None] * K + kk[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                a3 = tl.load(a_ptr + (lo[:, None, None] + r0 + rr[None, :, None]) * K
                             + kk[None, None, :],
                             mask=r_ok[:, :, None] & k_ok[None, None, :], other=0.0)
                xa_g += tl.sum(x[:, None, :] * a3.to(tl.float32), axis=2)
            b3 = tl.load(b_ptr + rn[None, :, None] * R + lo[:, None, None] + r0
                         + rr[None, None, :],
                         mask=r_ok[:, None, :] & n_ok[None, :, None], other=0.0)
            acc += tl.sum(xa_g[:, None, :] * b3.to(tl.float32), axis=2) * row_scale[:, None]
    if HAS_BIAS:  # added once: by the first K split
        bias = tl.load(bias_ptr + rn, mask=rn < tl.where(tl.program_id(2) == 0, N, 0),
                       other=0.0)
        acc += bias.to(tl.float32)[None, :]
    if SPLIT_K == 1:
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & n_ok[None, :])
    else:  # fp32 partials [SPLIT_K, M, N], summed by splitk_reduce_kernel
        tl.store(y_ptr + tl.program_id(2) * M * N + rm[:, None] * N + rn[None, :], acc,
                 mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def splitk_reduce_kernel(partial_ptr, y_ptr, MN, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
    """``y[i] = Σ_s partial[s, i]`` over the flattened ``[M, N]``, in split order."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < MN
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(partial_ptr + s * MN + offs, mask=ok, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=ok)


def fused_forward(x: torch.Tensor, base, bias: torch.Tensor | None, lora,
                  adapter_ids: torch.Tensor | None, gather: bool) -> torch.Tensor:
    """``y [M, N]`` in x's dtype from one launch.

    Args:
        x: ``[M, K]`` contiguous, float32 / bfloat16 / float16.
        base: dense ``W [N, K]`` or a ``QuantizedWeight``.
        bias: ``[N]`` or ``None``.
        lora: ``LoRAArgs`` (a ``[R, K]``, b ``[N, R]``) or ``None`` for base only.
        adapter_ids: ``[M]`` int32 in ``-1..S-1`` when ``gather`` (BGMV), else ignored
            and every row uses adapter 0.
        gather: per-row adapters (mode 2) instead of one adapter for all rows (mode 1).
    """
    m, k = x.shape
    bias = None if bias is None else bias.contiguous()  # the op surface may pass a view
    wa = weight_args(base)
    n = wa.n
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y
    mode = 0 if lora is None else (2 if gather else 1)
    if mode == 2 and adapter_ids is None:
        raise ValueError("adapter_ids are required for the per-row (gather) LoRA mode")
    if lora is not None:
        offs, lscales = lora.device_meta()
        a, b, r_total, max_rank = lora.a, lora.b, lora.a.shape[0], lora.max_rank
    else:
        offs = lscales = a = b = x
        r_total, max_rank = 1, 0
    ids = adapter_ids if mode == 2 else x
    blocks = configs.fused_forward_blocks(configs.bucket_rows(m), n, k, wa.group_size,
                                          mode == 2, max_rank)
    block_r = configs.GATHER_RANK_BLOCK if mode == 2 else blocks.r
    if mode == 1 and max_rank > block_r:
        raise ValueError(f"rank {max_rank} exceeds the fused kernel's rank block {block_r}")
    split = blocks.split_k
    k_per_split = triton.cdiv(triton.cdiv(k, blocks.k), split) * blocks.k
    out = y if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, blocks.m), triton.cdiv(n, blocks.n), split)
    fused_lora_linear_kernel[grid](
        x, *weight_pointers(wa, x), bias if bias is not None else x, out,
        a, b, ids, offs, lscales,
        m, n, k, r_total, max_rank, wa.groups, k_per_split,
        QUANT=wa.quantized, SCHEME=wa.scheme, GROUP=max(wa.group_size, 1),
        OFFSETS=wa.offsets is not None, HAS_BIAS=bias is not None, LORA=mode, SPLIT_K=split,
        DOT=dot_dtype(x.dtype), PREC=dot_precision(x.dtype),
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k, BLOCK_R=block_r,
        num_warps=blocks.num_warps,
    )
    if split > 1:
        block = 1024
        splitk_reduce_kernel[(triton.cdiv(m * n, block),)](out, y, m * n, SPLIT_K=split,
                                                           BLOCK=block)
    return y
