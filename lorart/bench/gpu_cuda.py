"""GPU check of the CUDA C++ decode kernels (``lorart.backend.cuda``): correctness, then timing.

    python -m lorart.bench.gpu_cuda [--dry-run]      # standalone; prints the rows
    (or through benchmarks/gpu_check.py, whose table ends with these rows)

``cuda_suite(dry)`` returns one dict per row with keys ``name``, ``shape`` ("N×K"),
``rows``, ``adapters``, ``time_ms``, ``gbps``, ``tflops``, ``max_err``, ``ok``, ``note``:

1. Correctness, always on a GPU: the kernels against ``lorart.reference`` (fp32) at odd
   sizes, every scheme (asym/sym/nf4/int8), group sizes 16..256, fp16/fp32 scales, fp16 and
   bf16 activations, mixed adapters with ragged ranks and base-only (-1) rows, and the
   dense base with odd K (narrow loads) and K % 8 == 0 (16-byte loads). ``max_err`` is
   max |error| / max |reference|; ``ok`` uses the test suite's tolerance per dtype.
2. Timing (skipped when ``dry``): 4-bit asym g128, bf16, N×K from 4096×4096 to
   28672×8192, 1/4/8 rows, one adapter per row at rank 16, with and without adapters.
   Timed as the Triton kernels are (:func:`lorart.bench.gpu.bench_ms`): calls replayed from
   a CUDA graph, cycling through copies of the weight totalling >= 256 MiB (so weights
   come from HBM, not the 60 MB L2, and launch overhead is not what is measured); median.
   GB/s counts the bytes a layer must move (packed weight, scales, offsets, the used
   adapters' A and B, x, y) and is compared with a device-to-device copy bandwidth
   measured in the same run.
   Targets (H200): >= 75% of the copy bandwidth at 1-8 rows; LoRA adds <= 10% over the
   same kernel without adapters. Each timed row's note says met / NOT met.

Without a GPU it returns ``[]`` and prints why (``--dry-run`` on CPU must not fail).
"""

from __future__ import annotations

import math

from .tolerance import tolerance

ROTATE_BYTES = 256 << 20  # > 4x an H200's L2
TIMED_SHAPES = [(4096, 4096), (11008, 4096), (4096, 14336), (28672, 8192)]  # N×K
TIMED_ROWS = (1, 4, 8)
RANK = 16
BW_TARGET = 0.75
LORA_TARGET = 0.10


def _row(name, shape="", rows=0, adapters=0, time_ms=None, gbps=None, tflops=None,
         max_err=float("nan"), ok=False, note="") -> dict:
    return {"name": name, "shape": shape, "rows": rows, "adapters": adapters,
            "time_ms": time_ms, "gbps": gbps, "tflops": tflops, "max_err": max_err, "ok": ok,
            "note": note}


# ------------------------------------------------------------------------------ correctness
def _stack(n, k, ranks, dtype, device):
    import torch

    from lorart import AdapterStack

    adapters = [(torch.randn(r, k), 0.3 * torch.randn(n, r), 0.5 + 0.25 * i)
                for i, r in enumerate(ranks)]
    return AdapterStack.from_list(adapters).to(device, dtype)


def _check(backend, base, m, n, k, dtype, ranks, with_bias, device) -> tuple[float, float]:
    """``(max_err, adapter_effect)``, both relative to max |reference|."""
    import torch

    from lorart import reference
    from lorart.backend.base import LoRAArgs

    x = torch.randn(m, k, device=device).to(dtype)
    bias = torch.randn(n, device=device).to(dtype) if with_bias else None
    stack = _stack(n, k, ranks, dtype, device)
    # adapters 0, 1, ..., then -1 (base only), cycling: M=1 still uses an adapter
    ids = ((torch.arange(m, device=device) + 1) % (len(ranks) + 1) - 1).to(torch.int32)
    offs = stack.rank_offsets_list
    scales = [float(s) for s in stack.scales.tolist()]
    y = backend.forward(x, base, bias, LoRAArgs(stack.a, stack.b, offs, scales), ids)
    fbias = None if bias is None else bias.float()
    ref = reference.lora_forward(x.float(), base, fbias, stack.a.float(), stack.b.float(), offs,
                                 scales, ids)
    plain = reference.lora_forward(x.float(), base, fbias, None, None, [0], [], None)
    scale = ref.abs().max().clamp_min(1e-30)
    err = float((y.float() - ref).abs().max() / scale)
    effect = float((ref - plain).abs().max() / scale)
    return err, effect


