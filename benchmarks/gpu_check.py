"""One command for a lent GPU: every Triton and CUDA kernel checked at real shapes, then timed.

    python benchmarks/gpu_check.py [--out results.jsonl] [--budget-s 330]
    python benchmarks/gpu_check.py --dry-run      # tiny shapes, CPU, TRITON_INTERPRET=1

The cases, baselines, targets and table live in :mod:`lorart.bench.gpu` (its docstring
says what is checked and timed); this file is the entry point.
"""

import os
import sys

if __name__ == "__main__":
    if "--dry-run" in sys.argv:
        os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton
    from lorart.bench.gpu import main

    sys.exit(main())
