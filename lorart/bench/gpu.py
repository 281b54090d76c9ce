"""One command for a lent GPU: check every Triton kernel at real shapes, then time it.

    python benchmarks/gpu_check.py [--out results.jsonl] [--budget-s 330]
    python benchmarks/gpu_check.py --dry-run      # tiny shapes, CPU, TRITON_INTERPRET=1

What it does, in order (about 6 minutes on one H200 at most; ``--budget-s`` stops
timing further cases once spent, and says so in their rows):

1. Ceilings, measured (:func:`lorart.bench.machine.measure_ceilings`): copy GB/s (read +
   write of 1 GiB) and bf16 matmul TFLOP/s (8192³).
2. Per case, correctness: the Triton path's output (or gradients) against
   ``lorart.reference`` in fp32, as max |error| / max |reference| (the bf16 tolerance of
   :mod:`lorart.bench.tolerance`), at the linear-layer shapes of Llama-2-7B, Llama-3-8B and
   Llama-2-70B (N×K, from :data:`lorart.bench.cases.SHAPES`), rows 1–4096, rank 16 and 64,
   1–64 adapters.
3. Per case, timing: ``triton.testing.do_bench`` median (``do_bench_cudagraph`` for
   decode, so launch overhead is not what gets measured; decode weights are rotated
   through copies totalling >= 256 MiB so the 4-bit weight is read from HBM, not L2),
   against cuBLAS base-only (``torch.matmul`` of the dequantized weight in bf16) and
   PEFT-style unfused torch (the ``peft_unfused`` baseline of :mod:`lorart.bench.impls`).
4. One table, printed last: case, time, TFLOP/s, GB/s, % of the measured ceiling
   (bandwidth for decode, matmul rate otherwise), time ratios vs cuBLAS, vs PEFT-style
   and vs "base" (the same 4-bit layer without LoRA for decode; one adapter for the
   64-adapter case), max error, and the targets marked met / not met:

   - decode (1 row) 4-bit + LoRA: >= 70% of copy bandwidth, and within 10% of the
     same 4-bit layer without LoRA (lorart base-only), i.e. LoRA costs <= 10%;
   - prefill (>= 1024 rows): within 10% of cuBLAS base-only;
   - 64 adapters at 64 rows: <= +25% over one adapter at the same rows;
   - backward on 4-bit: >= 1.5x faster than PEFT-style unfused torch.

Then the CUDA C++ decode kernels' rows (:mod:`lorart.bench.gpu_cuda`). With ``--out FILE``
every row (and a first line of run context: device, versions, date, ceilings) is written
as JSON lines.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from . import roofline
from .cases import SHAPES as LAYER_SHAPES
from .tolerance import rel_err, tolerance

# N×K of the linear layers (q/o, gate/up, down) of the models users run.
SHAPES = {model: [(s.n, s.k) for s in LAYER_SHAPES.values() if s.model == model]
          for model in ("llama2-7b", "llama3-8b", "llama2-70b")}
DRY_SHAPES = [(48, 64), (37, 128)]
TOLERANCE_BF16 = tolerance("bfloat16")
LORA_SCALE = 2.0
L2_ROTATE_BYTES = 256 << 20  # > 4x the H200's L2, so rotated weights come from HBM


@dataclass(frozen=True)
class Case:
    """One checked and timed layer call."""

    kind: str  # decode | decode_multi | multi64 | prefill | backward
    n: int
    k: int
    rows: int
    rank: int = 16
    adapters: int = 1
    weight: str = "asym-g128"  # "dense" (bf16) or "<scheme>-g<group>"

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.weight}/r{self.rank}"

    @property
    def shape(self) -> str:
        return f"{self.n}x{self.k}"


def case_list(dry: bool) -> list[Case]:
    """The cases, most important first (the time budget cuts from the end)."""
    if dry:
        (n1, k1), (n2, k2) = DRY_SHAPES
        return [
            Case("decode", n1, k1, 1, 4, weight="asym-g32"),
            Case("decode", n2, k2, 1, 8, weight="nf4-g64"),
            Case("decode", n2, k2, 1, 8, weight="sym-g32"),
            Case("decode_multi", n1, k1, 5, 4, 3, weight="asym-g32"),
            Case("multi64", n1, k1, 20, 4, 3, weight="asym-g32"),
            Case("prefill", n2, k2, 24, 8, weight="dense"),
            Case("prefill", n2, k2, 24, 8, weight="asym-g32"),
            Case("backward", n1, k1, 20, 4, weight="asym-g32"),
            Case("backward", n2, k2, 20, 8, 3, weight="nf4-g32"),
            Case("decode", n1, k1, 1, 4, weight="int8-g16"),
            Case("decode_multi", n2, k2, 5, 8, 3, weight="int8-g32"),
            Case("prefill", n1, k1, 24, 4, weight="int8-g64"),
        ]
    cases = [Case("decode", n, k, 1) for shapes in SHAPES.values() for n, k in shapes]
    cases += [
        Case("decode", 4096, 4096, 1, 64),
        Case("decode", 4096, 4096, 1, 16, weight="nf4-g64"),
        Case("decode", 4096, 4096, 1, 16, weight="sym-g32"),
        Case("decode", 4096, 4096, 1, 16, weight="int8-g32"),
        Case("decode", 4096, 4096, 4, 16),
        Case("decode_multi", 4096, 4096, 16, 16, 16),
        Case("decode_multi", 11008, 4096, 16, 16, 16),
        Case("decode_multi", 28672, 4096, 8, 64, 8),
        Case("multi64", 4096, 4096, 64, 16, 64),
        Case("multi64", 11008, 4096, 64, 16, 64),
        Case("prefill", 4096, 4096, 1024, 16, weight="dense"),
        Case("prefill", 11008, 4096, 4096, 16, weight="dense"),
        Case("prefill", 4096, 11008, 1024, 64, weight="dense"),
        Case("prefill", 4096, 4096, 1024, 16),
        Case("prefill", 11008, 4096, 4096, 16),
        Case("prefill", 28672, 4096, 1024, 16, 1, weight="sym-g128"),
        Case("backward", 4096, 4096, 1024, 16),
        Case("backward", 11008, 4096, 1024, 16),
        Case("backward", 4096, 11008, 4096, 16),
        Case("backward", 4096, 4096, 1024, 64, 8),
    ]
    return cases


# ------------------------------------------------------------------------------ inputs
def make_inputs(case: Case, device, dtype):
    """Base weight, adapter stack, adapter batch (or None) and x for one case."""
    import torch

    import lorart
    from lorart import AdapterBatch, AdapterStack

    w = torch.randn(case.n, case.k, device=device) / math.sqrt(case.k)
    if case.weight == "dense":
        base = w.to(dtype)
    else:
        scheme, group = case.weight.split("-")
        base = lorart.quantize(w, int(group[1:]), scheme, torch.float16)
    del w
    adapters = [(torch.randn(case.rank, case.k, device=device, dtype=dtype) / math.sqrt(case.k),
                 torch.randn(case.n, case.rank, device=device, dtype=dtype)
                 / math.sqrt(case.rank), LORA_SCALE) for _ in range(case.adapters)]
    stack = AdapterStack.from_list(adapters)
    batch = None
    if case.adapters > 1 or case.kind in ("decode_multi", "multi64"):
        # distinct popularity, one base-only row in eight
        ids = torch.arange(case.rows, device=device) % case.adapters
        ids[3::8] = -1
        batch = AdapterBatch(ids.to(torch.int32), case.adapters)
    x = torch.randn(case.rows, case.k, device=device, dtype=dtype)
    return base, stack, batch, x


def lora_args(stack):
    from lorart.backend.base import LoRAArgs

    return LoRAArgs(stack.a, stack.b, stack.rank_offsets_list, stack.scales.tolist())


def is_dense(base) -> bool:
    return hasattr(base, "element_size")


def weight_bytes(base) -> int:
    return base.numel() * base.element_size() if is_dense(base) else base.nbytes()


def case_work(case: Case, base, stack, x) -> tuple[int, int]:
    """``(bytes, FLOPs)`` one call must move / do at least (:mod:`lorart.bench.roofline`;
    a backward case is the backward alone)."""
    used = min(case.adapters, case.rows)
    direction = "bwd" if case.kind == "backward" else "fwd"
    nbytes = roofline.layer_bytes(case.rows, case.n, case.k, weight_bytes(base),
                                  [case.rank] * used, x.element_size(), direction=direction)
    flops = roofline.layer_flops(case.rows, case.n, case.k, [(case.rows, case.rank)],
                                 direction=direction)
    return nbytes, flops


# ------------------------------------------------------------------------------ runners
def triton_forward(case, base, stack, batch, x, dy=None):
    """The Triton backend's call for this case, as ``fn(weight)``: forward, or backward when
    ``dy`` is given (dx, dA, dB); ``stack=None`` is the base-only forward."""
    from lorart.backend import get_backend

    backend = get_backend("triton")
    lora = None if stack is None else lora_args(stack)
    if dy is not None:
        return lambda b=base: backend.backward(dy, x, b, lora, batch, True, True)
    return lambda b=base: backend.forward(x, b, None, lora, batch)


def _peft_setup(stack, batch):
    from .impls import adapter_groups

    adapters = [stack.adapter(s) for s in range(stack.num_adapters)]
    return adapters, adapter_groups(None if batch is None else batch.ids, stack.num_adapters)


def peft_forward(case, base, stack, batch, x):
    """The ``peft_unfused`` baseline: dequantize in x's dtype, matmul, then one LoRA pair
    per adapter present."""
    from .impls import unfused_lora
    from .inputs import dequantize_like_torch

    adapters, groups = _peft_setup(stack, batch)
    return lambda b=base: unfused_lora(x, x @ dequantize_like_torch(b, x.dtype).T, adapters,
                                       groups)


def peft_backward(case, base, stack, batch, x, dy):
    """The gradients autograd computes for PEFT-style unfused LoRA, written out:
    ``(dx, [(dA_s, dB_s) per adapter present])``."""
    from .inputs import dequantize_like_torch

    adapters, groups = _peft_setup(stack, batch)

    def run(b=base):
        dx = dy @ dequantize_like_torch(b, x.dtype)  # QLoRA dequantizes again in backward
        grads = []
        for s, rows in groups:
            a, bb, scale = adapters[s]
            xs, dys = (x, dy) if rows is None else (x[rows], dy[rows])
            dyb = dys @ bb
            if rows is None:
                dx = dx + scale * (dyb @ a)
            else:
                dx.index_add_(0, rows, scale * (dyb @ a))
            grads.append((scale * (dyb.T @ xs), scale * (dys.T @ (xs @ a.T))))
        return dx, grads

    return run


# ------------------------------------------------------------------------------ timing
def rotated_copies(obj, copies: int) -> list:
    """``copies`` independent copies of a weight (dense tensor or QuantizedWeight)."""
    if copies <= 1:
        return [obj]
    if is_dense(obj):
        return [obj] + [obj.clone() for _ in range(copies - 1)]
    from lorart.quant import QuantizedWeight

    return [obj] + [QuantizedWeight(obj.qweight.clone(), obj.scales.clone(),
                                    None if obj.offsets is None else obj.offsets.clone(),
                                    obj.group_size, obj.scheme) for _ in range(copies - 1)]


def bench_ms(fn, weights: list, graph: bool) -> tuple[float, str]:
    """Median ms of ``fn(weight)``, cycling through ``weights`` so each call reads fresh HBM."""
    import triton.testing

    state = {"i": 0}

    def call():
        w = weights[state["i"] % len(weights)]
        state["i"] += 1
        return fn(w)

    if graph:
        try:
            return triton.testing.do_bench_cudagraph(call, rep=50, return_mode="median"), "graph"
        except Exception as exc:  # capture can fail on some stacks: fall back, say so
            note = f"no graph ({type(exc).__name__})"
            return triton.testing.do_bench(call, warmup=25, rep=100,
                                           return_mode="median"), note
    return triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median"), "events"


def measure_ceilings(device) -> dict:
    """Copy GB/s and bf16 matmul TFLOP/s, from :func:`lorart.bench.machine.measure_ceilings`."""
    import torch

    from .machine import measure_ceilings as measure

    c = measure(device, "gpu")
    torch.cuda.empty_cache()
    return {"copy_gbps": c["copy_gbps"],
            "bf16_matmul_tflops": c["matmul_gflops"]["bfloat16"] / 1e3}


def dry_timer(fn, weights: list, graph: bool) -> tuple[float, str]:
    """Stands in for :func:`bench_ms` in ``--dry-run``: runs ``fn`` once, claims nothing."""
    fn(weights[0])
    return float("nan"), "dry"


# ------------------------------------------------------------------------------ one case
def _reference(base):
    return base.float() if is_dense(base) else base


def check_case(case: Case, device, dtype) -> tuple[float, dict]:
    """Correctness of the Triton path at this case's shape; returns (max_err, inputs)."""
    import torch

    from lorart import reference

    base, stack, batch, x = make_inputs(case, device, dtype)
    ids = None if batch is None else batch.ids
    inputs = {"base": base, "stack": stack, "batch": batch, "x": x}
    lora = (stack.a.float(), stack.b.float(), stack.rank_offsets_list, stack.scales.tolist())
    if case.kind == "backward":
        dy = torch.randn(case.rows, case.n, device=device, dtype=dtype)
        inputs["dy"] = dy
        dx, da, db = triton_forward(case, base, stack, batch, x, dy)()
        ref = reference.lora_backward(dy.float(), x.float(), _reference(base), *lora, ids)
        err = max(rel_err(dx, ref[0]), rel_err(da, ref[1]), rel_err(db, ref[2]))
        baseline = peft_backward(case, base, stack, batch, x, dy)()[0]
    else:
        y = triton_forward(case, base, stack, batch, x)()
        ref = reference.lora_forward(x.float(), _reference(base), None, *lora, ids)
        err = rel_err(y, ref)
        baseline = peft_forward(case, base, stack, batch, x)()
        if case.kind == "decode":  # the base-only path of the same kernel, checked too
            ref0 = reference.lora_forward(x.float(), _reference(base), None, None, None, [0],
                                          [], None)
            err = max(err, rel_err(triton_forward(case, base, None, None, x)(), ref0))
    inputs["baseline_err"] = rel_err(baseline, ref[0] if case.kind == "backward" else ref)
    return err, inputs


