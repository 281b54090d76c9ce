"""The benchmark suite behind ``lorart bench``, importable from an installed lorart.

    cases     the one table of cases (shapes, rows, ranks, adapters, popularity, base)
    inputs    random inputs for a case
    impls     lorart backends and the baselines (PEFT-style torch, PEFT, torch int4, cuBLAS)
    roofline  bytes and FLOPs per case, as small pure functions
    machine   context (device, versions, commit) and the measured ceilings
    timing    median and spread under a time budget
    suite     runs cases into records (JSON-able dicts)
    e2e       end-to-end cases on SmolLM2 (generation tokens/s, training step)
    report    terminal table, JSON lines, Markdown, PNG plots
    compare   regressions between two runs, beyond noise
"""

from .cases import EndToEndCase, LayerCase, select
from .suite import RunConfig, run

__all__ = ["EndToEndCase", "LayerCase", "RunConfig", "run", "select"]
