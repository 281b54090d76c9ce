"""The CUDA C++ decode kernels alone: ``python benchmarks/gpu_check_cuda.py [--dry-run]``.

The check lives in :mod:`lorart.bench.gpu_cuda`; ``benchmarks/gpu_check.py`` runs it too.
"""

import sys

from lorart.bench.gpu_cuda import main

if __name__ == "__main__":
    sys.exit(main())
