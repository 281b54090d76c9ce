"""Bytes communicated per decoder layer per token: fully sharded LoRA vs replicated A.

The collectives are the ones ``ShardedLoRALinear.forward`` runs (``collective_sizes``
mirrors it, and ``tests/test_distributed.py`` checks the prediction against the bytes the
collectives actually recorded on 2 processes), priced by ``collectives.bytes_sent`` (ring
algorithms, bytes one rank sends). Two layouts, for one adapter of rank ``r`` per token (in
a mixed batch ``r`` is the layer's widest adapter; an ``r`` that does not divide by ``P`` is
zero-padded on column layers, ``shard.padded_rank``):

``fully_sharded`` (S-LoRA, what lorart runs)
    column layers: A split by rank, all-gather of ``x·A_pᵀ`` (r/P values a rank);
    row layers: A split by input, all-reduce of ``x_p·A_pᵀ`` (r values), B split by output,
    its output folded into the base all-reduce (no extra bytes).
``replicated_a`` (vLLM's default, ``fully_sharded_loras=False``)
    column layers: all of A on every rank (x is replicated, so ``x·Aᵀ`` needs no
    collective), B split by output rows; row layers: A split by input, B replicated, the
    partial ``x_p·A_pᵀ·Bᵀ`` added into the base all-reduce (no extra bytes).

So replicated A sends nothing beyond the base's two all-reduces, and fully sharded sends
``5·(P−1)·r/P + 2·2·(P−1)/P·r`` values more; in exchange every rank holds (and reads at
every decode step) ``1/P`` of each adapter instead of all of A on 5 of 7 projections and
all of B on the other 2. ``adapter_bytes_per_rank`` reports that side.
"""

from __future__ import annotations

from dataclasses import dataclass

from .collectives import bytes_sent
from .shard import COLUMN, LLAMA_SPLITS, padded_rank

LAYOUTS = ("fully_sharded", "replicated_a")


def collective_sizes(kind: str, out_features: int, r: int, world: int, layout: str,
                     dtype_bytes: int) -> list[tuple[str, int, bool]]:
    """``[(op, tensor bytes a rank contributes, is LoRA traffic)]`` one projection runs
    for one token (``ShardedLoRALinear.forward``, in its order)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    lora = bool(r) and layout == "fully_sharded"
    if kind == COLUMN:
        piece = padded_rank(COLUMN, r, world) // world
        return [("all_gather", piece * dtype_bytes, True)] if lora else []
    out = [("all_reduce", r * dtype_bytes, True)] if lora else []
    return out + [("all_reduce", out_features * dtype_bytes, False)]  # the base's (+ LoRA z)


@dataclass
class LayerComm:
    """One decoder layer, one token, bytes one rank sends; and adapter bytes it holds."""

    base_bytes: float
    lora_bytes: float
    adapter_bytes_per_rank: int

    @property
    def total_bytes(self) -> float:
        return self.base_bytes + self.lora_bytes


def llama_shapes(hidden: int, intermediate: int, num_heads: int, num_kv_heads: int,
                 head_dim: int | None = None) -> dict[str, tuple[int, int]]:
    """``{projection: (out_features, in_features)}`` of one Llama decoder layer."""
    d = head_dim or hidden // num_heads
    return {"self_attn.q_proj": (num_heads * d, hidden), "self_attn.k_proj": (num_kv_heads * d,
            hidden), "self_attn.v_proj": (num_kv_heads * d, hidden),
            "self_attn.o_proj": (hidden, num_heads * d), "mlp.gate_proj": (intermediate, hidden),
            "mlp.up_proj": (intermediate, hidden), "mlp.down_proj": (hidden, intermediate)}


def comm_per_token(shapes: dict[str, tuple[int, int]], r: int, world: int,
                   layout: str = "fully_sharded", dtype_bytes: int = 2) -> LayerComm:
    """Bytes one rank sends per decoder layer per token (``shapes``: ``llama_shapes``),
    every projection carrying one rank-``r`` adapter (``r = 0``: the base alone)."""
    base = lora = 0.0
    held = 0
    for path, (n, k) in shapes.items():
        kind = LLAMA_SPLITS[path]
        for op, nbytes, is_lora in collective_sizes(kind, n, r, world, layout, dtype_bytes):
            if is_lora:
                lora += bytes_sent(op, nbytes, world)
            else:
                base += bytes_sent(op, nbytes, world)
        held += _adapter_values(kind, n, k, r, world, layout) * dtype_bytes
    return LayerComm(base, lora, held)


def _adapter_values(kind: str, n: int, k: int, r: int, world: int, layout: str) -> int:
    """Values of one adapter (A [r, K], B [N, r]) a rank holds for one projection."""
    if layout == "fully_sharded":
        return (r * k + n * r) // world
    if kind == COLUMN:
        return r * k + n * r // world          # all of A, B's rows
    return r * k // world + n * r              # A's input columns, all of B
