"""CPU fused LoRA layer vs the baselines a user would otherwise run, side by side.

    python -m pytest benchmarks/bench_cpu_lora.py --benchmark-json=cpu.json
    python benchmarks/bench_cpu_lora.py cpu.json          # markdown table with ratios

Implementations per case (``cases.CPU_CASES``: Llama-2-7B shapes, rows 1/8/32/512,
rank 16, 4-bit asym group 128, one adapter):

- ``lorart_bf16`` / ``lorart_fp32``: ``lorart.lora_linear`` on the ``cpu`` backend
  (C++ fused base + LoRA + 4-bit), x/A/B in that dtype.
- ``torch_int4_lora``: torch's CPU int4 kernel (``_weight_int4pack_mm_for_cpu``, bf16)
  for the same 4-bit weights, plus the two LoRA matmuls and the add.
- ``peft_bf16`` / ``peft_fp32``: PEFT-style unfused dense ``x@W.T + s*((x@A.T)@B.T)``
  with W dequantized once up front (what PEFT does with a float base layer).

Each implementation cycles through enough copies of its weights to exceed 64 MiB, so a
1-row call reads its weights from DRAM as a real decode step does, not from the 32 MiB
L3 that a single 4096x4096 4-bit layer would otherwise sit in. The read bandwidth is
measured in the same run (bandwidth.py) and stored in the JSON's machine_info.
``test_cpu_lora_backward`` times forward + backward (dx, dA, dB) at 512 rows: lorart
(4-bit and dense bf16 base) against torch autograd of the PEFT-style bf16 layer. The bf16
matmul ceiling (torch's own bf16 GEMM, best of several 512x4096x4096) is measured once per
run and stored with every benchmark, so the 512-row table reports GFLOP/s against it.
``test_decode_crossover`` times the decode GEMV against the tiled GEMM path at small row
counts: the measurement behind ``lorart.backend.cpu.DECODE_MAX_ROWS``.
"""

from __future__ import annotations

import itertools
import json
import os
import sys

import pytest
import torch
from bandwidth import layer_bytes
from cases import CPU_CASES, CpuCase

import lorart
from lorart.quant import QuantizedWeight

cpu = pytest.importorskip("lorart.backend.cpu", reason="lorart._C not built")

IMPLS = ("lorart_bf16", "lorart_fp32", "torch_int4_lora", "peft_bf16", "peft_fp32")
ROTATE_BYTES = 64 << 20  # > L3 of the dev machine (32 MiB)
LORA_SCALE = 2.0

_WEIGHTS: dict[tuple[int, int, int], QuantizedWeight] = {}


def _quantized(n: int, k: int, group_size: int) -> QuantizedWeight:
    key = (n, k, group_size)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()  # one shape at a time keeps memory bounded
        _WEIGHTS[key] = lorart.quantize(torch.randn(n, k) * 0.02, group_size, "asym")
    return _WEIGHTS[key]


def _copies(nbytes: int) -> int:
    return 1 + ROTATE_BYTES // max(nbytes, 1)


