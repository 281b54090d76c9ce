"""pytest-benchmark over the same case table as ``lorart bench`` (``lorart/bench/cases.py``).

    pytest benchmarks/bench_suite.py                                # quick cases
    LORART_BENCH_MODE=tiny pytest benchmarks/bench_suite.py         # seconds
    LORART_BENCH_MODE=full LORART_BENCH_CASES='llama3-8b' pytest benchmarks/bench_suite.py
    pytest benchmarks/bench_suite.py -k 'lorart or peft_unfused' --benchmark-json out.json

``LORART_BENCH_BUDGET`` (seconds per test, default 0.5) sizes the rounds; every round is
one call after the last-level cache was evicted.

One test per (case, implementation): each lorart backend and each baseline of
``lorart.bench.impls``; an implementation that cannot run a case is skipped with the
reason. ``extra_info`` carries the case, its ideal bytes and FLOPs, so GB/s and FLOP/s
can be derived from the saved JSON. ``lorart bench`` adds the measured ceilings, the
speedup columns, the plots and ``--compare``; this file lets ``pytest benchmarks/``
cover the same cases with pytest-benchmark's own statistics and storage.
"""

from __future__ import annotations

import contextlib
import os
import time

import pytest
import torch

from lorart.bench import cases as case_table
from lorart.bench.impls import all_impls, forced_backend
from lorart.bench.inputs import make_inputs
from lorart.bench.suite import case_work
from lorart.bench.timing import cache_flusher, synchronizer

MODE = os.environ.get("LORART_BENCH_MODE", "quick")
DEVICE = torch.device(os.environ.get("LORART_BENCH_DEVICE")
                      or ("cuda" if torch.cuda.is_available() else "cpu"))
CASES = [c for c in case_table.select(MODE, os.environ.get("LORART_BENCH_CASES"))
         if c.kind == "layer"]
IMPLS = all_impls(DEVICE)
ROUND_BUDGET_S = float(os.environ.get("LORART_BENCH_BUDGET", "0.5"))
_EVICT = cache_flusher(DEVICE)


def _flush() -> None:
    _EVICT()  # pytest-benchmark reads a setup's return value as arguments: return None
# Case-major order, so the inputs of one case are built once and dropped before the next.
PAIRS = [pytest.param(case, impl, id=f"{case.id}|{impl.name}") for case in CASES
         for impl in IMPLS]


@pytest.fixture(scope="module")
def inputs_of():
    cache: dict = {}

    def get(case):
        if case.id not in cache:
            cache.clear()
            cache[case.id] = make_inputs(case, DEVICE)
        return cache[case.id]

    yield get
    cache.clear()


@pytest.mark.parametrize("case, impl", PAIRS)
def test_case(benchmark, inputs_of, case, impl):
    inp = inputs_of(case)
    nbytes, flops = case_work(case, inp)
    benchmark.extra_info.update(case=case.id, impl=impl.name, params=case.describe(),
                                bytes=nbytes, flops=flops, device=str(DEVICE))
    sync = synchronizer(DEVICE)
    with forced_backend(impl.backend):
        fn = impl.prepare(case, inp, DEVICE)
        if isinstance(fn, str):
            pytest.skip(fn)

        def call():
            fn()
            sync()

        grad = torch.no_grad() if case.direction == "fwd" else contextlib.nullcontext()
        with grad:
            start = time.perf_counter()
            call()  # warm-up: lazy init and the allocator are not what we time
            call()
            per_call = (time.perf_counter() - start) / 2
            # One call per round on a cold last-level cache (the untimed setup evicts it),
            # as lorart bench does: in a model no layer's weight stays in cache.
            rounds = int(min(200, max(5, ROUND_BUDGET_S / max(per_call, 1e-6))))
            benchmark.pedantic(call, setup=_flush, rounds=rounds, iterations=1)
