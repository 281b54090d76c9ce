"""The adapter pool: three tiers, reference counts, loading off the step path.

    disk      registered PEFT directories (``add_path``) and directories scanned by name
              (``add_dir``: a request for ``name`` loads ``<dir>/<name>`` on first use)
    host      ``AdapterWeights`` in memory, at most ``max_host_adapters`` and
              ``host_bytes_cap`` bytes; LRU eviction of adapters that can be re-read from
              disk and that no request references. Pushed tensors (``push``) have no disk
              copy: they stay until removed or replaced.
    resident  ``ResidentSlots``: what the kernels read; filled per step by
              ``ensure_resident`` (LRU over slots not used by the step).

Versions, not names, are what requests hold: ``resolve`` binds a request to the current
``AdapterWeights`` object of each name it uses (after its load finished, if one was
needed) and counts a reference on it. Replacing or removing a name makes later
requests see the new state; requests already bound finish on the version they hold,
so one request never mixes old and new weights. Disk reads run in a loader thread;
``poll`` (called by the engine between steps) installs finished loads.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import adapter_weights as aw
from .errors import AdapterLoadError, InvalidRequestError, UnknownAdapterError
from .resident import ResidentSlots

BASE_NAMES = (None, "", "base", "__base__")


@dataclass(eq=False)
class Entry:
    name: str
    source: str | None                      # directory it is read from; None: pushed
    weights: AdapterWeights | None = None   # host copy of the current version
    loading: Future | None = None
    last_used: float = field(default_factory=time.monotonic)


AdapterWeights = aw.AdapterWeights


@dataclass(eq=False)
class AdapterRef:
    """A request's adapter: ``parts`` ``[(name, weight)]`` (empty = base model); ``weights``
    once bound; ``error`` if a load failed."""

    parts: list[tuple[str, float]]
    weighted: bool = False
    weights: AdapterWeights | None = None
    waiting: set[str] = field(default_factory=set)
    error: Exception | None = None
    released: bool = False

    @property
    def is_base(self) -> bool:
        return not self.parts

    @property
    def ready(self) -> bool:
        return self.is_base or self.weights is not None


class AdapterPool:
    def __init__(self, model, shapes: dict[str, tuple[int, int]], slots: ResidentSlots,
                 max_host_adapters: int = 64, host_bytes_cap: int | None = None,
                 on_loaded=None) -> None:
        self.model, self.shapes, self.slots = model, shapes, slots
        self.max_host_adapters = max_host_adapters
        self.host_bytes_cap = host_bytes_cap
        self.entries: dict[str, Entry] = {}
        self.dirs: list[Path] = []
        self.refs: Counter[AdapterWeights] = Counter()
        self._pending: list[AdapterRef] = []
        self._combos: dict[tuple, AdapterWeights] = {}
        self._lock = threading.RLock()
        self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lorart-adapter-load")
        self._on_loaded = on_loaded
        self._slot_used = [0] * slots.num_slots  # step counter of last use, for LRU
        self._step = 0
        self.disk_loads = self.host_evictions = 0
        self.slot_writes = self.slot_evictions = 0

    # ---------------------------------------------------------------- registration
    def add_path(self, name: str, path) -> None:
        """Register ``path`` under ``name``, reading and validating it now (caller thread)."""
        _check_name(name)
        weights = aw.read_dir(name, path, self.model, self.shapes)
        self._install(name, weights, source=str(path))

    def push(self, name: str, tensors: dict, config: dict) -> None:
        """Register in-memory PEFT tensors (e.g. from a training loop); replaces ``name``."""
        _check_name(name)
        if not isinstance(config, dict):
            raise AdapterLoadError(f"adapter {name!r}: config must be a dict (PEFT "
                                   f"adapter_config.json fields), got {type(config).__name__}")
        weights = aw.from_tensors(name, tensors, config, self.model, self.shapes)
        self._install(name, weights, source=None)

    def add_dir(self, directory) -> None:
        d = Path(directory)
        if not d.is_dir():
            raise AdapterLoadError(f"adapter directory {str(d)!r} is not a directory",
                                   param="directory")
        with self._lock:
            if d not in self.dirs:
                self.dirs.append(d)

    def remove(self, name: str) -> None:
        with self._lock:
            if name not in self.entries:
                raise UnknownAdapterError(f"adapter {name!r} is not registered")
            del self.entries[name]  # bound requests keep their AdapterWeights object

    def _install(self, name: str, weights: AdapterWeights, source: str | None) -> None:
        self._check_rank(weights)
        with self._lock:
            entry = self.entries.get(name)
            if entry is None:
                entry = self.entries[name] = Entry(name, source)
            entry.source, entry.weights, entry.loading = source, weights, None
            entry.last_used = time.monotonic()
            self._enforce_host_cap()

    def _check_rank(self, weights: AdapterWeights) -> None:
        if weights.rank > self.slots.max_rank:
            raise AdapterLoadError(f"adapter {weights.name!r} has rank {weights.rank}, more "
                                   f"than the engine's max_lora_rank={self.slots.max_rank}")

    # ---------------------------------------------------------------- requests
    def resolve(self, spec) -> AdapterRef:
        """An ``AdapterRef`` for ``spec`` (None | name | [(name, weight), ...]); raises
        ``UnknownAdapterError``/``InvalidRequestError``. Starts loads it needs."""
        parts, weighted = _parse_spec(spec)
        ref = AdapterRef(parts, weighted)
        if not parts:
            return ref
        with self._lock:
            for name, _ in parts:
                entry = self._find(name)
                entry.last_used = time.monotonic()
                if entry.weights is None:
                    ref.waiting.add(name)
                    self._start_load(entry)
            if ref.waiting:
                self._pending.append(ref)
            else:
                self._bind(ref)
                if ref.error is not None:
                    raise ref.error
        return ref

    def release(self, ref: AdapterRef) -> None:
        """Drop the request's reference (idempotent)."""
        with self._lock:
            if ref.released:
                return
            ref.released = True
            if ref in self._pending:
                self._pending.remove(ref)
            if ref.weights is not None:
                self.refs[ref.weights] -= 1
                if self.refs[ref.weights] <= 0:
                    del self.refs[ref.weights]
                    self._drop_combo(ref.weights)

    def _find(self, name: str) -> Entry:
        entry = self.entries.get(name)
        if entry is not None:
            return entry
        for d in self.dirs:
            if (d / name / "adapter_config.json").exists():
                entry = self.entries[name] = Entry(name, str(d / name))
                return entry
        raise UnknownAdapterError(f"adapter {name!r} is not registered and not found in "
                                  f"{[str(d) for d in self.dirs] or 'any adapter directory'}")

    def _start_load(self, entry: Entry) -> None:
        if entry.loading is None:
            entry.loading = self._loader.submit(aw.read_dir, entry.name, entry.source,
                                                self.model, self.shapes)
            if self._on_loaded is not None:
                entry.loading.add_done_callback(lambda _f: self._on_loaded())

    def _bind(self, ref: AdapterRef) -> None:
        parts = [(self.entries[n].weights, w) for n, w in ref.parts]
        if not ref.weighted:
            weights = parts[0][0]
        else:
            key = tuple((id(wt), w) for wt, w in parts)
            weights = self._combos.get(key)
            if weights is None:
                weights = aw.combine(parts)
                try:
                    self._check_rank(weights)
                except AdapterLoadError as exc:
                    ref.error = exc
                    return
                weights.combo_key = key
                self._combos[key] = weights
        ref.weights = weights
        self.refs[weights] += 1

    def _drop_combo(self, weights: AdapterWeights) -> None:
        key = getattr(weights, "combo_key", None)
        if key is not None and self._combos.get(key) is weights and weights not in \
                self.slots.holder:
            del self._combos[key]

    def loads_finished(self) -> bool:
        """Whether a background load has finished and waits for :meth:`poll` to install it
        (the engine's idle loop must step then, or a lone waiting request would hang)."""
        with self._lock:
            return any(e.loading is not None and e.loading.done() for e in self.entries.values())

    def poll(self) -> list[AdapterRef]:
        """Install finished loads (engine thread). Returns refs that failed (``.error``)."""
        failed = []
        with self._lock:
            for entry in list(self.entries.values()):
                fut = entry.loading
                if fut is None or not fut.done():
                    continue
                entry.loading = None
                exc = fut.exception()
                if exc is None:
                    try:
                        self._check_rank(fut.result())
                        entry.weights = fut.result()
                        self.disk_loads += 1
                    except AdapterLoadError as e:
                        exc = e
                for ref in list(self._pending):
                    if entry.name not in ref.waiting:
                        continue
                    if exc is not None:
                        ref.error = exc if isinstance(exc, AdapterLoadError) else \
                            AdapterLoadError(f"adapter {entry.name!r}: {exc}")
                        ref.waiting.clear()
                    else:
                        ref.waiting.discard(entry.name)
                    if not ref.waiting:
                        self._pending.remove(ref)
                        if ref.error is None:
                            self._bind(ref)
                        if ref.error is not None:
                            failed.append(ref)
                # A failed read leaves the entry without weights: a later request retries.
            self._enforce_host_cap()
        return failed

    # ---------------------------------------------------------------- host tier
    def host_bytes(self) -> int:
        return sum(e.weights.nbytes for e in self.entries.values() if e.weights is not None)

    def _enforce_host_cap(self) -> None:
        def over() -> bool:
            held = [e for e in self.entries.values() if e.weights is not None]
            return len(held) > self.max_host_adapters or (
                self.host_bytes_cap is not None and self.host_bytes() > self.host_bytes_cap)

        while over():
            victims = [e for e in self.entries.values()
                       if e.weights is not None and e.source is not None
                       and self.refs.get(e.weights, 0) == 0 and e.weights not in self.slots.holder]
            if not victims:
                return  # everything left is referenced or pushed: allowed over the cap
            victim = min(victims, key=lambda e: e.last_used)
            victim.weights = None
            self.host_evictions += 1

    # ---------------------------------------------------------------- resident tier
    def ensure_resident(self, needed: list[AdapterWeights]) -> dict[AdapterWeights, int]:
        """Segment id of each adapter in ``needed`` (at most ``num_slots`` distinct), writing
        missing ones into free or least recently used slots not needed now."""
        self._step += 1
        holder = self.slots.holder
        out = {}
        for w in needed:
            if w in holder:
                slot = holder.index(w)
                self._slot_used[slot] = self._step
                out[w] = self.slots.segment(slot)
        for w in needed:
            if w in out:
                continue
            free = [s for s, h in enumerate(holder) if h is None]
            if free:
                slot = free[0]
            else:  # LRU among slots this step does not use (the scheduler keeps one free)
                slot = min((s for s in range(len(holder)) if self._slot_used[s] != self._step),
                           key=lambda s: self._slot_used[s])
                self.slot_evictions += 1
            old = holder[slot]
            self.slots.write(slot, w)
            self.slot_writes += 1
            if old is not None:
                with self._lock:
                    if self.refs.get(old, 0) == 0:
                        self._drop_combo(old)
            self._slot_used[slot] = self._step
            out[w] = self.slots.segment(slot)
        return out

    def resident_names(self) -> set[str]:
        with self._lock:
            return {n for n, e in self.entries.items()
                    if e.weights is not None and e.weights in self.slots.holder}

    def scan_dirs(self) -> list[tuple[str, str]]:
        """``(name, path)`` of adapter directories found under the registered dirs."""
        found = []
        for d in self.dirs:
            for sub in sorted(d.iterdir()) if d.is_dir() else []:
                if (sub / "adapter_config.json").exists():
                    found.append((sub.name, str(sub)))
        return found

    def shutdown(self) -> None:
        self._loader.shutdown(wait=True, cancel_futures=True)


