"""lorart: a compiled-kernel LoRA runtime for PyTorch.

Fused base linear + LoRA + 4-bit dequantization, for one adapter or many adapters
per batch, on CPU (C++), GPU (Triton, CUDA) and everywhere else (torch reference).
"""

from __future__ import annotations

from .adapters import AdapterBatch, AdapterStack
from .backend import available_backends as _available_backends
from .ops import lora_linear, multi_lora_linear
from .quant import QuantizedWeight, quantize

__version__ = "0.1.0"


def backends() -> dict[str, tuple[bool, str]]:
    """``{name: (available, reason)}`` for the torch, cpu, triton and cuda backends."""
    return _available_backends()


__all__ = [
    "AdapterBatch",
    "AdapterStack",
    "QuantizedWeight",
    "backends",
    "lora_linear",
    "multi_lora_linear",
    "quantize",
]