def time_case(case: Case, inputs: dict, ceilings: dict, timer=bench_ms,
              rotate_bytes: int = L2_ROTATE_BYTES) -> dict:
    """Times of the Triton path and its baselines, in ms, plus rates and target verdicts.

    ``timer(fn, weights, graph) -> (median ms, how)``; ``rotate_bytes`` sizes the weight
    rotation that keeps decode reads in HBM (0 in a dry run).
    """
    import torch

    from .inputs import dequantize_like_torch

    base, stack, batch, x = inputs["base"], inputs["stack"], inputs["batch"], inputs["x"]
    graph = case.kind in ("decode", "decode_multi")

    def rotated(w):
        return rotated_copies(w, max(1, math.ceil(rotate_bytes / weight_bytes(w))) if graph
                              else 1)

    weights = rotated(base)
    out: dict = {}
    if case.kind == "backward":
        dy = inputs["dy"]
        out["time_ms"], out["timer"] = timer(triton_forward(case, base, stack, batch, x, dy),
                                             weights, graph)
        out["peft_ms"], _ = timer(peft_backward(case, base, stack, batch, x, dy), weights,
                                  graph)
    else:
        out["time_ms"], out["timer"] = timer(triton_forward(case, base, stack, batch, x),
                                             weights, graph)
        out["peft_ms"], _ = timer(peft_forward(case, base, stack, batch, x), weights, graph)
        if case.kind == "decode" and not is_dense(base):
            base_only = triton_forward(case, base, None, None, x)
            out["base_only_ms"], _ = timer(base_only, weights, graph)
        if case.kind == "multi64":  # the same rows with one adapter: the multi-adapter cost
            one = Case(case.kind, case.n, case.k, case.rows, case.rank, 1, case.weight)
            b1, s1, _, x1 = make_inputs(one, x.device, x.dtype)
            out["one_adapter_ms"], _ = timer(triton_forward(one, b1, s1, None, x1), [b1], graph)
    dense = dequantize_like_torch(base, x.dtype).contiguous()
    out["cublas_ms"], _ = timer(lambda w: x @ w.T, rotated(dense), graph)
    del weights, dense
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    nbytes, flops = case_work(case, base, stack, x)
    sec = out["time_ms"] * 1e-3
    out["gbps"] = nbytes / sec / 1e9
    out["tflops"] = flops / sec / 1e12
    if graph:
        out["pct_ceiling"] = 100 * out["gbps"] / ceilings["copy_gbps"]
        out["ceiling"] = "bandwidth"
    else:
        out["pct_ceiling"] = 100 * out["tflops"] / ceilings["bf16_matmul_tflops"]
        out["ceiling"] = "bf16 matmul"
    out["vs_cublas"] = out["time_ms"] / out["cublas_ms"]
    out["vs_peft"] = out["time_ms"] / out["peft_ms"]
    # The same layer without the extra work: lorart base-only (decode), one adapter (multi64).
    own = out.get("base_only_ms") or out.get("one_adapter_ms")
    out["vs_base"] = out["time_ms"] / own if own else None
    out.update(target_verdict(case, out))
    return out