def correctness_rows(backend, device, dry: bool) -> list[dict]:
    import torch

    from lorart import quantize

    rows = []
    quant_cases = [  # (scheme, group, scale dtype, M, N, K): odd N, K not a multiple of 128
        ("asym", 32, torch.float16, 1, 37, 96),
        ("sym", 64, torch.float32, 5, 133, 192),
        ("nf4", 128, torch.float16, 9, 257, 384),
        ("asym", 256, torch.float32, 16, 1, 768),
        ("nf4", 32, torch.float32, 8, 4099, 4096),
        ("int8", 16, torch.float32, 3, 133, 80),  # 8-bit: groups straddle a lane's 32 k
        ("int8", 128, torch.float16, 16, 257, 640),
    ]
    dense_cases = [(3, 45, 37), (16, 130, 136), (8, 301, 4096)]  # (M, N, K)
    if dry:
        quant_cases, dense_cases = quant_cases[:3] + quant_cases[5:6], dense_cases[:2]
    for dtype in (torch.float16, torch.bfloat16):
        tol = tolerance(dtype)
        for scheme, g, sdt, m, n, k in quant_cases:
            torch.manual_seed(0)
            qw = quantize(torch.randn(n, k, device=device), g, scheme, sdt)
            name = f"check/{scheme}-g{g}/{str(dtype)[6:]}"
            shape = f"{n}x{k}"
            try:
                err, effect = _check(backend, qw, m, n, k, dtype, (3, 16, 1), m % 2 == 1, device)
                ok = err <= tol and effect > 0.02  # adapters must matter, or err says little
                note = f"adapters move y by {effect:.2f} of max|y|; scales {str(sdt)[6:]}"
                rows.append(_row(name, shape, m, 3, max_err=err, ok=ok, note=note))
            except Exception as exc:  # one failing case must not hide the others
                rows.append(_row(name, shape, m, 3, note=f"{type(exc).__name__}: {exc}"))
        for m, n, k in dense_cases:
            torch.manual_seed(0)
            w = (0.1 * torch.randn(n, k, device=device)).to(dtype)
            name = f"check/dense/{str(dtype)[6:]}"
            try:
                err, _ = _check(backend, w, m, n, k, dtype, (8, 2), True, device)
                path = "16-byte loads" if k % 8 == 0 else "narrow loads (K % 8 != 0)"
                rows.append(_row(name, f"{n}x{k}", m, 2, max_err=err, ok=err <= tol, note=path))
            except Exception as exc:
                rows.append(_row(name, f"{n}x{k}", m, 2, note=f"{type(exc).__name__}: {exc}"))
    return rows