def _check_name(name) -> None:
    if not isinstance(name, str) or not name or name in BASE_NAMES or "/" in name:
        raise InvalidRequestError(f"adapter name must be a non-empty string without '/' and "
                                  f"not one of the base names {BASE_NAMES[1:]}; got {name!r}",
                                  param="name")


def _parse_spec(spec) -> tuple[list[tuple[str, float]], bool]:
    if spec in BASE_NAMES:
        return [], False
    if isinstance(spec, str):
        return [(spec, 1.0)], False
    bad = InvalidRequestError(
        f"adapter must be None, a name, or a list of (name, weight) pairs; got {spec!r}",
        param="adapter")
    if not isinstance(spec, list | tuple) or not spec:
        raise bad
    parts = []
    for item in spec:
        if not isinstance(item, list | tuple) or len(item) != 2:
            raise bad
        name, w = item
        if not isinstance(name, str) or name in BASE_NAMES:
            raise bad
        if not isinstance(w, int | float) or isinstance(w, bool) or not math.isfinite(w):
            raise InvalidRequestError(f"adapter weight for {name!r} must be a finite number, "
                                      f"got {w!r}", param="adapter")
        parts.append((name, float(w)))
    if len({n for n, _ in parts}) != len(parts):
        raise InvalidRequestError(f"adapter lists {spec!r} name an adapter twice",
                                  param="adapter")
    return parts, True