def _int4_pack(qw: QuantizedWeight):
    """torch's packed int4 weight and ``scales_and_zeros [K/g, N, 2]`` (bf16) with
    value ``(q - 8)·scale + zero``, i.e. ``zero = offset + 8·scale``."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(qw.codes().to(torch.int32), 1)
    scale, offset = qw.scales.float(), qw.offsets.float()
    sz = torch.stack([scale.T, (offset + 8 * scale).T], -1).to(torch.bfloat16).contiguous()
    return packed, sz


def _make(impl: str, case: CpuCase):
    """A zero-argument callable running one layer call (cycling weight copies)."""
    qw = _quantized(case.n, case.k, case.group_size)
    dtype = torch.float32 if impl.endswith("fp32") else torch.bfloat16
    x = torch.randn(case.rows, case.k).to(dtype)
    a = (torch.randn(case.rank, case.k) * 0.02).to(dtype)
    b = (torch.randn(case.n, case.rank) * 0.02).to(dtype)
    if impl.startswith("lorart"):
        copies = [qw] + [QuantizedWeight(qw.qweight.clone(), qw.scales.clone(),
                                         qw.offsets.clone(), qw.group_size, qw.scheme)
                         for _ in range(_copies(qw.nbytes()) - 1)]
        ring = itertools.cycle(copies)
        return lambda: lorart.lora_linear(x, next(ring), a, b, LORA_SCALE)
    if impl == "torch_int4_lora":
        packed, sz = _int4_pack(qw)
        nbytes = packed.numel() * packed.element_size() + sz.numel() * 2
        ring = itertools.cycle([(packed, sz)] + [(packed.clone(), sz.clone())
                                                 for _ in range(_copies(nbytes) - 1)])
        g = case.group_size

        def run():
            p, s = next(ring)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, p, g, s)
            return y + LORA_SCALE * ((x @ a.T) @ b.T)

        return run
    w = qw.dequantize(dtype)
    ring = itertools.cycle([w] + [w.clone() for _ in range(_copies(w.numel() * w.element_size())
                                                            - 1)])
    return lambda: torch.nn.functional.linear(x, next(ring)) + LORA_SCALE * ((x @ a.T) @ b.T)


_CEILING: dict = {}


@pytest.fixture(scope="session")
def bf16_ceiling() -> float:
    """torch's bf16 matmul rate here (GFLOP/s, best of 10 calls of 512x4096 @ 4096x4096)."""
    if not _CEILING:
        import time

        x, w = torch.randn(512, 4096).bfloat16(), torch.randn(4096, 4096).bfloat16()
        best = float("inf")
        for _ in range(10):
            t0 = time.perf_counter()
            torch.nn.functional.linear(x, w)
            best = min(best, time.perf_counter() - t0)
        _CEILING["gflops"] = 2 * 512 * 4096 * 4096 / best / 1e9
    return _CEILING["gflops"]


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.setenv("LORART_BACKEND", "cpu")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_cpu_lora(benchmark, bandwidth, bf16_ceiling, case: CpuCase, impl: str):
    fn = _make(impl, case)
    act = 4 if impl.endswith("fp32") else 2
    benchmark.group = case.id
    benchmark.extra_info.update(case.as_dict())
    benchmark.extra_info.update(
        impl=impl, flops=case.flops, read_gbps=bandwidth["gbps"], bf16_gflops=bf16_ceiling,
        bytes=layer_bytes(case.n, case.k, case.rows, case.rank, case.group_size, act))
    with torch.no_grad():
        benchmark(fn)


BACKWARD_IMPLS = ("lorart_q4_bf16", "lorart_dense_bf16", "peft_bf16")


def _make_backward(impl: str, case: CpuCase):
    """Forward + backward of one layer call (dx, dA, dB; the base frozen), bf16."""
    qw = _quantized(case.n, case.k, case.group_size)
    x = torch.randn(case.rows, case.k).bfloat16().requires_grad_()
    a = (torch.randn(case.rank, case.k) * 0.02).bfloat16().requires_grad_()
    b = (torch.randn(case.n, case.rank) * 0.02).bfloat16().requires_grad_()
    dy = torch.randn(case.rows, case.n).bfloat16()
    w = qw.dequantize(torch.bfloat16)
    if impl == "lorart_q4_bf16":
        layer = lambda: lorart.lora_linear(x, qw, a, b, LORA_SCALE)  # noqa: E731
    elif impl == "lorart_dense_bf16":
        layer = lambda: lorart.lora_linear(x, w, a, b, LORA_SCALE)  # noqa: E731
    else:  # PEFT's LoraLayer.forward: base(x) + scale * lora_B(lora_A(x))
        layer = lambda: (torch.nn.functional.linear(x, w)  # noqa: E731
                         + LORA_SCALE * torch.nn.functional.linear(
                             torch.nn.functional.linear(x, a), b))

    def run():
        x.grad = a.grad = b.grad = None
        layer().backward(dy)

    return run


@pytest.mark.parametrize("impl", BACKWARD_IMPLS)
@pytest.mark.parametrize("case", [c for c in CPU_CASES if c.rows == 512], ids=lambda c: c.id)
def test_cpu_lora_backward(benchmark, bf16_ceiling, case: CpuCase, impl: str):
    fn = _make_backward(impl, case)
    benchmark.group = f"backward-{case.id}"
    benchmark.extra_info.update(case.as_dict(), id=f"bwd-{case.id}", impl=impl,
                                flops=3 * case.flops, bf16_gflops=bf16_ceiling)
    benchmark(fn)


@pytest.mark.parametrize("path", ("decode", "gemm"))
@pytest.mark.parametrize("rows", (2, 4, 8, 12, 16, 24, 32))
@pytest.mark.parametrize("dtype", ("bf16", "fp32"))
def test_decode_crossover(benchmark, monkeypatch, path: str, rows: int, dtype: str):
    limit = 1 << 30 if path == "decode" else 0
    monkeypatch.setattr(cpu, "DECODE_MAX_ROWS", limit)
    monkeypatch.setattr(cpu, "BF16_DECODE_MAX_ROWS", limit)
    case = CpuCase(4096, 4096, rows)
    fn = _make(f"lorart_{dtype}", case)
    benchmark.group = f"crossover-{dtype}-m{rows}"
    benchmark.extra_info.update(case.as_dict(), impl=f"lorart_{dtype}_{path}")
    with torch.no_grad():
        benchmark(fn)