def target_verdict(case: Case, t: dict) -> dict:
    """The target this case is judged by, and whether it is met (see the module doc)."""
    if case.kind == "decode" and case.rows == 1 and "base_only_ms" in t:
        goal = "bw>=70% & <=1.10x base-only"
        met = t["pct_ceiling"] >= 70 and t["time_ms"] <= 1.10 * t["base_only_ms"]
    elif case.kind == "prefill" and case.rows >= 1024:
        goal, met = "<=1.10x cuBLAS", t["time_ms"] <= 1.10 * t["cublas_ms"]
    elif case.kind == "multi64":
        goal, met = "<=1.25x one adapter", t["time_ms"] <= 1.25 * t["one_adapter_ms"]
    elif case.kind == "backward" and case.weight != "dense":
        goal, met = ">=1.5x PEFT", t["peft_ms"] >= 1.5 * t["time_ms"]
    else:
        return {"target": "", "target_met": None}
    return {"target": goal, "target_met": bool(met)}


# ------------------------------------------------------------------------------ CUDA rows
CUDA_ROW_KEYS = ("name", "shape", "rows", "adapters", "time_ms", "gbps", "tflops", "max_err",
                 "ok", "note")


def cuda_rows(dry: bool, suite: Callable[[bool], list[dict]] | None = None) -> list[dict]:
    """The CUDA decode kernels' rows (``suite(dry)``, default :func:`gpu_cuda.cuda_suite`),
    each with every key of ``CUDA_ROW_KEYS``; a failing suite becomes one row, not a crash."""
    if suite is None:
        from .gpu_cuda import cuda_suite as suite
    try:
        rows = list(suite(dry))
    except Exception as exc:
        return [{"name": "cuda_suite", "shape": "", "rows": 0, "adapters": 0, "time_ms": None,
                 "gbps": None, "tflops": None, "max_err": float("nan"), "ok": False,
                 "note": f"cuda_suite failed: {type(exc).__name__}: {exc}", "source": "cuda"}]
    out = []
    for row in rows:
        missing = [k for k in CUDA_ROW_KEYS if k not in row]
        row = {k: row.get(k) for k in CUDA_ROW_KEYS} | {"source": "cuda"}
        if missing:
            row["ok"] = False
            row["note"] = f"{row.get('note') or ''} (row lacks {', '.join(missing)})".strip()
        out.append(row)
    return out


