"""Per-call adapter routing: which adapter each row of a forward uses, with no shared state.

The adapters of a patched model have global indices (``AdapterRegistry``: name -> index,
shared by all its ``LoRALinear`` layers). A ``Route`` says which global adapter each row
of one call uses. It lives in a ``contextvars.ContextVar`` set for the duration of the
call, so any number of threads (or asyncio tasks) can run one model at once, each with
its own adapters. The public entry point is ``lorart.route`` (in ``lorart.patch``):

    with lorart.route(model, adapter_names=["a", "__base__", "b"]):   # one per sequence
        model(input_ids)                                              # input_ids [3, T]
    with lorart.route(model, adapter_ids=ids):                        # one per row (token)
        model(packed_ids[None])               # ids [M] global indices, -1 = base; x [1, M, K]

``model(..., adapter_names=[...])`` and ``model.generate(..., adapter_names=[...])`` do the
same, after checking that there is exactly one name per sequence (``generate`` repeats
each name ``max(num_beams, num_return_sequences)`` times, as transformers repeats the
inputs). Global indices: ``lorart.adapter_names(model)`` order, i.e. ``registry.index``.

A layer asks the route for an ``AdapterBatch`` in its own index space (:meth:`Route.
batch_for`). A batch is built once per (adapters of the layer, rows per sequence, device)
and shared by every layer with the same adapters, and by every decode step of one
``generate``: a warm decode step reads no tensor values back to the host (per-row ids
given as a *tensor* are range-checked once, when the route is made: one read).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from contextvars import ContextVar

import torch

from .adapters import AdapterBatch

BASE_ADAPTER = "__base__"  # PEFT's name for "no adapter" in a mixed batch

_CURRENT: ContextVar[Route | None] = ContextVar("lorart_route", default=None)


class Route:
    """The global adapter ids of one call: one per sequence (``names``) or one per row.

    Immutable after construction except for its cache of per-layer batches, so a route
    may be shared by every layer of the call (one thread at a time, as a call runs).
    """

    def __init__(self, registry, seq_ids: list[int] | None = None,
                 rows: AdapterBatch | None = None) -> None:
        self.registry = registry
        self.seq_ids = seq_ids  # host list, one global id per sequence
        self.rows = rows  # AdapterBatch over global ids, one per row
        self._batches: dict = {}

    @classmethod
    def from_names(cls, registry, adapter_names: Sequence[str | None], num_sequences=None,
                   repeat: int = 1) -> Route:
        """One name per sequence (``"__base__"``/``None``: no adapter), checked against
        ``num_sequences`` when given; each repeated ``repeat`` times (beams, samples)."""
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise TypeError(f"adapter_names must be a list with one adapter name per sequence, "
                            f"got {type(adapter_names).__name__}")
        if num_sequences is not None and len(adapter_names) != num_sequences:
            raise ValueError(f"Length of adapter_names should be the same as the number of "
                             f"inputs, but got {len(adapter_names)} names for {num_sequences} "
                             f"sequences")
        ids = [registry.index(n) for n in adapter_names]
        return cls(registry, seq_ids=[i for i in ids for _ in range(repeat)])

    @classmethod
    def from_ids(cls, registry, adapter_ids) -> Route:
        """One global id per row: an int tensor/list ``[M]`` (checked here) or an
        ``AdapterBatch`` over the registry's adapters (checked when it was built)."""
        n = len(registry.names)
        if isinstance(adapter_ids, AdapterBatch):
            if adapter_ids.num_adapters != n:
                raise ValueError(f"adapter_ids were validated for {adapter_ids.num_adapters} "
                                 f"adapters but the model has {n}")
            return cls(registry, rows=adapter_ids)
        if isinstance(adapter_ids, str) or not isinstance(adapter_ids, torch.Tensor | Sequence):
            raise TypeError(f"adapter_ids must be an int tensor [M], a list of ints or an "
                            f"AdapterBatch, got {type(adapter_ids).__name__}")
        return cls(registry, rows=AdapterBatch(adapter_ids, n))

    def batch_for(self, rows: int, present: tuple[int, ...], device) -> AdapterBatch | None:
        """An ``AdapterBatch`` over a layer's own adapters (``present``: their global ids, in
        the layer's order) for ``rows`` rows, or ``None`` when no row uses any of them."""
        if self.rows is not None:
            if len(self.rows) != rows:
                raise ValueError(f"adapter_ids has {len(self.rows)} entries but the layer sees "
                                 f"{rows} rows; give one adapter id per row")
            key = (present, device)
        else:
            n_seq = len(self.seq_ids)
            if n_seq == 0 or rows % n_seq:
                raise ValueError(f"adapter_names has {n_seq} entries but the layer sees {rows} "
                                 f"rows; give one adapter name per sequence of the batch")
            key = (present, rows // n_seq, device)
        if key not in self._batches:
            self._batches[key] = self._build(present, rows, device)
        return self._batches[key]

    def _build(self, present: tuple[int, ...], rows: int, device) -> AdapterBatch | None:
        if self.rows is not None:  # device ids: a gather through a lookup table, no reads
            n = len(self.registry.names)
            if present == tuple(range(n)):
                same = self.rows.device == torch.device(device)
                return self.rows if same else AdapterBatch(self.rows.ids, n, device, checked=True)
            lut = torch.full((n + 1,), -1, dtype=torch.int32)  # [-1] -> the trailing -1
            lut[list(present)] = torch.arange(len(present), dtype=torch.int32)
            local = lut.to(self.rows.device)[self.rows.ids.to(torch.int64)]
            return AdapterBatch(local, len(present), device, checked=True)
        local_of = {g: i for i, g in enumerate(present)}
        local = [local_of.get(g, -1) for g in self.seq_ids]  # host lists: no reads
        if max(local) < 0:
            return None
        per_seq = rows // len(local)
        return AdapterBatch([i for i in local for _ in range(per_seq)], len(present), device,
                            checked=True)


def current(registry) -> Route | None:
    """The route of the call in progress on this thread/task, if it is for ``registry``'s
    model (a route set for one model never steers another model's layers).

    ``None`` inside code traced by ``torch.compile`` (dynamo cannot trace
    ``ContextVar.get``): a compiled region gets its ids explicitly, ``adapter_ids=``.
    """
    if torch.compiler.is_compiling():
        return None
    route = _CURRENT.get()
    return route if route is not None and route.registry is registry else None


@contextlib.contextmanager
def using(route: Route):
    """Make ``route`` the current one for the block (restored on exit, even on error)."""
    token = _CURRENT.set(route)
    try:
        yield route
    finally:
        _CURRENT.reset(token)


def enter(route: Route | None) -> object:
    """Set ``route`` until :func:`leave` (for hook pairs); returns what ``leave`` needs."""
    return _CURRENT.set(route)


def leave(token) -> None:
    _CURRENT.reset(token)
