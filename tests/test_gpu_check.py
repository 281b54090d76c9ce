"""``benchmarks/gpu_check.py`` (``lorart.bench.gpu``): its dry mode runs end to end, its case
list and contracts hold.

The real run needs a CUDA GPU; these tests run the same script with ``--dry-run``
(tiny shapes, CPU tensors, TRITON_INTERPRET=1, every timed callable run once, no times
recorded), which is what keeps the GPU run from failing on a lent machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorart.bench import gpu as gpu_check

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_dry_run_end_to_end(tmp_path):
    pytest.importorskip("triton", reason="the dry run runs the Triton kernels' interpreter")
    out = tmp_path / "rows.jsonl"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    context = lines[0]["context"]
    rows = [r for r in lines[1:] if r["source"] == "triton"]  # CUDA rows: their own tests
    assert context["interpreter"] is True and context["ceilings"] is None
    kinds = {r["name"].split("/")[0] for r in rows}
    assert kinds == {"decode", "decode_multi", "multi64", "prefill", "backward"}
    for r in rows:
        assert r["ok"], r
        assert r["max_err"] <= gpu_check.TOLERANCE_BF16
        assert r["baseline_err"] <= gpu_check.TOLERANCE_BF16, r
        assert "time_ms" not in r  # a dry run claims no timing
    lines = proc.stdout.splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("case "))
    assert not any(line.startswith("[") for line in lines[header:])  # the table comes last
    assert len([line for line in lines[header:] if line.startswith(("decode", "multi64",
                                                                   "prefill", "backward"))]) \
        == len(rows)


def test_full_case_list_covers_the_brief():
    cases = gpu_check.case_list(dry=False)
    shapes = {(c.n, c.k) for c in cases}
    for model_shapes in gpu_check.SHAPES.values():
        assert set(model_shapes) <= shapes
    assert {16, 64} <= {c.rank for c in cases}
    assert min(c.rows for c in cases) == 1 and max(c.rows for c in cases) == 4096
    assert {1, 64} <= {c.adapters for c in cases}
    assert {"asym", "sym", "nf4", "int8", "dense"} <= {c.weight.split("-")[0] for c in cases}


def _verdict(kind, rows, weight="asym-g128", **times):
    case = gpu_check.Case(kind, 4096, 4096, rows, weight=weight)
    return gpu_check.target_verdict(case, times)


def test_target_verdicts():
    assert _verdict("decode", 1, pct_ceiling=75, time_ms=1.05, base_only_ms=1.0)["target_met"]
    assert not _verdict("decode", 1, pct_ceiling=60, time_ms=1.0, base_only_ms=1.0)["target_met"]
    assert not _verdict("decode", 1, pct_ceiling=90, time_ms=1.2, base_only_ms=1.0)["target_met"]
    assert _verdict("prefill", 1024, time_ms=1.09, cublas_ms=1.0)["target_met"]
    assert not _verdict("prefill", 4096, time_ms=1.2, cublas_ms=1.0)["target_met"]
    assert _verdict("prefill", 512, time_ms=9.0, cublas_ms=1.0)["target_met"] is None
    assert _verdict("multi64", 64, time_ms=1.2, one_adapter_ms=1.0)["target_met"]
    assert not _verdict("backward", 1024, time_ms=1.0, peft_ms=1.4)["target_met"]
    assert _verdict("backward", 1024, time_ms=1.0, peft_ms=1.6)["target_met"]


def test_cuda_rows_contract():
    def suite(dry):
        row = dict(name="bgmv", shape="4096x4096", rows=1, adapters=4, time_ms=None,
                   gbps=None, tflops=None, max_err=1e-3, ok=True, note=f"dry={dry}")
        return [row, {"name": "partial"}]

    full, partial = gpu_check.cuda_rows(True, suite)
    assert full["ok"] and full["note"] == "dry=True" and full["source"] == "cuda"
    assert not partial["ok"] and "lacks" in partial["note"]

    def failing(dry):
        raise RuntimeError("no nvcc")

    (row,) = gpu_check.cuda_rows(False, failing)
    assert not row["ok"] and "no nvcc" in row["note"]
    gpu_check.print_table([full, partial, row], None)  # the table takes CUDA rows
    if not torch.cuda.is_available():
        assert gpu_check.cuda_rows(True) == []  # the real suite: no rows without a GPU


def test_shapes_come_from_the_one_case_table():
    from lorart.bench.cases import SHAPES

    assert gpu_check.SHAPES["llama2-7b"] == [(4096, 4096), (11008, 4096), (4096, 11008)]
    for shapes in gpu_check.SHAPES.values():
        assert {(s.n, s.k) for s in SHAPES.values()} >= set(shapes)


def test_refuses_a_real_run_without_a_gpu(capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present; the real run is not a unit test")
    assert gpu_check.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_rotated_copies_are_independent_equal_weights():
    import lorart

    qw = lorart.quantize(torch.randn(8, 64), 32, "asym")
    copies = gpu_check.rotated_copies(qw, 3)
    assert len(copies) == 3 and copies[0] is qw
    assert copies[1].qweight.data_ptr() != qw.qweight.data_ptr()
    assert torch.equal(copies[2].dequantize(), qw.dequantize())
    dense = torch.randn(4, 4)
    assert gpu_check.rotated_copies(dense, 1) == [dense]


def test_work_model_counts_the_packed_weight():
    import lorart

    case = gpu_check.Case("decode", 64, 128, 1, 8)
    qw = lorart.quantize(torch.randn(64, 128), 128, "asym")
    x = torch.randn(1, 128, dtype=torch.bfloat16)
    nbytes, flops = gpu_check.case_work(case, qw, None, x)
    assert nbytes == 64 * 64 + 2 * 64 * 2 + 8 * (128 + 64) * 2 + (128 + 64) * 2
    assert flops == 2 * 64 * 128 + 2 * 8 * (128 + 64)
