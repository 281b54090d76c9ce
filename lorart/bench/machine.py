"""What a benchmark ran on (context recorded with every result) and the machine's ceilings.

The ceilings are measured, not looked up: memory read bandwidth (sum of a large
tensor), copy bandwidth (``copy_`` of one, read + write counted) and matmul FLOP/s per
dtype (a square matmul). Each is the best of several tries, since on a shared machine
the best run is the closest to what the hardware can do.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from .timing import synchronizer

# Sizes per mode: (bytes of the bandwidth tensor, matmul side, tries).
CEILING_SIZES = {"tiny": (32 << 20, 512, 3), "quick": (256 << 20, 2048, 5),
                 "full": (1 << 30, 4096, 7),
                 "gpu": (1 << 30, 8192, 10)}  # the GPU check: an 8192³ bf16 matmul


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """``HEAD`` of the checkout lorart is imported from (``+dirty`` if modified), if any."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=5).stdout
        return sha + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:
        return None


def context(device: torch.device) -> dict:
    """Device, processor, core count, versions, commit and date, as JSON-able data."""
    import lorart

    ctx = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "peft": _version("peft"),
        "lorart": lorart.__version__,
        "git_commit": git_commit(),
        "lorart_backends": {name: {"available": ok, "why": why}
                            for name, (ok, why) in lorart.backends().items()},
    }
    return ctx


def _best_seconds(fn, device: torch.device, tries: int) -> float:
    sync = synchronizer(device)
    fn()  # warm-up: page faults, allocator, kernel selection
    sync()
    best = float("inf")
    for _ in range(tries):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


def _bandwidth_seconds(nbytes: int, device: torch.device, tries: int) -> tuple[float, float]:
    """Best seconds to sum, and to copy, ``nbytes`` of float32 (far larger than caches)."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    return (_best_seconds(lambda: src.sum(), device, tries),
            _best_seconds(lambda: dst.copy_(src), device, tries))


def measure_ceilings(device: torch.device, mode: str = "quick") -> dict:
    """``{read_gbps, copy_gbps, matmul_gflops: {dtype: GFLOP/s}, sizes...}``, best of tries.

    Matmul rates are measured for float32 and bfloat16 on CPU, bfloat16 (and float16)
    on GPU; float32 on GPU is left at torch's default precision setting.
    """
    nbytes, side, tries = CEILING_SIZES[mode]
    read_s, copy_s = _bandwidth_seconds(nbytes, device, tries)
    dtypes = [torch.float32, torch.bfloat16]
    if device.type == "cuda":
        dtypes.append(torch.float16)
    gflops = {}
    for dtype in dtypes:
        a = torch.rand(side, side, device=device).to(dtype)
        b = torch.rand(side, side, device=device).to(dtype)
        sec = _best_seconds(lambda a=a, b=b: a @ b, device, tries)
        gflops[str(dtype).removeprefix("torch.")] = 2 * side**3 / sec / 1e9
    return {
        "read_gbps": nbytes / read_s / 1e9,
        "copy_gbps": 2 * nbytes / copy_s / 1e9,  # read + write
        "matmul_gflops": gflops,
        "bandwidth_bytes": nbytes,
        "matmul_side": side,
        "tries": tries,
    }


def peak_gflops(ceilings: dict, dtype: str) -> float:
    """The measured matmul rate for a case dtype name (``bf16``, ``fp16``, ``fp32``)."""
    names = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
    rates = ceilings["matmul_gflops"]
    return rates.get(names.get(dtype, dtype)) or rates["float32"]