# ------------------------------------------------------------------------------ report
def fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def print_table(rows: list[dict], ceilings: dict | None) -> None:
    if ceilings:
        print(f"\nceilings: copy {ceilings['copy_gbps']:.0f} GB/s, bf16 matmul "
              f"{ceilings['bf16_matmul_tflops']:.0f} TFLOP/s")
    head = (f"{'case':<28} {'shape':>11} {'rows':>5} {'ad':>3} {'ms':>9} {'TFLOP/s':>8} "
            f"{'GB/s':>7} {'%ceil':>6} {'/cuBLAS':>8} {'/PEFT':>7} {'/base':>6} {'maxerr':>8} "
            f"{'ok':>3}  target")
    print(head)
    print("-" * len(head))
    for r in rows:
        verdict = ""
        if r.get("target"):
            met = r.get("target_met")
            verdict = f"{r['target']}: " + ("not judged" if met is None else
                                            "met" if met else "NOT met")
        name = ("cuda:" if r.get("source") == "cuda" else "") + str(r["name"])
        print(f"{name:<28} {str(r.get('shape') or ''):>11} {fmt(r.get('rows'), 'd'):>5} "
              f"{fmt(r.get('adapters'), 'd'):>3} "
              f"{fmt(r.get('time_ms'), '.4f'):>9} {fmt(r.get('tflops'), '.1f'):>8} "
              f"{fmt(r.get('gbps'), '.0f'):>7} {fmt(r.get('pct_ceiling'), '.0f'):>6} "
              f"{fmt(r.get('vs_cublas'), '.2f'):>8} {fmt(r.get('vs_peft'), '.2f'):>7} "
              f"{fmt(r.get('vs_base'), '.2f'):>6} "
              f"{fmt(r.get('max_err'), '.1e'):>8} {'yes' if r.get('ok') else 'NO':>3}  "
              f"{verdict}{('  ' + r['note']) if r.get('note') else ''}")


