"""Benchmark cases of the CPU fused LoRA layer, as data (reused by the CLI and reports).

Each case is one linear layer ``W [N, K]`` (PEFT orientation: N = out_features,
K = in_features) run on ``rows`` tokens with one adapter of rank ``rank``; the base is
4-bit ``asym`` with groups of ``group_size`` along K.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from lorart.bench.cases import SHAPES
from lorart.bench.roofline import layer_flops


@dataclass(frozen=True)
class CpuCase:
    n: int  # out_features
    k: int  # in_features
    rows: int  # tokens M
    rank: int = 16
    group_size: int = 128
    scheme: str = "asym"

    @property
    def id(self) -> str:
        return f"{self.n}x{self.k}-m{self.rows}-r{self.rank}-g{self.group_size}"

    @property
    def flops(self) -> int:
        """Multiply-adds × 2 of base + shrink + expand (``lorart.bench.roofline``)."""
        return layer_flops(self.rows, self.n, self.k, [(self.rows, self.rank)])

    def as_dict(self) -> dict:
        return asdict(self) | {"id": self.id}


# Llama-2-7B's layers, from the one shape table that `lorart bench` uses too:
# q/k/v/o (4096×4096), gate/up (11008×4096), down (4096×11008), as (N, K).
CPU_SHAPES = tuple((SHAPES[name].n, SHAPES[name].k)
                   for name in ("llama2-7b.qkvo", "llama2-7b.gate_up", "llama2-7b.down"))
CPU_ROWS = (1, 8, 32, 512)
CPU_RANK = 16
CPU_GROUP_SIZE = 128

CPU_CASES = tuple(CpuCase(n, k, rows, CPU_RANK, CPU_GROUP_SIZE)
                  for n, k in CPU_SHAPES for rows in CPU_ROWS)
