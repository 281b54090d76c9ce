"""What every backend implements, and the arguments the op surface hands it.

The op surface (``lorart.ops``) validates everything first; a backend receives only
checked, contiguous 2-D tensors on one device:

    x            [M, K]   float32 | bfloat16 | float16
    base         dense W [N, K] (x's dtype) or a QuantizedWeight [N, K]
    bias         [N] (x's dtype) or None
    lora         LoRAArgs or None (base only)
    batch        the batch's AdapterBatch (ids [M] int32 in -1..S-1, validated, and its
                 cached SGMV segments), or None: every row uses adapter 0. A bare ids
                 tensor [M] is accepted too (``ids_of`` / ``segments_of`` read either).

Backends never read tensor values back to the host (a device sync on a GPU): the
adapter metadata comes as host lists and as device tensors (``LoRAArgs.device_meta``),
both built once per ``AdapterStack`` version.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..quant import ALL_SCHEMES, QuantizedWeight

# Scheme ids as every kernel sees them (lorart::Scheme in csrc/common/quant_math.h):
# asym 0, sym 1, nf4 2, int8 3; -1 is a dense W.
SCHEME_IDS = {name: i for i, name in enumerate(ALL_SCHEMES)}


@dataclass
class LoRAArgs:
    """Packed adapters of one layer (see ``lorart.adapters.AdapterStack``).

    a [R, K] and b [N, R] in x's dtype, contiguous; adapter s owns rank rows
    ``rank_offsets[s]:rank_offsets[s+1]``; ``scales[s]`` multiplies its output. Host lists;
    :meth:`device_meta` gives the same as tensors on a's device, uploaded once.
    """

    a: torch.Tensor
    b: torch.Tensor
    rank_offsets: list[int]
    scales: list[float]

    def __post_init__(self) -> None:
        offs = self.rank_offsets
        self.num_adapters = len(self.scales)
        self.max_rank = max([hi - lo for lo, hi in zip(offs, offs[1:])] or [0])
        self._device_meta: tuple[torch.Tensor, torch.Tensor] | None = None

    def device_meta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rank_offsets int64 [S+1], scales float32 [S])`` on a's device."""
        if self._device_meta is None:
            self._device_meta = _device_meta(tuple(self.rank_offsets), tuple(self.scales),
                                             self.a.device)
        return self._device_meta

    @classmethod
    def on_device(cls, a: torch.Tensor, b: torch.Tensor, rank_offsets: torch.Tensor,
                  scales: torch.Tensor, max_rank: int) -> LoRAArgs:
        """From device tensors alone (inside a custom op: no host lists there)."""
        args = cls(a, b, [], [])
        args.num_adapters, args.max_rank = scales.numel(), max_rank
        args._device_meta = (rank_offsets, scales)
        return args


@functools.lru_cache(maxsize=1024)
def _device_meta(rank_offsets: tuple, scales: tuple, device: torch.device):
    """Uploaded once per value: a single adapter's args are rebuilt per call, and a training
    stack per forward, with the same offsets and scales every time."""
    return (torch.tensor(rank_offsets, dtype=torch.int64, device=device),
            torch.tensor(scales, dtype=torch.float32, device=device))


def ids_of(batch) -> torch.Tensor | None:
    """The ``[M]`` int32 ids of an ``AdapterBatch`` (or of a bare ids tensor), or None."""
    return getattr(batch, "ids", batch)


def segments_of(batch, num_adapters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(order [M], seg_starts [S+2])`` of ``batch`` (see ``AdapterBatch.segments``)."""
    if not hasattr(batch, "segments"):
        from ..adapters import AdapterBatch  # a bare tensor of already validated ids

        batch = AdapterBatch(batch, num_adapters, checked=True)
    order, seg_starts, _ = batch.segments()
    return order, seg_starts


Base = torch.Tensor | QuantizedWeight


@dataclass(frozen=True)
class WeightArgs:
    """A base weight ``[N, K]`` as every backend hands it to its kernels (:func:`weight_args`).

    ``data``: dense ``W [N, K]`` (``scheme = -1``), packed 4-bit codes uint8 ``[N, K/2]``
    or 8-bit codes int8 ``[N, K]`` (``scheme`` = ``SCHEME_IDS[...]``); ``scales``/
    ``offsets``: ``[N, K/group_size]`` (None for dense; offsets for asym, optional for
    int8). All contiguous.
    """

    data: torch.Tensor
    scales: torch.Tensor | None
    offsets: torch.Tensor | None
    scheme: int
    group_size: int
    n: int
    k: int

    @property
    def quantized(self) -> bool:
        return self.scheme >= 0

    @property
    def groups(self) -> int:
        return self.k // self.group_size if self.group_size else 1


def weight_args(base: Base) -> WeightArgs:
    """The kernels' view of ``base``, built once per ``QuantizedWeight`` (kept on it: its
    tensors are fixed once built) and wrapping a dense W as it is (the op surface made it
    contiguous)."""
    if isinstance(base, torch.Tensor):
        return WeightArgs(base, None, None, -1, 0, *base.shape)
    if isinstance(base, WeightArgs):
        return base
    args = None if torch.compiler.is_compiling() else base.__dict__.get("_kernel_args")
    if args is None:
        offsets = None if base.offsets is None else base.offsets.contiguous()
        args = WeightArgs(base.qweight.contiguous(), base.scales.contiguous(), offsets,
                          SCHEME_IDS[base.scheme], base.group_size, *base.shape)
        if not torch.compiler.is_compiling():
            base.__dict__["_kernel_args"] = args
    return args


def buffer(t: torch.Tensor | None) -> tuple[int, int]:
    """A tensor as the C++ bindings take it: ``(data pointer, elements from it to the end of
    its storage)``, so the C++ side can check the shapes fit; ``(0, 0)``: absent."""
    if t is None:
        return 0, 0
    return t.data_ptr(), t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()


class Backend:
    """A set of kernels for the fused LoRA linear op. Subclasses override the methods."""

    name: str = "?"

    def status(self) -> tuple[bool, str]:
        """``(available, reason)``: the reason says why not, or what is in use."""
        raise NotImplementedError

    def unsupported(self, x: torch.Tensor, base: Base, lora: LoRAArgs | None) -> str | None:
        """``None`` if this backend runs these inputs, else why not (device, dtype...)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, base: Base, bias: torch.Tensor | None,
                lora: LoRAArgs | None, batch=None) -> torch.Tensor:
        """``y [M, N]`` in x's dtype (see the module doc for the arguments)."""
        raise NotImplementedError

    def backward(self, dy: torch.Tensor, x: torch.Tensor, base: Base, lora: LoRAArgs | None,
                 batch, need_dx: bool, need_dlora: bool,
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """``(dx [M, K], da [R, K], db [N, R])`` for a frozen base; ``None`` where not needed."""
        raise NotImplementedError
