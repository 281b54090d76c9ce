"""The one table of benchmark cases, shared by ``lorart bench`` and ``benchmarks/bench_suite.py``.

A :class:`LayerCase` is one linear layer ``W [N, K]`` (``K`` = in_features, ``N`` =
out_features, PEFT's orientation) run on ``M`` rows with ``S`` adapters of rank ``r``
whose per-row ids follow a popularity pattern. An :class:`EndToEndCase` is a whole
model (SmolLM2-135M, 4-bit GGUF) generating tokens or taking a training step.

Shapes are the linear layers of real models; fused q/k/v and gate/up projections
appear as one layer, as serving stacks run them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import torch

POPULARITIES = ("identical", "distinct", "zipf", "skewed")
BASES = ("q4", "dense")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class Shape:
    """One linear layer of a model: ``in_features`` K, ``out_features`` N."""

    model: str
    layer: str
    k: int
    n: int

    @property
    def name(self) -> str:
        return f"{self.model}.{self.layer}"


SHAPES = {
    s.name: s
    for s in (
        Shape("llama2-7b", "qkvo", 4096, 4096),  # q, k, v, o: 4096 -> 4096
        Shape("llama2-7b", "gate_up", 4096, 11008),
        Shape("llama2-7b", "down", 11008, 4096),
        Shape("llama3-8b", "qkv", 4096, 6144),  # fused q + k + v (8 kv heads of 128)
        Shape("llama3-8b", "gate_up", 4096, 28672),  # fused gate + up (2 x 14336)
        Shape("llama3-8b", "down", 14336, 4096),
        Shape("llama2-70b", "qkv", 8192, 10240),
        Shape("llama2-70b", "gate_up", 8192, 57344),
        Shape("llama2-70b", "down", 28672, 8192),
        Shape("qwen2.5-7b", "qkv", 3584, 4608),  # 3584 + 2 x 512 (4 kv heads of 128)
        Shape("qwen2.5-7b", "gate_up", 3584, 37888),
        Shape("qwen2.5-7b", "down", 18944, 3584),
        # Small enough for CI and the test-suite; not a real model.
        Shape("tiny", "proj", 256, 384),
    )
}


@dataclass(frozen=True)
class LayerCase:
    """One timed configuration of a LoRA linear layer.

    ``direction`` is ``fwd`` (inference) or ``train`` (forward + backward of a frozen
    base: dx and the adapters' gradients). ``base`` is ``q4`` (asym, ``group_size``,
    float16 scales and offsets: GGUF Q4_1 / GPTQ style) or ``dense`` (weights in
    ``dtype``). ``popularity`` says which adapter each row uses (see
    :func:`lorart.bench.inputs.adapter_ids_for`).
    """

    shape: Shape
    rows: int
    rank: int = 16
    adapters: int = 1
    popularity: str = "identical"
    base: str = "q4"
    direction: str = "fwd"
    dtype: str = "bf16"
    group_size: int = 128
    tags: tuple[str, ...] = field(default=(), compare=False)

    kind = "layer"

    def __post_init__(self) -> None:
        if self.popularity not in POPULARITIES:
            raise ValueError(f"popularity must be one of {POPULARITIES}, got {self.popularity!r}")
        if self.base not in BASES:
            raise ValueError(f"base must be one of {BASES}, got {self.base!r}")
        if self.direction not in ("fwd", "train"):
            raise ValueError(f"direction must be 'fwd' or 'train', got {self.direction!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.rows < 1 or self.rank < 1 or self.adapters < 1:
            raise ValueError(f"rows, rank and adapters must be >= 1: {self}")

    @property
    def id(self) -> str:
        """Stable name, used to match runs in ``--compare`` and to filter with ``--cases``."""
        base = f"q4g{self.group_size}" if self.base == "q4" else "dense"
        return (f"{self.shape.name}/{base}/{self.dtype}/M{self.rows}/r{self.rank}/"
                f"S{self.adapters}-{self.popularity}/{self.direction}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def describe(self) -> dict:
        """The case's parameters as plain JSON-able data."""
        out = asdict(self)
        out.pop("tags")
        out["shape"] = {"name": self.shape.name, "k": self.shape.k, "n": self.shape.n}
        return out


