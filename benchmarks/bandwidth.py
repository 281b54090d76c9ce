"""Measured memory read bandwidth of this machine, the yardstick for memory-bound decode.

Two streaming reads of a buffer far larger than the last-level cache: ``torch.sum`` and
lorart's own C++ read loop (``lorart._C.stream_sum``, all OpenMP threads); the best of
several repeats of either is reported, as GB/s (1e9 bytes per second).
"""

from __future__ import annotations

import time

import torch

from lorart.bench.roofline import layer_bytes as roofline_layer_bytes
from lorart.bench.roofline import q4_weight_bytes


def measure_read_bandwidth(nbytes: int = 512 << 20, repeats: int = 7) -> dict:
    """``{"gbps": best, "torch_sum_gbps": ..., "stream_sum_gbps": ..., "bytes": nbytes}``."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    results = {"bytes": nbytes}
    probes = {"torch_sum_gbps": lambda: buf.sum()}
    try:
        from lorart import _C

        probes["stream_sum_gbps"] = lambda: _C.stream_sum(buf.data_ptr(), buf.numel())
    except ImportError:  # no compiled backend: torch alone
        pass
    for name, probe in probes.items():
        probe()  # fault the pages in, warm the threads
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            probe()
            best = min(best, time.perf_counter() - start)
        results[name] = nbytes / best / 1e9
    results["gbps"] = max(v for k, v in results.items() if k.endswith("_gbps"))
    return results


def layer_bytes(n: int, k: int, rows: int, rank: int, group_size: int, act_bytes: int,
                scale_bytes: int = 2, offsets: bool = True) -> int:
    """Bytes one fused 4-bit LoRA layer must move (``lorart.bench.roofline``): packed weight
    + scales + offsets + adapter (A [r, K], B [N, r]) + activations (x [M, K], y [M, N])."""
    weight = q4_weight_bytes(n, k, group_size, scale_bytes, offsets)
    return roofline_layer_bytes(rows, n, k, weight, [rank], act_bytes)


if __name__ == "__main__":
    print(measure_read_bandwidth())
