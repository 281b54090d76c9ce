"""The readable ground truth for every lorart op (pure torch, float32/float64 inside).

Every backend is tested against these functions, and they are the fallback where no
compiled backend fits. Shapes: ``x [M, K]``, base ``W [N, K]`` (dense or a
``QuantizedWeight`` of either layout, 4-bit or 8-bit, read through its ``dequantize``),
packed adapters ``a [R, K]``, ``b [N, R]`` with
``rank_offsets [S + 1]`` and ``scales [S]`` (see ``lorart.adapters``), per-row
``adapter_ids [M]`` in ``-1..S-1`` (``-1`` = base only).

    y[i] = x[i] Wᵀ + bias + scales[s] · (x[i] A_sᵀ) B_sᵀ      with s = adapter_ids[i]
"""

from __future__ import annotations

import torch

from .quant import QuantizedWeight


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def base_weight(base: torch.Tensor | QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """The dense base weight ``[N, K]`` in ``dtype``."""
    if isinstance(base, QuantizedWeight):
        return base.dequantize(torch.float32).to(dtype)
    return base.to(dtype)


def _adapter_rows(adapter_ids: torch.Tensor | None, m: int, s: int, device) -> torch.Tensor:
    """Boolean mask [M] of the rows that use adapter ``s``."""
    if adapter_ids is None:  # single-adapter form: every row uses adapter 0
        return torch.full((m,), s == 0, dtype=torch.bool, device=device)
    return adapter_ids.to(device) == s


def lora_forward(
    x: torch.Tensor,
    base: torch.Tensor | QuantizedWeight,
    bias: torch.Tensor | None,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    rank_offsets: list[int],
    scales: list[float],
    adapter_ids: torch.Tensor | None,
) -> torch.Tensor:
    """``y [M, N]`` in x's dtype; ``adapter_ids=None`` means every row uses adapter 0."""
    ct = _compute_dtype(x)
    xc = x.to(ct)
    y = xc @ base_weight(base, ct).T
    if bias is not None:
        y = y + bias.to(ct)
    if a is not None:
        # One pass per adapter present: readable, not fast (the kernels are fast).
        for s, scale in enumerate(scales):
            rows = _adapter_rows(adapter_ids, x.shape[0], s, x.device)
            lo, hi = rank_offsets[s], rank_offsets[s + 1]
            if hi == lo or not bool(rows.any()):
                continue
            xa = xc[rows] @ a[lo:hi].to(ct).T
            y[rows] += scale * (xa @ b[:, lo:hi].to(ct).T)
    return y.to(x.dtype)


def lora_backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    base: torch.Tensor | QuantizedWeight,
    a: torch.Tensor | None,
    b: torch.Tensor | None,
    rank_offsets: list[int],
    scales: list[float],
    adapter_ids: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Gradients ``(dx [M, K], da [R, K], db [N, R])`` for a frozen base.

        dx  = dy W + Σ_s scale_s (dy_s B_s) A_s
        dA_s = scale_s (dy_s B_s)ᵀ x_s
        dB_s = scale_s dy_sᵀ (x_s A_sᵀ)
    where ``_s`` selects the rows using adapter ``s``; rows with id -1 feed no adapter.
    Rank rows beyond ``rank_offsets[-1]`` (spare capacity) get zero gradient.
    """
    ct = _compute_dtype(x)
    dyc, xc = dy.to(ct), x.to(ct)
    dx = dyc @ base_weight(base, ct)
    da = db = None
    if a is not None:
        da = torch.zeros(a.shape, dtype=ct, device=x.device)
        db = torch.zeros(b.shape, dtype=ct, device=x.device)
        for s, scale in enumerate(scales):
            rows = _adapter_rows(adapter_ids, x.shape[0], s, x.device)
            lo, hi = rank_offsets[s], rank_offsets[s + 1]
            if hi == lo or not bool(rows.any()):
                continue
            a_s, b_s = a[lo:hi].to(ct), b[:, lo:hi].to(ct)
            dy_b = dyc[rows] @ b_s  # [M_s, r]
            dx[rows] += scale * (dy_b @ a_s)
            da[lo:hi] = scale * (dy_b.T @ xc[rows])
            db[:, lo:hi] = scale * (dyc[rows].T @ (xc[rows] @ a_s.T))
        da, db = da.to(a.dtype), db.to(b.dtype)
    return dx.to(x.dtype), da, db
