"""8-bit (int8) CPU kernels: decode GEMV vs many-row path vs torch on the dense fp32 W.

    python benchmarks/bench_int8.py [--reps 20]

Prints one line per (shape, rows): median ms of the C++ decode path, the many-row path and
``torch.nn.functional.linear`` on the dequantized fp32 weight (what lorart ran before the
8-bit layout existed), same process, interleaved. Chooses ``INT8_DECODE_MAX_ROWS``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lorart
from lorart.backend import cpu, cpu_int8

SHAPES = [(49152, 576, 32), (2048, 2048, 32)]  # SmolLM2 tied output (Q8_0), a square layer
ROWS = [1, 2, 4, 8, 16, 64]


def _median_ms(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    print(f"threads={torch.get_num_threads()}  isa={cpu.isa()}  "
          f"8-bit kernels={lorart._C.int8_isa()}")
    print(f"{'N x K':>12} {'rows':>5} {'decode ms':>10} {'many ms':>9} {'torch fp32 ms':>14}")
    for n, k, g in SHAPES:
        qw = lorart.quantize(torch.randn(n, k), g, "int8")
        dense = qw.dequantize()
        for m in ROWS:
            x = torch.randn(m, k)

            def run(rows_limit, x=x, qw=qw):
                return cpu_int8.forward(x, qw.qweight, qw.scales, qw.offsets, qw.group_size,
                                        None, None, None, [0], [], None, rows_limit)

            dec = _median_ms(lambda: run(1 << 30), args.reps)
            many = _median_ms(lambda: run(0), args.reps)
            ref = _median_ms(lambda x=x, d=dense: torch.nn.functional.linear(x, d), args.reps)
            print(f"{n:>6}x{k:<5} {m:>5} {dec:>10.3f} {many:>9.3f} {ref:>14.3f}")


if __name__ == "__main__":
    main()
