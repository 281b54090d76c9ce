"""One command for a lent GPU: check every Triton kernel at real shapes, then time it.

    python benchmarks/gpu_check.py [--out results.jsonl] [--budget-s 330]
    python benchmarks/gpu_check.py --dry-run      # tiny shapes, CPU, TRITON_INTERPRET=1

What it does, in order (about 6 minutes on one H200 at most; ``--budget-s`` stops
timing further cases once spent, and says so in their rows):

1. Ceilings, measured: device-to-device copy GB/s (read + write of 1 GiB) and large
   bf16 matmul TFLOP/s (8192³).
2. Per case, correctness: the Triton path's output (or gradients) against
   ``lorart.reference`` in fp32, as max |error| / max |reference| (bf16 tolerance
   1.6e-2, the test suite's table), at the linear-layer shapes of Llama-2-7B,
   Llama-3-8B and Llama-2-70B (N×K), rows 1–4096, rank 16 and 64, 1–64 adapters.
3. Per case, timing: ``triton.testing.do_bench`` median (``do_bench_cudagraph`` for
   decode, so launch overhead is not what gets measured; decode weights are rotated
   through copies totalling >= 256 MiB so the 4-bit weight is read from HBM, not L2),
   against cuBLAS base-only (``torch.matmul`` of the dequantized weight in bf16) and
   PEFT-style unfused torch (dequantize in bf16 + matmul + per-adapter LoRA matmuls).
4. One table, printed last: case, time, TFLOP/s, GB/s, % of the measured ceiling
   (bandwidth for decode, matmul rate otherwise), time ratios vs cuBLAS, vs PEFT-style
   and vs "base" (the same 4-bit layer without LoRA for decode; one adapter for the
   64-adapter case), max error, and the targets marked met / not met:

   - decode (1 row) 4-bit + LoRA: >= 70% of copy bandwidth, and within 10% of the
     same 4-bit layer without LoRA (lorart base-only), i.e. LoRA costs <= 10%;
   - prefill (>= 1024 rows): within 10% of cuBLAS base-only;
   - 64 adapters at 64 rows: <= +25% over one adapter at the same rows;
   - backward on 4-bit: >= 1.5x faster than PEFT-style unfused torch.

With ``--out FILE`` every row (and a first line of run context: device, versions,
date, ceilings) is written as JSON lines.

CUDA suite contract (the CUDA C++ decode kernels' engineer owns that file): if
``benchmarks/gpu_check_cuda.py`` exists and defines ``cuda_suite(dry: bool) ->
list[dict]``, it is imported and called after the Triton cases with ``dry`` = whether
this is a ``--dry-run``; each dict is one table row with keys ``name`` (str), ``shape``
(str, "N×K"), ``rows`` (int), ``adapters`` (int), ``time_ms`` (float or None),
``gbps`` (float or None), ``tflops`` (float or None), ``max_err`` (float), ``ok``
(bool: correct against the reference) and ``note`` (str). An exception in it becomes
one row with ``ok`` False and the error as its note; it never stops the Triton report.
Its time is not covered by ``--budget-s``: keep it to about a minute on an H200.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

# N×K of the linear layers (q/o, gate/up, down) of the models users run.
SHAPES = {
    "llama2-7b": [(4096, 4096), (11008, 4096), (4096, 11008)],
    "llama3-8b": [(6144, 4096), (28672, 4096), (4096, 14336)],
    "llama2-70b": [(10240, 8192), (57344, 8192), (8192, 28672)],
}
DRY_SHAPES = [(48, 64), (37, 128)]
TOLERANCE = {"bfloat16": 1.6e-2, "float16": 2e-3, "float32": 1e-5}  # = tests/conftest.py
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
        ]
    cases = [Case("decode", n, k, 1) for shapes in SHAPES.values() for n, k in shapes]
    cases += [
        Case("decode", 4096, 4096, 1, 64),
        Case("decode", 4096, 4096, 1, 16, weight="nf4-g64"),
        Case("decode", 4096, 4096, 1, 16, weight="sym-g32"),
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
    """Base weight, adapter stack, adapter ids and x for one case (fresh random values)."""
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
    multi = case.adapters > 1 or case.kind in ("decode_multi", "multi64")
    if multi:  # distinct popularity, one base-only row in eight
        ids = torch.arange(case.rows, device=device) % case.adapters
        ids[3::8] = -1
        batch = AdapterBatch(ids.to(torch.int32), case.adapters)
    else:
        batch = None
    x = torch.randn(case.rows, case.k, device=device, dtype=dtype)
    return base, stack, batch, x


def lora_args(stack):
    from lorart.backend.base import LoRAArgs

    return LoRAArgs(stack.a, stack.b, stack.rank_offsets_list, stack.scales.tolist())


def rel_err(actual, expected) -> float:
    e = expected.double()
    return float((actual.double() - e).abs().max() / e.abs().max().clamp_min(1e-30))


# ------------------------------------------------------------------------------ work model
def weight_bytes(base) -> int:
    return base.nbytes() if not hasattr(base, "element_size") else (
        base.numel() * base.element_size())


def case_work(case: Case, base, stack, x) -> tuple[float, float]:
    """``(bytes, flops)`` one call must move / do at least (forward; backward ~2x flops)."""
    elem = x.element_size()
    used = min(case.adapters, case.rows)
    lora_bytes = used * case.rank * (case.k + case.n) * elem
    nbytes = weight_bytes(base) + lora_bytes + case.rows * (case.k + case.n) * elem
    flops = 2.0 * case.rows * case.n * case.k + 2.0 * case.rows * case.rank * (case.k + case.n)
    if case.kind == "backward":  # dX (base + LoRA), dA, dB, x·Aᵀ, dY·B
        flops = 2.0 * case.rows * case.n * case.k + 8.0 * case.rows * case.rank * (
            case.k + case.n)
        nbytes += case.rows * (case.n + case.k) * elem
    return nbytes, flops


# ------------------------------------------------------------------------------ runners
def triton_forward(case, base, stack, batch, x):
    from lorart.backend import get_backend

    backend = get_backend("triton")
    lora = lora_args(stack)
    return lambda b=base: backend.forward(x, b, None, lora, batch)


def triton_base_only(base, x):
    from lorart.backend import get_backend

    backend = get_backend("triton")
    return lambda b=base: backend.forward(x, b, None, None, None)


def triton_backward(case, base, stack, batch, x, dy):
    from lorart.backend import get_backend

    backend = get_backend("triton")
    lora = lora_args(stack)
    return lambda b=base: backend.backward(dy, x, b, lora, batch, True, True)


def dequantize_bf16(base, dtype):
    """What a plain-torch user runs to dequantize: unpack nibbles, scale and shift per group,
    all in the activation dtype (cheaper than the fp32 reference ``dequantize``)."""
    if hasattr(base, "element_size"):
        return base
    import torch

    n, k = base.shape
    g, q = base.group_size, base.qweight
    codes = torch.stack((q & 15, q >> 4), dim=-1).view(n, k // g, g)
    if base.scheme == "nf4":  # table kept on the device by the caller's first call
        values = _nf4_table(q.device, dtype)[codes.long()]
    else:
        values = codes.to(dtype) - (8 if base.scheme == "sym" else 0)
    w = values * base.scales.to(dtype).unsqueeze(-1)
    if base.offsets is not None:
        w = w + base.offsets.to(dtype).unsqueeze(-1)
    return w.view(n, k)


_NF4: dict = {}


def _nf4_table(device, dtype):
    """The NF4 table on ``device``, made once, so a CUDA-graph capture copies nothing."""
    key = (str(device), dtype)
    if key not in _NF4:
        from lorart.quant import code_table

        _NF4[key] = code_table("nf4", device).to(dtype)
    return _NF4[key]


def _adapter_groups(stack, batch):
    """``[(s, rows or None)]``: the adapters present and their rows (None: every row)."""
    if batch is None:
        return [(0, None)]
    groups = [(s, (batch.ids == s).nonzero().squeeze(1)) for s in range(stack.num_adapters)]
    return [(s, rows) for s, rows in groups if rows.numel()]


def peft_forward(case, base, stack, batch, x):
    """PEFT-style unfused forward: dequantize, matmul, then one LoRA pair per adapter present
    (rows per adapter precomputed, which is kinder to the baseline than PEFT itself)."""
    pairs = [stack.adapter(s) for s in range(stack.num_adapters)]
    groups = _adapter_groups(stack, batch)

    def run(b=base):
        y = x @ dequantize_bf16(b, x.dtype).T
        for s, rows in groups:
            a, bb, scale = pairs[s]
            if rows is None:
                y = y + scale * ((x @ a.T) @ bb.T)
            else:
                y.index_add_(0, rows, scale * ((x[rows] @ a.T) @ bb.T))
        return y

    return run


def peft_backward(case, base, stack, batch, x, dy):
    """The gradients autograd computes for PEFT-style unfused LoRA, written out:
    ``(dx, [(dA_s, dB_s) per adapter present])``."""
    pairs = [stack.adapter(s) for s in range(stack.num_adapters)]
    groups = _adapter_groups(stack, batch)

    def run(b=base):
        w = dequantize_bf16(b, x.dtype)  # QLoRA dequantizes again in backward
        dx = dy @ w
        grads = []
        for s, rows in groups:
            a, bb, scale = pairs[s]
            xs, dys = (x, dy) if rows is None else (x[rows], dy[rows])
            dyb = dys @ bb
            if rows is None:
                dx = dx + scale * (dyb @ a)
            else:
                dx.index_add_(0, rows, scale * (dyb @ a))
            grads.append((scale * (dyb.T @ xs), scale * (dys.T @ (xs @ a.T))))
        return dx, grads

    return run


def cublas_base(base, x):
    w = dequantize_bf16(base, x.dtype).contiguous()
    return lambda w=w: x @ w.T


# ------------------------------------------------------------------------------ timing
def rotated_copies(obj, copies: int) -> list:
    """``copies`` independent copies of a weight (dense tensor or QuantizedWeight)."""
    if copies <= 1:
        return [obj]
    if hasattr(obj, "element_size"):
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
    """Copy GB/s (read + write of 1 GiB) and bf16 matmul TFLOP/s (8192³), medians."""
    import torch
    import triton.testing

    def copy_gbps() -> float:
        src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
        return 2 * src.numel() / (ms * 1e-3) / 1e9

    def matmul_tflops() -> float:
        a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
        ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
        return 2 * 8192**3 / (ms * 1e-3) / 1e12

    out = {"copy_gbps": copy_gbps(), "bf16_matmul_tflops": matmul_tflops()}
    torch.cuda.empty_cache()
    return out


# ------------------------------------------------------------------------------ one case
def reference_forward(case, base, stack, batch, x):
    from lorart import reference

    ids = None if batch is None else batch.ids
    return reference.lora_forward(x.float(), base if not hasattr(base, "element_size")
                                  else base.float(), None, stack.a.float(), stack.b.float(),
                                  stack.rank_offsets_list, stack.scales.tolist(), ids)


def check_case(case: Case, device, dtype) -> tuple[float, dict]:
    """Correctness of the Triton path at this case's shape; returns (max_err, inputs)."""
    import torch

    from lorart import reference

    base, stack, batch, x = make_inputs(case, device, dtype)
    inputs = {"base": base, "stack": stack, "batch": batch, "x": x}
    if case.kind == "backward":
        dy = torch.randn(case.rows, case.n, device=device, dtype=dtype)
        inputs["dy"] = dy
        dx, da, db = triton_backward(case, base, stack, batch, x, dy)()
        ids = None if batch is None else batch.ids
        ref = reference.lora_backward(dy.float(), x.float(), base if not hasattr(
            base, "element_size") else base.float(), stack.a.float(), stack.b.float(),
            stack.rank_offsets_list, stack.scales.tolist(), ids)
        err = max(rel_err(dx, ref[0]), rel_err(da, ref[1]), rel_err(db, ref[2]))
        inputs["baseline_err"] = rel_err(peft_backward(case, base, stack, batch, x, dy)()[0],
                                         ref[0])
    else:
        y = triton_forward(case, base, stack, batch, x)()
        ref = reference_forward(case, base, stack, batch, x)
        err = rel_err(y, ref)
        inputs["baseline_err"] = rel_err(peft_forward(case, base, stack, batch, x)(), ref)
        if case.kind == "decode":  # the base-only path of the same kernel, checked too
            from lorart import reference as r

            y0 = triton_base_only(base, x)()
            ref0 = r.lora_forward(x.float(), base if not hasattr(base, "element_size")
                                  else base.float(), None, None, None, [0], [], None)
            err = max(err, rel_err(y0, ref0))
    return err, inputs