# ------------------------------------------------------------------------------ timing
def _random_weight(n, k, device, group=128):
    """A packed asym weight with random codes (timing only: values do not matter)."""
    import torch

    from lorart import QuantizedWeight

    qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device)
    scales = (0.01 * torch.rand(n, k // group, device=device) + 1e-3).half()
    offsets = (-0.08 * torch.rand(n, k // group, device=device)).half()
    return QuantizedWeight(qweight, scales, offsets, group, "asym")


def timing_rows(backend, device, copy_gbps: float) -> list[dict]:
    import torch

    from lorart.backend.base import LoRAArgs

    from .gpu import bench_ms

    dtype = torch.bfloat16
    rows = []
    for n, k in TIMED_SHAPES:
        base = _random_weight(n, k, device)
        copies = max(1, math.ceil(ROTATE_BYTES / base.nbytes()))
        weights = [base] + [_random_weight(n, k, device) for _ in range(copies - 1)]
        for m in TIMED_ROWS:
            x = torch.randn(m, k, device=device).to(dtype)
            stack = _stack(n, k, [RANK] * m, dtype, device)  # one adapter per row
            lora = LoRAArgs(stack.a, stack.b, stack.rank_offsets_list,
                            [float(s) for s in stack.scales.tolist()])
            ids = torch.arange(m, dtype=torch.int32, device=device)
            io_bytes = 2 * m * (k + n)
            adapter_bytes = 2 * m * RANK * (k + n)
            flops = 2 * m * n * k
            lora_flops = 2 * m * RANK * (k + n)
            base_ms = None
            for with_lora in (False, True):
                name = f"decode{'+lora' if with_lora else ''}/asym-g128/bf16"
                try:
                    lo, i = (lora, ids) if with_lora else (None, None)
                    def call(w, x=x, lo=lo, i=i):
                        return backend.forward(x, w, None, lo, i)

                    ms, how = bench_ms(call, weights, graph=True)
                except Exception as exc:
                    rows.append(_row(name, f"{n}x{k}", m, m if with_lora else 0,
                                     note=f"{type(exc).__name__}: {exc}"))
                    continue
                moved = base.nbytes() + io_bytes + (adapter_bytes if with_lora else 0)
                gbps = moved / (ms * 1e-3) / 1e9
                tflops = (flops + (lora_flops if with_lora else 0)) / (ms * 1e-3) / 1e12
                pct = gbps / copy_gbps
                note = f"{100 * pct:.0f}% of copy BW ({how})"
                met = pct >= BW_TARGET
                if with_lora and base_ms:
                    extra = ms / base_ms - 1
                    note += f"; LoRA +{100 * extra:.1f}%"
                    met = met and extra <= LORA_TARGET
                note += f"; target {'met' if met else 'NOT met'}"
                if not with_lora:
                    base_ms = ms
                # ok: the same kernels passed the correctness rows; timing rows carry no
                # correctness claim of their own, so they are ok unless the call failed.
                rows.append(_row(name, f"{n}x{k}", m, m if with_lora else 0, time_ms=ms,
                                 gbps=gbps, tflops=tflops, max_err=float("nan"), ok=True,
                                 note=note))
        del weights, base
        torch.cuda.empty_cache()
    return rows


# ------------------------------------------------------------------------------ entry
def cuda_suite(dry: bool) -> list[dict]:
    """The rows (keys in the module doc); ``[]`` without a GPU."""
    import torch

    if not torch.cuda.is_available():
        print("gpu_check_cuda: no CUDA GPU; CUDA kernels neither checked nor timed")
        return []
    from lorart.backend.cuda import CudaBackend

    backend = CudaBackend()
    available, why = backend.status()
    if not available:
        return [_row("cuda_suite", note=f"cuda backend unavailable: {why}")]
    device = torch.device("cuda")
    rows = correctness_rows(backend, device, dry)
    if dry:
        return rows
    if not all(r["ok"] for r in rows):
        rows.append(_row("timing", note="skipped: a correctness check failed"))
        return rows
    from .machine import measure_ceilings

    copy_gbps = measure_ceilings(device, "gpu")["copy_gbps"]
    torch.cuda.empty_cache()
    rows.append(_row("copy_bandwidth", time_ms=None, gbps=copy_gbps, ok=True,
                     note="device-to-device copy, read + write of 1 GiB, best of 10"))
    return rows + timing_rows(backend, device, copy_gbps)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from .gpu import print_table

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="correctness only, no timing")
    rows = cuda_suite(parser.parse_args(argv).dry_run)
    print_table(rows, None)
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    import sys

    sys.exit(main())
