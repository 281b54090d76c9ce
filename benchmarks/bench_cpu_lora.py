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


@pytest.fixture(autouse=True)
def _cpu_backend(monkeypatch):
    monkeypatch.setenv("LORART_BACKEND", "cpu")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_cpu_lora(benchmark, bandwidth, case: CpuCase, impl: str):
    fn = _make(impl, case)
    act = 4 if impl.endswith("fp32") else 2
    benchmark.group = case.id
    benchmark.extra_info.update(case.as_dict())
    benchmark.extra_info.update(
        impl=impl, flops=case.flops, read_gbps=bandwidth["gbps"],
        bytes=layer_bytes(case.n, case.k, case.rows, case.rank, case.group_size, act))
    with torch.no_grad():
        benchmark(fn)


@pytest.mark.parametrize("path", ("decode", "gemm"))
@pytest.mark.parametrize("rows", (2, 4, 8, 12, 16, 24, 32))
@pytest.mark.parametrize("dtype", ("bf16", "fp32"))
def test_decode_crossover(benchmark, monkeypatch, path: str, rows: int, dtype: str):
    monkeypatch.setattr(cpu, "DECODE_MAX_ROWS", 1 << 30 if path == "decode" else 0)
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
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        target = crossover if bench["name"].startswith("test_decode_crossover") else rows
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