def dry_timer(fn, weights: list, graph: bool) -> tuple[float, str]:
    """Stands in for :func:`bench_ms` in ``--dry-run``: runs ``fn`` once, claims nothing."""
    fn(weights[0])
    return float("nan"), "dry"


def time_case(case: Case, inputs: dict, ceilings: dict, timer=bench_ms,
              rotate_bytes: int = L2_ROTATE_BYTES) -> dict:
    """Times of the Triton path and its baselines, in ms, plus rates and target verdicts.

    ``timer(fn, weights, graph) -> (median ms, how)``; ``rotate_bytes`` sizes the weight
    rotation that keeps decode reads in HBM (0 in a dry run).
    """
    import torch

    base, stack, batch, x = inputs["base"], inputs["stack"], inputs["batch"], inputs["x"]
    graph = case.kind in ("decode", "decode_multi")
    copies = max(1, math.ceil(rotate_bytes / weight_bytes(base))) if graph else 1
    weights = rotated_copies(base, copies)
    out: dict = {}
    if case.kind == "backward":
        dy = inputs["dy"]
        out["time_ms"], out["timer"] = timer(triton_backward(case, base, stack, batch, x, dy),
                                             weights, graph)
        out["peft_ms"], _ = timer(peft_backward(case, base, stack, batch, x, dy), weights,
                                  graph)
    else:
        out["time_ms"], out["timer"] = timer(triton_forward(case, base, stack, batch, x),
                                             weights, graph)
        out["peft_ms"], _ = timer(peft_forward(case, base, stack, batch, x), weights, graph)
        if case.kind == "decode" and not hasattr(base, "element_size"):
            out["base_only_ms"], _ = timer(triton_base_only(base, x), weights, graph)
        if case.kind == "multi64":  # the same rows with one adapter: the multi-adapter cost
            one = Case(case.kind, case.n, case.k, case.rows, case.rank, 1, case.weight)
            b1, s1, _, x1 = make_inputs(one, x.device, x.dtype)
            out["one_adapter_ms"], _ = timer(triton_forward(one, b1, s1, None, x1), [b1], graph)
    dense = dequantize_bf16(base, x.dtype).contiguous()
    dense_copies = max(1, math.ceil(rotate_bytes / weight_bytes(dense))) if graph else 1
    out["cublas_ms"], _ = timer(lambda w: x @ w.T, rotated_copies(dense, dense_copies), graph)
    del weights, dense
    torch.cuda.empty_cache()
    nbytes, flops = case_work(case, base, stack, x)
    sec = out["time_ms"] * 1e-3
    out["gbps"] = nbytes / sec / 1e9
    out["tflops"] = flops / sec / 1e12
    if case.kind in ("decode", "decode_multi"):
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


