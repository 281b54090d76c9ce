"""Backward with a frozen base (dense, 4-bit or 8-bit), multi-adapter aware.

    dX   = dY·W + Σ_s c_s (dY_s B_s) A_s      W dequantized in registers, never materialized
    dA_s = c_s (dY_s B_s)ᵀ X_s
    dB_s = c_s dY_sᵀ (X_s A_sᵀ)

``_s`` is the rows of adapter s (from the batch's segments); rows with id -1 feed no
adapter, and rank rows past ``rank_offsets[-1]`` (spare capacity) get zero gradient.
The LoRA terms reuse the SGMV kernels of ``sgmv.py`` with transposed strides:
``dY·B`` is a shrink by ``Bᵀ``, ``+(dY B)·A`` an expand by ``Aᵀ``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..base import weight_args
from . import configs, sgmv
from .launch import batch_segments, dot_dtype, dot_precision, weight_pointers
from .weights import weight_tile


@triton.jit
def dx_base_kernel(
    dy_ptr, w_ptr, q_ptr, s_ptr, o_ptr, t_ptr, dx_ptr,
    M, N, K, GROUPS,
    QUANT: tl.constexpr, SCHEME: tl.constexpr, GROUP: tl.constexpr, OFFSETS: tl.constexpr,
    DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dx [M, K] fp32 = dy [M, N] · W [N, K]`` (K blocks: ``configs.dx_blocks``)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    m_ok = rm < M
    k_ok = rk < K
    acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        dy = tl.load(dy_ptr + rm[:, None] * N + rn[None, :], mask=m_ok[:, None] & n_ok[None, :],
                     other=0.0)
        w = weight_tile(w_ptr, q_ptr, s_ptr, o_ptr, t_ptr, rn, pid_k * BLOCK_K, N, K, GROUPS,
                        BLOCK_K, QUANT, SCHEME, GROUP, OFFSETS)  # [BLOCK_N, BLOCK_K]
        acc = tl.dot(dy.to(DOT), w.to(DOT), acc, input_precision=PREC)
    tl.store(dx_ptr + rm[:, None] * K + rk[None, :], acc, mask=m_ok[:, None] & k_ok[None, :])


def dx_base(dy: torch.Tensor, base) -> torch.Tensor:
    """``dX [M, K]`` fp32 ``= dY [M, N] · W`` for a dense or quantized base."""
    m, n = dy.shape
    wa = weight_args(base)
    k = wa.k
    dx = torch.empty(m, k, dtype=torch.float32, device=dy.device)
    if m == 0 or k == 0:
        return dx
    if n == 0:
        return dx.zero_()
    blk = configs.dx_blocks(configs.bucket_rows(m), n, k, wa.group_size)
    grid = (triton.cdiv(m, blk.m), triton.cdiv(k, blk.k))
    dx_base_kernel[grid](
        dy, *weight_pointers(wa, dy), dx, m, n, k, wa.groups,
        QUANT=wa.quantized, SCHEME=wa.scheme, GROUP=max(wa.group_size, 1),
        OFFSETS=wa.offsets is not None, DOT=dot_dtype(dy.dtype), PREC=dot_precision(dy.dtype),
        BLOCK_M=blk.m, BLOCK_N=blk.n, BLOCK_K=blk.k, num_warps=blk.num_warps)
    return dx


def lora_linear_backward(dy: torch.Tensor, x: torch.Tensor, base, lora, batch,
                         need_dx: bool, need_dlora: bool):
    """``(dx [M, K], da [R, K], db [N, R])`` in x's dtype; ``None`` where not needed.

    ``batch``: the ``AdapterBatch`` (its cached segments are used), or ``None``: every row
    uses adapter 0.
    """
    m, k = x.shape
    dx32 = dx_base(dy, base) if need_dx else None
    da = db = None
    if lora is not None and (need_dx or need_dlora) and m > 0:
        a, b = lora.a, lora.b
        r_total, s_count, max_rank = a.shape[0], lora.num_adapters, lora.max_rank
        offs, scales = lora.device_meta()
        order, seg_starts = batch_segments(batch, s_count, m, x.device)
        # dY·B_s: a shrink by Bᵀ (V(r, n) = b[n, lo + r]).
        dyb = sgmv.shrink(dy, b, 1, r_total, order, seg_starts, offs, s_count, max_rank,
                          x.dtype)
        if need_dx:  # dX += c_s (dY B_s) A_s: an expand by Aᵀ (V(k, r) = a[lo + r, k]).
            sgmv.expand(dx32, dyb, a, 1, k, order, seg_starts, offs, scales, s_count,
                        x.dtype)
        if need_dlora:
            xa = sgmv.shrink(x, a, k, 1, order, seg_starts, offs, s_count, max_rank, x.dtype)
            da = torch.zeros_like(a)
            sgmv.seg_outer(da, dyb, x, k, 1, order, seg_starts, offs, scales, s_count,
                           max_rank, x.dtype)
            db = torch.zeros_like(b)  # dB_sᵀ(r, n) stored at db[n, lo + r]
            sgmv.seg_outer(db, xa, dy, 1, r_total, order, seg_starts, offs, scales, s_count,
                           max_rank, x.dtype)
    elif lora is not None and need_dlora:
        da, db = torch.zeros_like(lora.a), torch.zeros_like(lora.b)
    dx = dx32.to(x.dtype) if dx32 is not None else None
    return dx, da, db
