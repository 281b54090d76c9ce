"""Run cases through every implementation and turn timings into records (plain dicts).

A record is one JSON line: the case's parameters, one implementation's timing, the
roofline numbers, its speedup against each baseline (lorart rows), and the full
context (machine, versions, commit, date) and measured ceilings, so a line read alone
says what it measured and where.
"""

from __future__ import annotations

import contextlib
import gc
import re
import sys
from dataclasses import dataclass

import torch

from . import e2e, roofline, serve
from .cases import Case, EndToEndCase, LayerCase
from .impls import BASE_ONLY, Impl, all_impls, forced_backend
from .inputs import LayerInputs, make_inputs
from .machine import context, measure_ceilings, peak_gflops
from .timing import TooSlow, cache_flusher, measure

SCHEMA = "lorart.bench/1"
# An implementation whose output differs from the first baseline's by more than this
# (max abs error / max abs value) is flagged "mismatch": the benchmark would be timing
# a different computation. 4-bit bases in bf16 stay well under 1e-2 in practice.
MISMATCH_REL = 5e-2


@dataclass
class RunConfig:
    """How to time: per-implementation budget, bounds on samples, a per-call limit."""

    mode: str = "quick"
    device: torch.device = torch.device("cpu")
    budget_s: float = 0.5
    min_reps: int = 3
    max_reps: int = 200
    max_call_s: float = 10.0
    impl_pattern: str | None = None
    seed: int = 0
    progress: bool = True
    cold_cache: bool = True  # evict the last-level cache before each layer sample

    def impls(self) -> list[Impl]:
        impls = all_impls(self.device)
        if self.impl_pattern:
            rx = re.compile(self.impl_pattern)
            impls = [i for i in impls if rx.search(i.name)]
        return impls


def run(cases: list[Case], cfg: RunConfig) -> tuple[list[dict], dict, dict]:
    """``(records, ceilings, context)`` for ``cases``; ceilings are measured first."""
    from tqdm.auto import tqdm

    ctx = context(cfg.device)
    ceilings = measure_ceilings(cfg.device, cfg.mode)
    impls = cfg.impls()
    flush = cache_flusher(cfg.device) if cfg.cold_cache else None
    total = sum(len(impls) if isinstance(c, LayerCase) else 1 for c in cases)
    records: list[dict] = []
    with tqdm(total=total, desc="lorart bench", unit="run", file=sys.stderr,
              disable=not cfg.progress, dynamic_ncols=True) as bar:
        for case in cases:
            bar.set_postfix_str(case.id, refresh=True)
            if isinstance(case, EndToEndCase):
                runner = serve.run_case if case.task == "serve" else e2e.run_case
                recs = runner(case, cfg)
                bar.update(1)
            else:
                recs = _run_layer_case(case, impls, cfg, ceilings, bar, flush)
            for rec in recs:
                rec["cold_cache"] = cfg.cold_cache and case.kind == "layer"
                rec["context"] = ctx
                rec["ceilings"] = ceilings
            records += recs
    return records, ceilings, ctx


def base_record(case: Case, impl: str, impl_kind: str) -> dict:
    return {"schema": SCHEMA, "kind": case.kind, "case": case.id, "impl": impl,
            "impl_kind": impl_kind, "params": case.describe(), "status": "ok", "reason": None}


def case_work(case: LayerCase, inp: LayerInputs) -> tuple[int, int]:
    """``(bytes, FLOPs)`` one call of ``case`` must move and do at the least."""
    k, n, m = case.shape.k, case.shape.n, case.rows
    elem = inp.x.element_size()
    if case.base == "q4":
        qw = inp.qweight
        weight = roofline.q4_weight_bytes(n, k, case.group_size, qw.scales.element_size(),
                                          qw.offsets is not None)
    else:
        weight = roofline.dense_weight_bytes(n, k, elem)
    used = inp.used_adapters()
    nbytes = roofline.layer_bytes(m, n, k, weight, [r for _, r in used], elem,
                                  direction=case.direction)
    flops = roofline.layer_flops(m, n, k, used, direction=case.direction)
    return nbytes, flops


def add_rates(rec: dict, nbytes: int, flops: int, ceilings: dict, dtype: str) -> None:
    """GB/s, GFLOP/s and their share of the measured ceilings, from ``rec['time_s']``."""
    sec = rec["time_s"]["median"]
    bandwidth = ceilings["read_gbps"] * 1e9
    peak = peak_gflops(ceilings, dtype) * 1e9
    rec["gbps"] = nbytes / sec / 1e9
    rec["gflops"] = flops / sec / 1e9
    rec["pct_bandwidth"] = 100 * nbytes / sec / bandwidth
    rec["pct_peak"] = 100 * flops / sec / peak
    rec["pct_roofline"] = 100 * roofline.roofline_seconds(nbytes, flops, bandwidth, peak) / sec


def _rel_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.float(), ref.float()
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def _run_layer_case(case: LayerCase, impls: list[Impl], cfg: RunConfig, ceilings: dict,
                    bar, flush=None) -> list[dict]:
    try:
        inp = make_inputs(case, cfg.device, cfg.seed)
    except Exception as exc:  # e.g. out of memory for the biggest shapes
        bar.update(len(impls))
        rec = base_record(case, "*", "case")
        rec.update(status="error", reason=f"building inputs failed: {type(exc).__name__}: {exc}")
        return [rec]
    nbytes, flops = case_work(case, inp)
    records = []
    reference = None
    for impl in impls:
        rec = base_record(case, impl.name, impl.kind)
        rec.update(bytes=nbytes, flops=flops)
        records.append(rec)
        try:
            with forced_backend(impl.backend):
                fn = impl.prepare(case, inp, cfg.device)
                if isinstance(fn, str):
                    rec.update(status="skipped", reason=fn)
                    continue
                # Inference is timed as users run it: without autograd bookkeeping.
                with torch.no_grad() if case.direction == "fwd" else contextlib.nullcontext():
                    timing = measure(fn, cfg.device, cfg.budget_s, cfg.min_reps,
                                     cfg.max_reps, cfg.max_call_s, flush=flush)
                    out = fn() if case.direction == "fwd" else None
        except TooSlow as exc:
            rec.update(status="skipped", reason=str(exc))
            continue
        except Exception as exc:  # one broken implementation must not stop the suite
            rec.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
            continue
        finally:
            bar.update(1)
        rec["time_s"] = timing.as_dict()
        add_rates(rec, nbytes, flops, ceilings, case.dtype)
        if isinstance(out, torch.Tensor) and impl.name not in BASE_ONLY:
            if reference is None:
                reference = (impl.name, out)
            else:
                err = _rel_error(out, reference[1])
                rec["check"] = {"against": reference[0], "max_rel_err": err,
                                "ok": err <= MISMATCH_REL}
                if err > MISMATCH_REL:
                    rec["status"] = "mismatch"
        del fn, out
    add_speedups(records)
    del inp, reference
    gc.collect()
    return records


def add_speedups(records: list[dict]) -> None:
    """``rec['speedup'][baseline] = baseline median / this median`` for every lorart record."""
    baselines = {r["impl"]: r["time_s"]["median"] for r in records
                 if r["impl_kind"] == "baseline" and r["status"] == "ok"}
    for rec in records:
        if rec["impl_kind"] == "lorart" and rec["status"] in ("ok", "mismatch"):
            sec = rec["time_s"]["median"]
            rec["speedup"] = {name: base / sec for name, base in baselines.items()}
