"""SmolLM2 greedy generation with many adapters: lorart 4-bit, lorart float32, PEFT float32.

    python benchmarks/bench_generate.py [--adapters 1 4 16] [--repeats 2] [--out gen.jsonl]

The benchmark lives in :mod:`lorart.bench.generate` (its docstring says what is measured).
"""

import sys

from lorart.bench.generate import main

if __name__ == "__main__":
    sys.exit(main())
