"""The resident tier: a fixed set of adapter slots inside per-layer packed stacks.

Each served projection (``[N, K]``) owns one ``AdapterStack`` with room for
``num_slots`` adapters of up to ``max_rank`` each:

    a [num_slots * max_rank, K]      slot s owns rows    s*max_rank : (s+1)*max_rank
    b [N, num_slots * max_rank]      and the same columns

Loading an adapter into a slot writes its A rows / B columns in place (no other slot
moves: evicting or adding is not a re-layout). Its rank is NOT padded for compute: the
stack's segment list is ``[used_0, spare_0, used_1, spare_1, ...]`` where ``used_s`` has
exactly the adapter's rank in this layer (0 if it does not target the layer) and
``spare_s`` is the unused rest, never referenced by an id. So slot ``s`` is segment
``2 s``, identical in every layer: one ``AdapterBatch`` serves the whole model.
Memory is bounded up front: ``nbytes``.
"""

from __future__ import annotations

import torch

from ..adapters import AdapterStack
from .adapter_weights import AdapterWeights


class ResidentSlots:
    def __init__(self, shapes: dict[str, tuple[int, int]], num_slots: int, max_rank: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        if num_slots < 1 or max_rank < 1:
            raise ValueError(f"num_slots and max_rank must be >= 1, got {num_slots}, {max_rank}")
        self.num_slots, self.max_rank = num_slots, max_rank
        self.dtype, self.device = dtype, device
        rows = num_slots * max_rank
        self._a = {p: torch.zeros(rows, k, dtype=dtype, device=device)
                   for p, (n, k) in shapes.items()}
        self._b = {p: torch.zeros(n, rows, dtype=dtype, device=device)
                   for p, (n, k) in shapes.items()}
        self._used = {p: [0] * num_slots for p in shapes}   # rank of each slot per layer
        self._scale = {p: [0.0] * num_slots for p in shapes}
        self.holder: list[AdapterWeights | None] = [None] * num_slots
        self._stacks: dict[str, AdapterStack] = {}
        for p in shapes:
            self._rebuild(p)

    @property
    def num_segments(self) -> int:
        """``num_adapters`` of the stacks (and of every step's ``AdapterBatch``)."""
        return 2 * self.num_slots

    @staticmethod
    def segment(slot: int) -> int:
        return 2 * slot

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for d in (self._a, self._b) for t in d.values())

    @staticmethod
    def bytes_needed(shapes: dict[str, tuple[int, int]], num_slots: int, max_rank: int,
                     dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return num_slots * max_rank * elem * sum(n + k for n, k in shapes.values())

    def stack(self, path: str) -> AdapterStack | None:
        return self._stacks.get(path)

    def write(self, slot: int, weights: AdapterWeights) -> None:
        """Put ``weights`` into ``slot`` (in place; other slots untouched)."""
        if weights.rank > self.max_rank:
            raise ValueError(f"adapter {weights.name!r} has rank {weights.rank}, more than "
                             f"max_lora_rank={self.max_rank}")
        lo = slot * self.max_rank
        with torch.no_grad():
            for path in self._a:
                entry = weights.layers.get(path)
                r = 0
                if entry is not None:
                    a, b, scale = entry
                    r = a.shape[0]
                    self._a[path][lo:lo + r].copy_(a)
                    self._b[path][:, lo:lo + r].copy_(b)
                    self._scale[path][slot] = scale
                if r != self._used[path][slot] or entry is not None:
                    self._used[path][slot] = r
                    self._rebuild(path)
        self.holder[slot] = weights

    def clear(self, slot: int) -> None:
        """Mark ``slot`` empty (its rows are simply no longer referenced)."""
        for path in self._a:
            if self._used[path][slot]:
                self._used[path][slot] = 0
                self._rebuild(path)
        self.holder[slot] = None

    def _rebuild(self, path: str) -> None:
        offsets, scales = [0], []
        for s in range(self.num_slots):
            offsets += [s * self.max_rank + self._used[path][s], (s + 1) * self.max_rank]
            scales += [self._scale[path][s], 0.0]
        self._stacks[path] = AdapterStack(
            self._a[path], self._b[path], torch.tensor(offsets, dtype=torch.int64),
            torch.tensor(scales, dtype=torch.float32, device=self.device), offsets)
