"""The Triton backend: fused LoRA linear kernels for GPUs (CPU tensors under TRITON_INTERPRET=1).

Kernel files, one purpose each:

    weights.py       dequantize a base-weight tile in registers (dense / asym / sym / nf4 /
                     int8)
    fused_linear.py  base + bias + LoRA in one launch (one adapter, or BGMV per-row gather)
    sgmv.py          shrink (x·Aᵀ), expand (y += c·t·Bᵀ) and per-adapter reductions over
                     the batch's adapter segments (SGMV), for prefill and backward
    backward.py      dX = dY·W (dequantized in-kernel) + the LoRA gradients
    configs.py       block sizes and path choices (lazy, keyed on bucketed sizes)
    launch.py        operand dtypes, weight arguments, adapter metadata
    backend.py       ``TritonBackend``: the registry's entry point

Importing this package imports neither triton nor the kernels (``backend.py`` loads
them on first use), so ``lorart`` imports and reports status without triton or a GPU.
"""

from .backend import TritonBackend

__all__ = ["TritonBackend"]