# --------------------------------------------------------------------------- report
def table(path: str) -> str:
    """Markdown table (best-of times, ratios) from a ``--benchmark-json`` file."""
    data = json.load(open(path))
    bw = data["machine_info"].get("read_bandwidth", {}).get("gbps")
    rows: dict[str, dict] = {}
    crossover: dict[str, dict] = {}
    backward: dict[str, dict] = {}
    ceiling = None
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        ceiling = info.get("bf16_gflops", ceiling)
        name = bench["name"]
        target = (crossover if name.startswith("test_decode_crossover")
                  else backward if name.startswith("test_cpu_lora_backward") else rows)
        entry = target.setdefault(info["id"], {"info": info})
        entry[info["impl"]] = bench["stats"]["min"] * 1e3
    out = [f"read bandwidth (best of torch.sum / C++ stream): {bw:.1f} GB/s" if bw else "",
           "", "| case | lorart bf16 ms | lorart fp32 ms | torch int4+LoRA ms | PEFT bf16 ms | "
           "PEFT fp32 ms | int4+LoRA / lorart | PEFT bf16 / lorart | PEFT fp32 / lorart fp32 "
           "| lorart bf16 GB/s (% of read bw) |", "|" + "---|" * 10]
    for cid, e in rows.items():
        lb, lf = e.get("lorart_bf16"), e.get("lorart_fp32")
        i4, pb, pf = e.get("torch_int4_lora"), e.get("peft_bf16"), e.get("peft_fp32")
        gbps = e["info"]["bytes"] / (lb * 1e-3) / 1e9 if lb else None
        cells = [cid] + [f"{v:.3f}" if v else "-" for v in (lb, lf, i4, pb, pf)]
        cells += [f"{x / y:.2f}x" if x and y else "-" for x, y in ((i4, lb), (pb, lb), (pf, lf))]
        cells.append(f"{gbps:.1f} ({100 * gbps / bw:.0f}%)" if gbps and bw else "-")
        out.append("| " + " | ".join(cells) + " |")
    big = {cid: e for cid, e in rows.items() if e["info"].get("rows") == 512}
    if big and ceiling:
        out += ["", f"512 rows, bf16, GFLOP/s (torch bf16 matmul ceiling in this run: "
                f"{ceiling:.0f} GFLOP/s)", "",
                "| case | lorart bf16 | PEFT bf16 | lorart % of ceiling |", "|---|---|---|---|"]
        for cid, e in big.items():
            gf = {i: e["info"]["flops"] / (e[i] * 1e-3) / 1e9 for i in ("lorart_bf16", "peft_bf16")
                  if e.get(i)}
            out.append(f"| {cid} | {gf.get('lorart_bf16', 0):.0f} | {gf.get('peft_bf16', 0):.0f} "
                       f"| {100 * gf.get('lorart_bf16', 0) / ceiling:.0f}% |")
    if backward:
        out += ["", "| backward case (fwd + bwd) | lorart 4-bit ms | lorart dense bf16 ms | "
                "PEFT bf16 autograd ms | PEFT ÷ lorart 4-bit | PEFT ÷ lorart dense |",
                "|---|---|---|---|---|---|"]
        for cid, e in backward.items():
            q, d, p = e.get("lorart_q4_bf16"), e.get("lorart_dense_bf16"), e.get("peft_bf16")
            cells = [cid] + [f"{v:.2f}" if v else "-" for v in (q, d, p)]
            cells += [f"{p / v:.2f}x" if p and v else "-" for v in (q, d)]
            out.append("| " + " | ".join(cells) + " |")
    if crossover:
        out += ["", "| crossover case | decode ms | gemm ms |", "|---|---|---|"]
        for cid, e in crossover.items():
            for dt in ("bf16", "fp32"):
                d, g = e.get(f"lorart_{dt}_decode"), e.get(f"lorart_{dt}_gemm")
                if d or g:
                    out.append(f"| {cid} {dt} | {d or 0:.3f} | {g or 0:.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.exists(sys.argv[1]):
        sys.exit("usage: python benchmarks/bench_cpu_lora.py RESULTS.json "
                 "(from pytest benchmarks/bench_cpu_lora.py --benchmark-json=RESULTS.json)")
    print(table(sys.argv[1]))