def run_context(device, ceilings) -> dict:
    from .machine import context

    return {"context": context(device) | {
        "interpreter": os.environ.get("TRITON_INTERPRET") == "1", "ceilings": ceilings}}


def run_case(case: Case, device, dtype, ceilings, dry: bool, timed: bool) -> dict:
    """One table row: correctness, then timing (unless ``dry`` or not ``timed``)."""
    row = {"name": case.name, "shape": case.shape, "rows": case.rows,
           "adapters": case.adapters, "rank": case.rank, "source": "triton", "note": ""}
    try:
        err, inputs = check_case(case, device, dtype)
        row["max_err"], row["ok"] = err, err <= TOLERANCE_BF16
        row["baseline_err"] = inputs["baseline_err"]
        if not row["baseline_err"] <= TOLERANCE_BF16:
            row["note"] = f"PEFT baseline off by {row['baseline_err']:.1e}; "
        if dry:  # run every timed callable once; record no times
            t = time_case(case, inputs, {"copy_gbps": 1.0, "bf16_matmul_tflops": 1.0},
                          timer=dry_timer, rotate_bytes=0)
            row["target"] = t["target"]
            row["note"] += "dry run: interpreter, not timed"
        elif not timed:
            row["note"] += "not timed: time budget spent"
        else:
            row.update(time_case(case, inputs, ceilings))
    except Exception as exc:  # one failing case must not hide the others
        row.update(ok=False, max_err=float("nan"), note=f"{type(exc).__name__}: {exc}")
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on CPU under TRITON_INTERPRET=1; no timing")
    parser.add_argument("--out", help="write JSON lines here")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="stop timing new cases after this many seconds")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --dry-run to check the script itself",
              file=sys.stderr)
        return 2
    start = time.monotonic()
    device = torch.device("cpu" if args.dry_run else "cuda")
    ceilings = None if args.dry_run else measure_ceilings(device)
    if ceilings:
        print(f"ceilings measured in {time.monotonic() - start:.0f}s: {ceilings}", flush=True)
    rows = []
    for case in case_list(args.dry_run):
        torch.manual_seed(0)
        row = run_case(case, device, torch.bfloat16, ceilings, args.dry_run,
                       timed=time.monotonic() - start <= args.budget_s)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"[{time.monotonic() - start:6.1f}s] {case.name} {case.shape} rows={case.rows} "
              f"adapters={case.adapters}: err={fmt(row.get('max_err'), '.1e')} "
              f"ms={fmt(row.get('time_ms'), '.4f')} {row['note']}", flush=True)
    rows += cuda_rows(args.dry_run)
    print_table(rows, ceilings)
    if args.out:
        import json

        with open(args.out, "w") as f:
            f.write(json.dumps(run_context(device, ceilings)) + "\n")
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"\ntotal {time.monotonic() - start:.0f}s; "
          f"{sum(1 for r in rows if not r.get('ok'))} case(s) not ok")
    return 0 if all(r.get("ok") for r in rows) else 1
