"""Packed storage for many LoRA adapters with ragged ranks, and per-batch adapter ids.

An ``AdapterStack`` holds ``S`` adapters for one linear layer ``[N, K]``:

    a             [R, K]    rows rank_offsets[s] : rank_offsets[s+1] are A_s   (PEFT lora_A)
    b             [N, R]    the same columns are B_s                             (PEFT lora_B)
    rank_offsets  [S + 1]   int64, rank_offsets[0] = 0, rank_offsets[S] = R
    scales        [S]       float32, lora_alpha / r (or / sqrt(r) for rsLoRA)

``rank_offsets_list`` and ``scales_list`` are host copies, so nothing on the hot path
reads tensor values back (a device sync on a GPU). ``lora_args()`` is the kernels' view of
the stack (``LoRAArgs``: host lists + device tensors), built once per stack version.

A_s and B_s keep PEFT's shapes, so adapters load without transposes, and ranks are
never padded to a common rank. ``R`` may exceed ``rank_offsets[S]`` (spare capacity):
adding an adapter then writes into free rows/columns instead of re-laying out the
others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .backend.base import LoRAArgs


@dataclass
class AdapterStack:
    """Many adapters of one layer, packed along the rank dimension (see module doc)."""

    a: torch.Tensor
    b: torch.Tensor
    rank_offsets: torch.Tensor
    scales: torch.Tensor
    # Host copies: kernels and validation need them without a device sync.
    rank_offsets_list: list[int] = field(default_factory=list)
    scales_list: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.a.dim() != 2 or self.b.dim() != 2:
            raise ValueError(f"a must be [R, K] and b [N, R], got {tuple(self.a.shape)} and "
                             f"{tuple(self.b.shape)}")
        if self.a.shape[0] != self.b.shape[1]:
            raise ValueError(f"a has {self.a.shape[0]} rank rows but b has {self.b.shape[1]} "
                             f"rank columns")
        if self.a.dtype != self.b.dtype:
            raise TypeError(f"a and b must share a dtype, got {self.a.dtype} and {self.b.dtype}")
        if not self.rank_offsets_list:
            self.rank_offsets_list = [int(v) for v in self.rank_offsets.tolist()]
        if not self.scales_list:
            self.scales_list = [float(v) for v in self.scales.tolist()]
        offs = self.rank_offsets_list
        if len(offs) < 1 or offs[0] != 0 or any(y < x for x, y in zip(offs, offs[1:])):
            raise ValueError(f"rank_offsets must start at 0 and not decrease, got {offs}")
        if offs[-1] > self.a.shape[0]:
            raise ValueError(f"rank_offsets end at {offs[-1]} but a has {self.a.shape[0]} rows")
        if self.scales.numel() != len(offs) - 1:
            raise ValueError(f"scales must have one entry per adapter ({len(offs) - 1}), "
                             f"got {self.scales.numel()}")
        self._args: LoRAArgs | None = None

    def lora_args(self) -> LoRAArgs:
        """The kernels' arguments for this stack, built once per version (see module doc)."""
        if self._args is None:
            self._args = LoRAArgs(self.a.contiguous(), self.b.contiguous(),
                                  self.rank_offsets_list, self.scales_list)
        return self._args

    @classmethod
    def from_list(
        cls,
        adapters: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
        capacity: int | None = None,
    ) -> AdapterStack:
        """Pack ``[(A_s [r_s, K], B_s [N, r_s], scale_s), ...]`` into one stack.

        Ranks may differ. ``capacity`` (total rank rows) reserves room for adapters
        added later with :meth:`add`. The packed tensors are new (copies).
        """
        if len(adapters) == 0:
            raise ValueError("adapters must hold at least one (A, B, scale) triple")
        k = n = None
        dtype = device = None
        for i, item in enumerate(adapters):
            if len(item) != 3:
                raise ValueError(f"adapters[{i}] must be (A, B, scale), got {len(item)} items")
            a, b, _ = item
            _check_pair(a, b, f"adapters[{i}]")
            if k is None:
                k, n, dtype, device = a.shape[1], b.shape[0], a.dtype, a.device
            if a.shape[1] != k or b.shape[0] != n:
                raise ValueError(f"adapters[{i}] is for a [{b.shape[0]}, {a.shape[1]}] layer, "
                                 f"adapters[0] for [{n}, {k}]")
            if a.dtype != dtype or a.device != device:
                raise TypeError(f"adapters[{i}] is {a.dtype} on {a.device}, adapters[0] is "
                                f"{dtype} on {device}")
        offsets = [0]
        for a, _, _ in adapters:
            offsets.append(offsets[-1] + a.shape[0])
        rows = max(offsets[-1], capacity or 0)
        packed_a = torch.zeros(rows, k, dtype=dtype, device=device)
        packed_b = torch.zeros(n, rows, dtype=dtype, device=device)
        for (a, b, _), lo, hi in zip(adapters, offsets, offsets[1:]):
            packed_a[lo:hi] = a.detach()
            packed_b[:, lo:hi] = b.detach()
        scales = [float(s) for _, _, s in adapters]
        return cls(packed_a, packed_b, torch.tensor(offsets, dtype=torch.int64),
                   torch.tensor(scales, dtype=torch.float32, device=device), offsets, scales)

    # ------------------------------------------------------------------ queries
    @property
    def num_adapters(self) -> int:
        return len(self.rank_offsets_list) - 1

    @property
    def in_features(self) -> int:
        return self.a.shape[1]

    @property
    def out_features(self) -> int:
        return self.b.shape[0]

    @property
    def ranks(self) -> list[int]:
        offs = self.rank_offsets_list
        return [hi - lo for lo, hi in zip(offs, offs[1:])]

    @property
    def dtype(self) -> torch.dtype:
        return self.a.dtype

    @property
    def device(self) -> torch.device:
        return self.a.device

    def adapter(self, s: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A_s [r, K], B_s [N, r], scale_s)`` as views into the stack."""
        if not 0 <= s < self.num_adapters:
            raise IndexError(f"adapter index {s} out of range for {self.num_adapters} adapters")
        lo, hi = self.rank_offsets_list[s], self.rank_offsets_list[s + 1]
        return self.a[lo:hi], self.b[:, lo:hi], self.scales_list[s]

    def add(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> int:
        """Append one adapter, using spare capacity when there is room; returns its index."""
        _check_pair(a, b, "the new adapter")
        if a.shape[1] != self.in_features or b.shape[0] != self.out_features:
            raise ValueError(f"the new adapter is for [{b.shape[0]}, {a.shape[1]}], the stack "
                             f"for [{self.out_features}, {self.in_features}]")
        lo = self.rank_offsets_list[-1]
        hi = lo + a.shape[0]
        if hi > self.a.shape[0]:  # grow geometrically so repeated adds stay cheap
            rows = max(hi, 2 * self.a.shape[0])
            grown_a = self.a.new_zeros(rows, self.in_features)
            grown_b = self.b.new_zeros(self.out_features, rows)
            grown_a[:lo] = self.a[:lo]
            grown_b[:, :lo] = self.b[:, :lo]
            self.a, self.b = grown_a, grown_b
        with torch.no_grad():
            self.a[lo:hi] = a.to(self.a)
            self.b[:, lo:hi] = b.to(self.b)
        self.rank_offsets_list.append(hi)
        self.scales_list.append(float(scale))
        self.rank_offsets = torch.tensor(self.rank_offsets_list, dtype=torch.int64)
        self.scales = torch.cat([self.scales, self.scales.new_tensor([float(scale)])])
        self._args = None  # a new version
        return self.num_adapters - 1

    def to(self, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> AdapterStack:
        return AdapterStack(self.a.to(device=device, dtype=dtype),
                            self.b.to(device=device, dtype=dtype),
                            self.rank_offsets, self.scales.to(device),
                            list(self.rank_offsets_list), list(self.scales_list))


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{what}: A and B must be tensors")
    if a.dim() != 2 or b.dim() != 2:
        raise ValueError(f"{what}: A must be [r, K] and B [N, r], got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.shape[0] != b.shape[1]:
        raise ValueError(f"{what}: rank mismatch, A is [{a.shape[0]}, K] but B is "
                         f"[N, {b.shape[1]}]")


class AdapterBatch:
    """Validated per-row adapter ids for one batch, plus metadata shared by all layers.

    ``ids [M]`` int32 in ``-1..num_adapters-1`` (``-1`` = base only). Checked once, on
    construction, before any kernel reads by them: ids given as a list are checked on the
    host; a tensor costs one read of its (min, max). The SGMV metadata (rows sorted by
    adapter, segment boundaries) is computed lazily, once, on the device, and reused by
    every layer.
    """

    def __init__(self, adapter_ids: torch.Tensor | Sequence[int], num_adapters: int,
                 device: torch.device | str | None = None, *, checked: bool = False):
        ids = adapter_ids
        if isinstance(ids, torch.Tensor):
            if ids.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"adapter_ids must be int32 or int64, got {ids.dtype}")
            if ids.dim() != 1:
                raise ValueError(f"adapter_ids must be 1-D [M], got shape {tuple(ids.shape)}")
            if not checked and ids.numel():
                _check_range(torch.stack(torch.aminmax(ids)).tolist(), num_adapters)
        else:
            ids = [int(v) for v in ids]
            if ids and not checked:
                _check_range((min(ids), max(ids)), num_adapters)
            ids = torch.tensor(ids, dtype=torch.int32)
        self.ids = ids.to(device=device, dtype=torch.int32).contiguous()
        self.num_adapters = num_adapters
        self._segments: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def __len__(self) -> int:
        return self.ids.numel()

    @property
    def device(self) -> torch.device:
        return self.ids.device

    def segments(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(order [M], seg_starts [S+2], seg_adapter [S+1])`` for SGMV kernels.

        ``order`` is a stable sort of rows by adapter id (``-1`` rows first);
        rows ``order[seg_starts[j]:seg_starts[j+1]]`` all use adapter ``j - 1``.
        Device ops only (``scatter_add_``, not ``bincount``, which syncs on a GPU).
        """
        if self._segments is None:
            ids64 = self.ids.to(torch.int64)
            order = torch.sort(ids64, stable=True).indices
            starts = torch.zeros(self.num_adapters + 2, dtype=torch.int64, device=self.device)
            starts.scatter_add_(0, ids64 + 2, torch.ones_like(ids64))
            seg_adapter = torch.arange(-1, self.num_adapters, device=self.device)
            self._segments = (order, starts.cumsum_(0), seg_adapter)
        return self._segments


def _check_range(lo_hi, num_adapters: int) -> None:
    lo, hi = lo_hi
    if lo < -1 or hi >= num_adapters:
        raise ValueError(f"adapter_ids must lie in -1..{num_adapters - 1} (-1 = base only), "
                         f"got values in {lo}..{hi}")