@dataclass(frozen=True)
class EndToEndCase:
    """A whole model: ``generate`` (tokens/s with N adapters) or ``train`` (step time)."""

    name: str
    task: str  # "generate" | "train" | "serve" (lorart.bench.serve: engine vs grouped PEFT)
    adapters: int = 1
    tokens: int = 16  # new tokens (generate) or sequence length (train)
    batch: int = 1
    rank: int = 8
    tags: tuple[str, ...] = field(default=(), compare=False)

    kind = "e2e"

    @property
    def id(self) -> str:
        return f"e2e/{self.name}/{self.task}/S{self.adapters}/B{self.batch}/T{self.tokens}"

    def describe(self) -> dict:
        out = asdict(self)
        out.pop("tags")
        return out


Case = LayerCase | EndToEndCase


# --------------------------------------------------------------------------- the table
def _tiny_cases() -> list[Case]:
    t = SHAPES["tiny.proj"]
    return [
        LayerCase(t, 1, rank=8),
        LayerCase(t, 8, rank=8),
        LayerCase(t, 8, rank=8, base="dense"),
        LayerCase(t, 8, rank=8, adapters=4, popularity="zipf"),
        LayerCase(t, 8, rank=8, direction="train"),
    ]


def _quick_cases() -> list[Case]:
    s = SHAPES["llama2-7b.qkvo"]
    return [
        LayerCase(s, 1),
        LayerCase(s, 32),
        LayerCase(s, 1, base="dense"),
        LayerCase(s, 32, base="dense"),
        LayerCase(s, 32, adapters=8, popularity="zipf"),
        LayerCase(s, 32, direction="train"),
        EndToEndCase("smollm2-135m", "generate", adapters=2, tokens=4, batch=2),
    ]


FULL_ROWS = (1, 4, 16, 64, 256, 1024, 4096)


def _full_cases() -> list[Case]:
    cases: list[Case] = []
    real = [s for s in SHAPES.values() if s.model != "tiny"]
    # Rows sweep (decode -> prefill) on every shape, 4-bit base, one adapter of rank 16.
    for s in real:
        cases += [LayerCase(s, m) for m in FULL_ROWS]
    # Dense bf16 bases on two shapes.
    for name in ("llama2-7b.qkvo", "llama3-8b.gate_up"):
        cases += [LayerCase(SHAPES[name], m, base="dense") for m in (1, 16, 256, 4096)]
    # Rank sweep, decode and prefill.
    qkvo = SHAPES["llama2-7b.qkvo"]
    cases += [LayerCase(qkvo, m, rank=r) for m in (1, 256) for r in (8, 32, 64, 128)]
    # Many adapters per batch, every popularity pattern.
    cases += [LayerCase(qkvo, m, adapters=n, popularity=p)
              for m, n in ((16, 16), (256, 4), (256, 32), (256, 256))
              for p in POPULARITIES]
    # Training steps (forward + backward).
    for name in ("llama2-7b.qkvo", "llama2-7b.down", "llama3-8b.qkv"):
        for base in BASES:
            cases += [LayerCase(SHAPES[name], m, base=base, direction="train")
                      for m in (256, 1024, 4096)]
    cases.append(LayerCase(qkvo, 1024, adapters=32, popularity="zipf", direction="train"))
    cases += [
        EndToEndCase("smollm2-135m", "generate", adapters=1, tokens=32, batch=1),
        EndToEndCase("smollm2-135m", "generate", adapters=8, tokens=32, batch=8),
        EndToEndCase("smollm2-135m", "train", adapters=1, tokens=128, batch=4),
        EndToEndCase("smollm2-135m", "serve", adapters=64, tokens=16, batch=32),
    ]
    return _dedupe(cases)


def _dedupe(cases: list[Case]) -> list[Case]:
    seen: dict[str, Case] = {}
    for c in cases:
        seen.setdefault(c.id, c)
    return list(seen.values())


MODES = {"tiny": _tiny_cases, "quick": _quick_cases, "full": _full_cases}


def select(mode: str = "quick", pattern: str | None = None) -> list[Case]:
    """The cases of ``mode`` (``tiny``, ``quick`` or ``full``) whose id matches ``pattern``.

    ``pattern`` is a regular expression searched in each case id, e.g. ``"M1/"`` or
    ``"llama3-8b.*train"``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {sorted(MODES)}, got {mode!r}")
    cases = MODES[mode]()
    if pattern:
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"--cases {pattern!r} is not a valid regular expression: "
                             f"{exc}") from exc
        cases = [c for c in cases if rx.search(c.id)]
    return cases
