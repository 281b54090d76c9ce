"""Roofline arithmetic: the bytes a LoRA linear layer must move and the FLOPs it must do.

Pure functions of sizes, so the numbers in a report can be checked by hand. For a layer
``W [N, K]`` on ``x [M, K]`` with the adapters a batch actually uses (adapter ``s`` of rank
``r_s`` serving ``m_s`` rows):

    bytes (forward)  = weight + Σ_used r_s·(K + N)·e_lora + M·K·e_x + M·N·e_x
    weight           = N·K/2 + (N·K/g)·e_scale·(2 if offsets else 1)     4-bit base
                     = N·K·e_w                                           dense base
    FLOPs (forward)  = 2·M·N·K + 2·(K + N)·Σ_s m_s·r_s

The backward of a frozen base reads the weight, dy, x and the used adapters once, and
writes dx and the adapters' gradients; its FLOPs are the base's ``dy·W`` (2·M·N·K) plus
four rank-r products per row (dy·B, (dy·B)·A, (dy·B)ᵀ·x, dyᵀ·(x·Aᵀ)): 4·(K + N)·Σ m_s·r_s.
These are the ideal counts (each operand touched once); a kernel that re-reads the
weight per tile of rows moves more, which is exactly what "% of roofline" exposes.
"""

from __future__ import annotations

from collections.abc import Sequence

DIRECTIONS = ("fwd", "bwd", "train")  # train = fwd + bwd, one training step of the layer


def q4_weight_bytes(n: int, k: int, group_size: int, scale_bytes: int = 2,
                    has_offsets: bool = True) -> int:
    """Bytes of a packed 4-bit ``[N, K]`` weight: codes ``N·K/2`` + scales (+ offsets)."""
    if k % group_size:
        raise ValueError(f"K={k} is not divisible by group_size={group_size}")
    per_group = scale_bytes * (2 if has_offsets else 1)
    return n * k // 2 + (n * k // group_size) * per_group


def dense_weight_bytes(n: int, k: int, elem_bytes: int) -> int:
    """Bytes of a dense ``[N, K]`` weight with ``elem_bytes`` per element."""
    return n * k * elem_bytes


def adapter_bytes(n: int, k: int, ranks_used: Sequence[int], elem_bytes: int) -> int:
    """Bytes of the used adapters' ``A_s [r_s, K]`` and ``B_s [N, r_s]``."""
    return sum(ranks_used) * (k + n) * elem_bytes


def layer_bytes(m: int, n: int, k: int, weight_bytes: int, ranks_used: Sequence[int],
                act_bytes: int, lora_bytes: int | None = None, direction: str = "fwd") -> int:
    """Bytes moved by one call (see the module doc).

    Args:
        m, n, k: rows of x, out_features, in_features.
        weight_bytes: from :func:`q4_weight_bytes` or :func:`dense_weight_bytes`.
        ranks_used: the rank of each adapter used by at least one row (each counted once).
        act_bytes: bytes per element of x, y, dy and dx.
        lora_bytes: bytes per element of A and B (default ``act_bytes``).
        direction: ``fwd``, ``bwd`` or ``train`` (fwd + bwd).
    """
    _check_direction(direction)
    lora_bytes = act_bytes if lora_bytes is None else lora_bytes
    adapters = adapter_bytes(n, k, ranks_used, lora_bytes)
    fwd = weight_bytes + adapters + m * k * act_bytes + m * n * act_bytes
    # read W, A, B, dy [M, N], x [M, K]; write dx [M, K], dA, dB (same size as A, B)
    bwd = weight_bytes + 2 * adapters + m * n * act_bytes + 2 * m * k * act_bytes
    return {"fwd": fwd, "bwd": bwd, "train": fwd + bwd}[direction]


def layer_flops(m: int, n: int, k: int, rows_and_ranks: Sequence[tuple[int, int]],
                direction: str = "fwd") -> int:
    """FLOPs of one call; ``rows_and_ranks`` = ``[(m_s, r_s), ...]`` per used adapter.

    Rows with no adapter (id -1) appear in ``m`` but in no pair.
    """
    _check_direction(direction)
    lora_row_ranks = sum(rows * rank for rows, rank in rows_and_ranks)
    if sum(rows for rows, _ in rows_and_ranks) > m:
        raise ValueError(f"rows_and_ranks covers more than M={m} rows: {rows_and_ranks}")
    fwd = 2 * m * n * k + 2 * (k + n) * lora_row_ranks
    bwd = 2 * m * n * k + 4 * (k + n) * lora_row_ranks
    return {"fwd": fwd, "bwd": bwd, "train": fwd + bwd}[direction]


def roofline_seconds(nbytes: float, flops: float, bandwidth: float, peak_flops: float) -> float:
    """The least time a call can take: ``max(bytes / bandwidth, FLOPs / peak)`` (B/s, FLOP/s)."""
    if bandwidth <= 0 or peak_flops <= 0:
        raise ValueError(f"bandwidth and peak_flops must be positive, got {bandwidth}, "
                         f"{peak_flops}")
    return max(nbytes / bandwidth, flops / peak_flops)


def _check_direction(direction: str) -> None:
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
