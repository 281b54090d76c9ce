"""Which slice of a weight or an adapter each rank holds (Megatron + S-LoRA layout).

A linear layer ``W [N, K]`` (out, in) is split over ``P`` ranks one of two ways:

    column  (q, k, v, gate, up)   rank p holds rows    p·N/P : (p+1)·N/P   of W (and bias)
    row     (o, down)             rank p holds columns p·K/P : (p+1)·K/P   of W

Adapters (PEFT shapes ``A [r, K]``, ``B [N, r]``), S-LoRA's fully sharded layout:

    column  A rows    p·r/P : (p+1)·r/P   (split by rank)     B rows p·N/P : (p+1)·N/P
    row     A columns p·K/P : (p+1)·K/P   (split by input)    B rows p·N/P : (p+1)·N/P

A quantized weight splits the same way on its packed tensors: a column split takes whole
rows (codes, scales, offsets), a row split takes whole groups along K, so it needs
``K/P`` to be a multiple of ``group_size`` (else :func:`check_layer` raises).
A column split needs ``r`` divisible by ``P``; any other rank is zero-padded first
(:func:`padded_rank`, :func:`pad_adapter`): the extra rows of A and columns of B add
nothing to the output, and their gradients are zero, so training leaves them zero.
Every function here takes ``(start, stop)`` bounds from :func:`bounds`, so the same slices
serve tensors in memory and ``safe_open(...).get_slice`` reads from an adapter file.
"""

from __future__ import annotations

import torch

from ..quant import QuantizedWeight

COLUMN, ROW = "column", "row"
# Megatron layout of a Llama decoder layer: path suffix -> split.
LLAMA_SPLITS = {
    "self_attn.q_proj": COLUMN, "self_attn.k_proj": COLUMN, "self_attn.v_proj": COLUMN,
    "self_attn.o_proj": ROW,
    "mlp.gate_proj": COLUMN, "mlp.up_proj": COLUMN, "mlp.down_proj": ROW,
}


def bounds(size: int, world: int, rank: int) -> tuple[int, int]:
    """``(start, stop)`` of rank's even share of ``size`` (callers check divisibility)."""
    step = size // world
    return rank * step, (rank + 1) * step


def check_layer(path: str, kind: str, out_features: int, in_features: int,
                base, world: int) -> None:
    """Raise ``ValueError`` naming ``path`` when the layer cannot be split ``world`` ways."""
    size = out_features if kind == COLUMN else in_features
    what = "out_features" if kind == COLUMN else "in_features"
    if size % world:
        raise ValueError(f"tensor_parallel: {path} ({kind}-parallel) has {what}={size}, not "
                         f"divisible by the group's {world} ranks")
    if isinstance(base, QuantizedWeight) and kind == ROW:
        part = in_features // world
        if part % base.group_size:
            raise ValueError(f"tensor_parallel: {path} is quantized with group_size="
                             f"{base.group_size}; splitting in_features={in_features} over "
                             f"{world} ranks gives {part} columns a rank, which would split a "
                             f"quantization group")


def padded_rank(kind: str, r: int, world: int) -> int:
    """The rank an adapter is stored at: ``r`` rounded up to a multiple of ``world`` on a
    column-parallel layer (A split by rank), ``r`` on a row-parallel one."""
    return -(-r // world) * world if kind == COLUMN else r


def pad_adapter(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A [r, K]``, ``B [N, r]`` zero-padded to ``A [rank, K]``, ``B [N, rank]``."""
    extra = rank - a.shape[0]
    if extra == 0:
        return a, b
    return (torch.cat([a, a.new_zeros(extra, a.shape[1])]),
            torch.cat([b, b.new_zeros(b.shape[0], extra)], 1))


def shard_base(base, kind: str, world: int, rank: int):
    """This rank's part of a dense ``[N, K]`` tensor or a ``QuantizedWeight``."""
    n, k = base.shape
    if kind == COLUMN:
        lo, hi = bounds(n, world, rank)
        if isinstance(base, QuantizedWeight):
            return QuantizedWeight(*(None if t is None else t[lo:hi].contiguous() for t in
                                     (base.qweight, base.scales, base.offsets)),
                                   base.group_size, base.scheme)
        return base[lo:hi].contiguous()
    lo, hi = bounds(k, world, rank)
    if isinstance(base, QuantizedWeight):
        per_byte = 1 if base.bits == 8 else 2
        g_lo, g_hi = lo // base.group_size, hi // base.group_size
        return QuantizedWeight(
            base.qweight[:, lo // per_byte:hi // per_byte].contiguous(),
            base.scales[:, g_lo:g_hi].contiguous(),
            None if base.offsets is None else base.offsets[:, g_lo:g_hi].contiguous(),
            base.group_size, base.scheme)
    return base[:, lo:hi].contiguous()


def shard_bias(bias: torch.Tensor | None, kind: str, world: int, rank: int):
    """Column layers split the bias with the rows; row layers keep it whole (added once,
    after the all-reduce)."""
    if bias is None or kind == ROW:
        return bias
    lo, hi = bounds(bias.shape[0], world, rank)
    return bias[lo:hi]


def adapter_slices(kind: str, r: int, out_features: int, in_features: int, world: int,
                   rank: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """``(A index, B index)``: this rank's part of ``A [r, K]`` and ``B [N, r]`` (``r``:
    the padded rank, :func:`padded_rank`)."""
    b_lo, b_hi = bounds(out_features, world, rank)
    b_index = (slice(b_lo, b_hi), slice(0, r))
    if kind == COLUMN:
        a_lo, a_hi = bounds(r, world, rank)
        return (slice(a_lo, a_hi), slice(0, in_features)), b_index
    k_lo, k_hi = bounds(in_features, world, rank)
    return (slice(0, r), slice(k_lo, k_hi)), b_index