def cuda_rows(dry: bool, path: Path = HERE / "gpu_check_cuda.py") -> list[dict]:
    """Rows of the CUDA suite per the contract in the module doc; [] if there is none."""
    if not path.exists():
        return []
    try:
        spec = importlib.util.spec_from_file_location("gpu_check_cuda", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        if not hasattr(module, "cuda_suite"):
            return []
        rows = list(module.cuda_suite(dry))
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
            f"{'ok':>3}  "
            f"target")
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
    import torch
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {"context": {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                        "device": name or device.type, "torch": torch.__version__,
                        "triton": triton.__version__, "python": platform.python_version(),
                        "interpreter": os.environ.get("TRITON_INTERPRET") == "1",
                        "ceilings": ceilings}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes on CPU under TRITON_INTERPRET=1; no timing")
    parser.add_argument("--out", type=Path, help="write JSON lines here")
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
    sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
    start = time.monotonic()
    device = torch.device("cpu" if args.dry_run else "cuda")
    dtype = torch.bfloat16
    ceilings = None if args.dry_run else measure_ceilings(device)
    if ceilings:
        print(f"ceilings measured in {time.monotonic() - start:.0f}s: {ceilings}", flush=True)
    rows = []
    for case in case_list(args.dry_run):
        torch.manual_seed(0)
        row = {"name": case.name, "shape": case.shape, "rows": case.rows,
               "adapters": case.adapters, "rank": case.rank, "source": "triton", "note": ""}
        try:
            err, inputs = check_case(case, device, dtype)
            row["max_err"], row["ok"] = err, err <= TOLERANCE["bfloat16"]
            row["baseline_err"] = inputs.get("baseline_err")
            if not row["baseline_err"] <= TOLERANCE["bfloat16"]:
                row["note"] = f"PEFT baseline off by {row['baseline_err']:.1e}; "
            if args.dry_run:  # run every timed callable once; record no times
                timed = time_case(case, inputs, {"copy_gbps": 1.0, "bf16_matmul_tflops": 1.0},
                                  timer=dry_timer, rotate_bytes=0)
                row["target"] = timed["target"]
                row["note"] += "dry run: interpreter, not timed"
            elif time.monotonic() - start > args.budget_s:
                row["note"] += "not timed: time budget spent"
            else:
                row.update(time_case(case, inputs, ceilings))
            del inputs
        except Exception as exc:  # one failing case must not hide the others
            row.update(ok=False, max_err=float("nan"), note=f"{type(exc).__name__}: {exc}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rows.append(row)
        print(f"[{time.monotonic() - start:6.1f}s] {case.name} {case.shape} rows={case.rows} "
              f"adapters={case.adapters}: err={fmt(row.get('max_err'), '.1e')} "
              f"ms={fmt(row.get('time_ms'), '.4f')} {row['note']}", flush=True)
    rows += cuda_rows(args.dry_run)
    print_table(rows, ceilings)
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(run_context(device, ceilings)) + "\n")
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"\ntotal {time.monotonic() - start:.0f}s; "
          f"{sum(1 for r in rows if not r.get('ok'))} case(s) not ok")
    return 0 if all(r.get("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
