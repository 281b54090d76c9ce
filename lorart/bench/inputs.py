"""Random inputs for a :class:`~lorart.bench.cases.LayerCase`: activations, base, adapters, ids."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..adapters import AdapterBatch, AdapterStack
from ..quant import QuantizedWeight, code_table, quantize
from .cases import LayerCase

SCALE = 0.5  # lora_alpha / r of every benchmark adapter; any non-zero value will do


def adapter_ids_for(popularity: str, rows: int, adapters: int,
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-row adapter ids ``[rows]`` int32 in ``0..adapters-1``.

    ``identical``: every row uses adapter 0. ``distinct``: row i uses ``i % adapters``
    (every row its own adapter while rows <= adapters). ``zipf``: adapter s drawn with
    probability ∝ 1/(s+1). ``skewed``: half the rows use adapter 0, the rest are uniform
    over all adapters. Random patterns are shuffled, as real batches arrive unsorted.
    """
    if rows < 1 or adapters < 1:
        raise ValueError(f"rows and adapters must be >= 1, got {rows}, {adapters}")
    if popularity == "identical":
        return torch.zeros(rows, dtype=torch.int32)
    if popularity == "distinct":
        return (torch.arange(rows) % adapters).to(torch.int32)
    if popularity == "zipf":
        weights = 1.0 / torch.arange(1, adapters + 1, dtype=torch.float64)
        return torch.multinomial(weights, rows, replacement=True,
                                 generator=generator).to(torch.int32)
    if popularity == "skewed":
        ids = torch.randint(0, adapters, (rows,), generator=generator)
        ids[: rows // 2] = 0
        return ids[torch.randperm(rows, generator=generator)].to(torch.int32)
    raise ValueError(f"unknown popularity {popularity!r}")


def dequantize_like_torch(qweight: QuantizedWeight, dtype: torch.dtype) -> torch.Tensor:
    """``W [N, K]`` in ``dtype``, computed the way a plain-torch user would: in ``dtype``.

    This is the "dequantize, then matmul" baseline's dequantization (unpack nibbles,
    scale and shift per group, all in the activation dtype), cheaper in memory than
    ``QuantizedWeight.dequantize`` (float32 via int64 codes), which is the reference.
    A dense tensor is returned as it is. Nothing is copied to the device per call, so a
    CUDA graph can capture it.
    """
    if isinstance(qweight, torch.Tensor):
        return qweight
    n, k = qweight.shape
    g = qweight.group_size
    q = qweight.qweight
    if qweight.scheme == "int8":  # one code a byte, its own value
        codes = q.view(n, k // g, g)
    else:
        codes = torch.stack((q & 15, q >> 4), dim=-1).view(n, k // g, g)
    if qweight.scheme == "nf4":
        values = _nf4_table(q.device, dtype)[codes.long()]
    else:
        values = codes.to(dtype) - (8 if qweight.scheme == "sym" else 0)
    w = values * qweight.scales.to(dtype).unsqueeze(-1)
    if qweight.offsets is not None:
        w = w + qweight.offsets.to(dtype).unsqueeze(-1)
    return w.view(n, k)


@functools.lru_cache
def _nf4_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The 16 NF4 values on ``device`` in ``dtype``, made once per (device, dtype)."""
    return code_table("nf4", device).to(dtype)


@dataclass
class LayerInputs:
    """Everything one case needs, built once and shared by every implementation.

    x [M, K], dy [M, N] in the case's dtype; ``weight`` [N, K] dense in that dtype (the
    dense base, or the dequantized 4-bit base for baselines that need one); ``qweight``
    the 4-bit base or ``None``; ``stack`` S adapters; ``ids`` [M] int32 (``None`` for a
    single adapter used by every row); ``batch`` the validated ``AdapterBatch``.
    """

    x: torch.Tensor
    dy: torch.Tensor
    qweight: QuantizedWeight | None
    stack: AdapterStack
    ids: torch.Tensor | None
    batch: AdapterBatch | None
    _weight: torch.Tensor | None = None

    @property
    def base(self) -> torch.Tensor | QuantizedWeight:
        return self.qweight if self.qweight is not None else self.weight

    @property
    def weight(self) -> torch.Tensor:
        """The dense base ``[N, K]`` in x's dtype (for a 4-bit base: dequantized once, lazily)."""
        if self._weight is None:
            self._weight = dequantize_like_torch(self.qweight, self.x.dtype)
        return self._weight

    def used_adapters(self) -> list[tuple[int, int]]:
        """``[(rows using s, rank of s), ...]`` for each adapter used by at least one row."""
        ranks = self.stack.ranks
        if self.ids is None:
            return [(self.x.shape[0], ranks[0])]
        counts = torch.bincount(self.ids.to(torch.int64).cpu(), minlength=len(ranks))
        return [(int(c), ranks[s]) for s, c in enumerate(counts.tolist()) if c > 0]


def make_inputs(case: LayerCase, device: torch.device | str, seed: int = 0) -> LayerInputs:
    """Fresh random inputs for ``case`` on ``device`` (values are never all zeros)."""
    gen = torch.Generator().manual_seed(seed)
    dtype = case.torch_dtype
    k, n, m = case.shape.k, case.shape.n, case.rows

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen) * std).to(dtype=dtype, device=device)

    x = randn(m, k)
    dy = randn(m, n)
    w32 = torch.randn(n, k, generator=gen) * k ** -0.5
    qweight = weight = None
    if case.base == "q4":
        qweight = quantize(w32, case.group_size, "asym").to(device)
    else:
        weight = w32.to(dtype=dtype, device=device)
    del w32
    adapters = [(randn(case.rank, k, std=k ** -0.5), randn(n, case.rank, std=case.rank ** -0.5),
                 SCALE) for _ in range(case.adapters)]
    stack = AdapterStack.from_list(adapters)
    ids = batch = None
    if case.adapters > 1 or case.popularity != "identical":
        ids = adapter_ids_for(case.popularity, m, case.adapters, gen).to(device)
        batch = AdapterBatch(ids, case.adapters, device)
        batch.segments()  # built once per batch and shared by every layer of a model
    return LayerInputs(x, dy, qweight, stack, ids, batch, weight)
