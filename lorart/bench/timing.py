"""Wall-clock timing with a time budget: median and spread of many calls."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch


class TooSlow(Exception):
    """One call took longer than the per-call limit; the case is skipped, not timed."""


@dataclass
class Timing:
    """Seconds per call: median, quartiles, extremes and the number of samples."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @property
    def rel_spread(self) -> float:
        """Interquartile range relative to the median (0 when a single sample)."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else 0.0

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_samples(cls, samples: list[float]) -> Timing:
        if not samples:
            raise ValueError("no samples to summarize")
        s = sorted(samples)
        if len(s) >= 2:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1 = q3 = s[0]
        return cls(statistics.median(s), q1, q3, s[0], s[-1], len(s))


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for queued work on ``device`` (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def last_level_cache_bytes() -> int:
    """Size of the CPU's L3 (from sysfs); 32 MiB where it cannot be read."""
    from pathlib import Path

    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "3":
                size = (index / "size").read_text().strip().upper()
                scale = {"K": 1 << 10, "M": 1 << 20}.get(size[-1], 1)
                return int(size.rstrip("KM")) * scale
        except (OSError, ValueError):
            continue
    return 32 << 20


def cache_flusher(device: torch.device) -> Callable[[], object]:
    """A function that evicts the last-level cache by writing a buffer larger than it.

    In a model every layer has its own weights, far more than any cache, so a decode
    kernel reads its weight from memory; timing one layer in a loop would instead find
    it in L3 (a 4096x4096 4-bit weight is 9 MB) and report more than the memory
    bandwidth. The buffer is 4x the L3 on CPU and 256 MB on GPU (as
    ``triton.testing.do_bench`` does for L2).
    """
    nbytes = 256 << 20 if device.type == "cuda" else max(64 << 20, 4 * last_level_cache_bytes())
    buf = torch.empty(nbytes // 4, dtype=torch.int32, device=device)
    return buf.zero_


def measure(fn: Callable[[], object], device: torch.device, budget_s: float = 0.5,
            min_reps: int = 3, max_reps: int = 200, max_call_s: float = 10.0,
            min_sample_s: float = 1e-3, flush: Callable[[], object] | None = None) -> Timing:
    """Time ``fn()`` and summarize seconds per call.

    Warm-up calls first (compilation, caches, allocator); if one takes longer than
    ``max_call_s`` the case raises :class:`TooSlow`. Then as many samples as fit in
    ``budget_s`` (at least ``min_reps``, at most ``max_reps``); calls shorter than
    ``min_sample_s`` are repeated inside one sample so the clock's resolution and the
    loop's overhead stay small against what is measured. With ``flush`` (see
    :func:`cache_flusher`) every sample is one call on a cold cache instead, the flush
    itself untimed.
    """
    sync = synchronizer(device)
    first = float("inf")
    spent = 0.0
    # Warm up with up to 3 calls (the first pays for lazy init, caches, the allocator),
    # and size the samples from the fastest, so one slow first call does not leave a
    # fast op with too few samples.
    for _ in range(3):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        took = time.perf_counter() - start
        first, spent = min(first, took), spent + took
        if took > max_call_s:
            raise TooSlow(f"one call took {took:.1f} s > max_call_s={max_call_s:g} s")
        if spent > budget_s / 4:
            break
    per_sample = first
    if flush is not None:
        inner = 1
        start = time.perf_counter()
        flush()
        sync()
        per_sample += time.perf_counter() - start  # the budget pays for flushes too
    else:
        inner = max(1, int(min_sample_s / max(first, 1e-9)))
        per_sample *= inner
    reps = int(min(max_reps, max(min_reps, budget_s / max(per_sample, 1e-9))))
    samples = []
    for _ in range(reps):
        if flush is not None:
            flush()
        sync()
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / inner)
    return Timing.from_samples(samples)
