"""SGMV kernels over a batch's adapter segments (prefill, training, backward).

Rows are grouped by adapter with ``AdapterBatch.segments()``: ``order [M]`` (rows sorted
by adapter, -1 rows first) and ``seg_starts [S+2]`` (rows ``order[seg_starts[s+1] :
seg_starts[s+2]]`` use adapter ``s``). A program works on one adapter's rows only, so
tiles never mix adapters and every dot is a dense tensor-core tile; the -1 segment is
never visited. Ranks are ragged: the rank dim is looped in ``BLOCK_R`` blocks with masks,
and the caller's packed stack is read in place (no padding).

The three kernels are generic over strides, so one kernel serves forward and backward:

    shrink:   out[i, r]   = Σ_c inp[i, c] · V_s(r, c)            (V = A, or Bᵀ in backward)
    expand:   y[i, n]    += c_s · Σ_r t[i, r] · V_s(n, r)         (V = B, or Aᵀ in backward)
    seg_outer: out_s(r, c) = c_s · Σ_{i in s} left[i, r] · right[i, c]   (dA_s, dB_sᵀ)

with ``V_s(r, c)`` at ``v_ptr + (rank_offsets[s] + r)·stride_r + c·stride_c``.

Grids are ``(S, cdiv(M, BLOCK_M), ...)`` without a host sync for segment lengths:
programs past their segment's end run zero loop iterations and store nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .launch import dot_dtype, dot_precision


@triton.jit
def _segment(starts_ptr, offs_ptr, s):
    """Rows ``order[seg_lo:seg_hi]`` use adapter ``s``, whose rank rows are ``lo:lo+rank``
    (segment 0 holds the base-only rows, so adapter s is segment s + 1)."""
    seg_lo = tl.load(starts_ptr + s + 1)
    seg_hi = tl.load(starts_ptr + s + 2)
    lo = tl.load(offs_ptr + s)
    rank = tl.load(offs_ptr + s + 1) - lo
    return seg_lo, seg_hi, lo, rank


@triton.jit
def sgmv_shrink_kernel(
    inp_ptr, v_ptr, out_ptr, order_ptr, starts_ptr, offs_ptr,
    C, OUT_STRIDE, STRIDE_R, STRIDE_C,
    DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    s = tl.program_id(0)
    seg_lo, seg_hi, lo, rank = _segment(starts_ptr, offs_ptr, s)
    pos = seg_lo + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = pos < seg_hi
    rows = tl.load(order_ptr + pos, mask=m_ok, other=0)
    rr = tl.program_id(2) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < rank
    active = (seg_lo + tl.program_id(1) * BLOCK_M < seg_hi) & (tl.program_id(2) * BLOCK_R < rank)
    c_end = tl.where(active, C, 0)  # idle programs loop zero times
    rc = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_M, BLOCK_R], dtype=tl.float32)
    for c0 in range(0, c_end, BLOCK_C):
        cc = c0 + rc
        c_ok = cc < C
        x = tl.load(inp_ptr + rows[:, None] * C + cc[None, :],
                    mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        vt = tl.load(v_ptr + (lo + rr[None, :]) * STRIDE_R + cc[:, None] * STRIDE_C,
                     mask=r_ok[None, :] & c_ok[:, None], other=0.0)  # [BLOCK_C, BLOCK_R]
        acc = tl.dot(x.to(DOT), vt.to(DOT), acc, input_precision=PREC)
    tl.store(out_ptr + rows[:, None] * OUT_STRIDE + rr[None, :], acc,
             mask=m_ok[:, None] & r_ok[None, :])  # both all-False when idle


@triton.jit
def sgmv_expand_kernel(
    t_ptr, v_ptr, y_ptr, order_ptr, starts_ptr, offs_ptr, scales_ptr,
    N, T_STRIDE, STRIDE_N, STRIDE_R,
    DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    s = tl.program_id(0)
    seg_lo, seg_hi, lo, rank = _segment(starts_ptr, offs_ptr, s)
    pos = seg_lo + tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = pos < seg_hi
    rows = tl.load(order_ptr + pos, mask=m_ok, other=0)
    rn = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    active = seg_lo + tl.program_id(1) * BLOCK_M < seg_hi
    r_end = tl.where(active, rank, 0)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for r0 in range(0, r_end, BLOCK_R):
        r_ok = (r0 + rr) < rank
        t = tl.load(t_ptr + rows[:, None] * T_STRIDE + r0 + rr[None, :],
                    mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        vt = tl.load(v_ptr + rn[None, :] * STRIDE_N + (lo + r0 + rr[:, None]) * STRIDE_R,
                     mask=r_ok[:, None] & n_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_N]
        acc = tl.dot(t.to(DOT), vt.to(DOT), acc, input_precision=PREC)
    mask = m_ok[:, None] & n_ok[None, :]  # m_ok is all-False when idle
    y_ptrs = y_ptr + rows[:, None] * N + rn[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    y += tl.load(scales_ptr + s) * acc
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def sgmv_seg_outer_kernel(
    left_ptr, right_ptr, out_ptr, order_ptr, starts_ptr, offs_ptr, scales_ptr,
    C, LEFT_STRIDE, OUT_STRIDE_R, OUT_STRIDE_C,
    DOT: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    s = tl.program_id(0)
    seg_lo, seg_hi, lo, rank = _segment(starts_ptr, offs_ptr, s)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rr < rank
    rc = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = rc < C
    active = tl.program_id(1) * BLOCK_R < rank
    seg_end = tl.where(active, seg_hi, seg_lo)
    rm = tl.arange(0, BLOCK_M)
    acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    # One program reduces all of its adapter's rows: deterministic, no atomics.
    for m0 in range(seg_lo, seg_end, BLOCK_M):
        pos = m0 + rm
        m_ok = pos < seg_hi
        rows = tl.load(order_ptr + pos, mask=m_ok, other=0)
        lt = tl.load(left_ptr + rows[None, :] * LEFT_STRIDE + rr[:, None],
                     mask=r_ok[:, None] & m_ok[None, :], other=0.0)  # [BLOCK_R, BLOCK_M]
        rt = tl.load(right_ptr + rows[:, None] * C + rc[None, :],
                     mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        acc = tl.dot(lt.to(DOT), rt.to(DOT), acc, input_precision=PREC)
    acc = acc * tl.load(scales_ptr + s)
    tl.store(out_ptr + (lo + rr[:, None]) * OUT_STRIDE_R + rc[None, :] * OUT_STRIDE_C,
             acc.to(out_ptr.dtype.element_ty), mask=r_ok[:, None] & c_ok[None, :])


# ------------------------------------------------------------------------------ launchers
def shrink(inp: torch.Tensor, v: torch.Tensor, stride_r: int, stride_c: int,
           order: torch.Tensor, seg_starts: torch.Tensor, offs: torch.Tensor,
           num_adapters: int, max_rank: int, dtype: torch.dtype) -> torch.Tensor:
    """``out [M, max_rank]`` fp32: ``out[i, :r_s] = inp[i] · V_sᵀ`` for rows of adapter s.

    ``inp [M, C]`` contiguous; ``V_s(r, c)`` at ``v[(offs[s] + r)·stride_r + c·stride_c]``
    (``A``: strides ``(K, 1)``; ``Bᵀ`` of ``b [N, R]``: ``(1, R)``). Columns past a row's
    rank, and rows with id -1, stay 0.
    """
    m, c = inp.shape
    out = torch.zeros(m, max(max_rank, 1), dtype=torch.float32, device=inp.device)
    if m == 0 or max_rank == 0 or num_adapters == 0:
        return out
    blk = configs.sgmv_blocks(configs.bucket_rows(m), c, max_rank)
    grid = (num_adapters, triton.cdiv(m, blk.m), triton.cdiv(max_rank, blk.r))
    sgmv_shrink_kernel[grid](
        inp, v, out, order, seg_starts, offs, c, out.shape[1], stride_r, stride_c,
        DOT=dot_dtype(dtype), PREC=dot_precision(dtype),
        BLOCK_M=blk.m, BLOCK_R=blk.r, BLOCK_C=blk.k, num_warps=blk.num_warps)
    return out


def expand(y: torch.Tensor, t: torch.Tensor, v: torch.Tensor, stride_n: int, stride_r: int,
           order: torch.Tensor, seg_starts: torch.Tensor, offs: torch.Tensor,
           scales: torch.Tensor, num_adapters: int, dtype: torch.dtype) -> torch.Tensor:
    """In place: ``y[i] += c_s · t[i, :r_s] · V_sᵀ`` for the rows of each adapter s.

    ``y [M, N]`` contiguous (any float dtype), ``t [M, T]`` fp32 from :func:`shrink`;
    ``V_s(n, r)`` at ``v[n·stride_n + (offs[s] + r)·stride_r]`` (``B``: ``(R, 1)``;
    ``Aᵀ`` of ``a [R, K]``: ``(1, K)``). Returns ``y``.
    """
    m, n = y.shape
    if m == 0 or n == 0 or num_adapters == 0:
        return y
    blk = configs.sgmv_blocks(configs.bucket_rows(m), t.shape[1], n)
    grid = (num_adapters, triton.cdiv(m, blk.m), triton.cdiv(n, blk.n))
    sgmv_expand_kernel[grid](
        t, v, y, order, seg_starts, offs, scales, n, t.shape[1], stride_n, stride_r,
        DOT=dot_dtype(dtype), PREC=dot_precision(dtype),
        BLOCK_M=blk.m, BLOCK_N=blk.n, BLOCK_R=blk.r, num_warps=blk.num_warps)
    return y


def seg_outer(out: torch.Tensor, left: torch.Tensor, right: torch.Tensor, out_stride_r: int,
              out_stride_c: int, order: torch.Tensor, seg_starts: torch.Tensor,
              offs: torch.Tensor, scales: torch.Tensor, num_adapters: int, max_rank: int,
              dtype: torch.dtype) -> torch.Tensor:
    """In place: ``out_s(r, c) = c_s · Σ_{i in s} left[i, r] · right[i, c]`` per adapter s.

    ``left [M, L]`` fp32 (from :func:`shrink`), ``right [M, C]`` contiguous; ``out_s(r, c)``
    at ``out[(offs[s] + r)·out_stride_r + c·out_stride_c]`` (``dA``: ``(K, 1)``; ``dB``
    stored transposed: ``(1, R)``). Adapters with no rows get 0. Returns ``out``.
    """
    c = right.shape[1]
    if num_adapters == 0 or max_rank == 0 or c == 0:
        return out
    blk = configs.sgmv_blocks(configs.bucket_rows(right.shape[0]), right.shape[0], c)
    grid = (num_adapters, triton.cdiv(max_rank, blk.r), triton.cdiv(c, blk.n))
    sgmv_seg_outer_kernel[grid](
        left, right, out, order, seg_starts, offs, scales, c, left.shape[1],
        out_stride_r, out_stride_c, DOT=dot_dtype(dtype), PREC=dot_precision(dtype),
        BLOCK_M=blk.m, BLOCK_R=blk.r, BLOCK_C=blk.n, num_warps=blk.num_warps)
    return out
