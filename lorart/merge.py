"""``merge_and_unload``: fold one adapter into the base weights and drop lorart's layers.

Like PEFT's ``merge_and_unload``: every ``LoRALinear`` that has the adapter gets
``W + scale · B A``; then each ``LoRALinear`` is replaced by a plain module and the model's
lorart hooks are removed. For a layer of base ``W [N, K]``:

    dense base                    -> nn.Linear, W + scale·B·A (exact up to float rounding)
    quantized, dequantize=True    -> nn.Linear (float32), dequantize(W) + scale·B·A (exact)
    quantized, requantize=True    -> stays a LoRALinear with a re-quantized packed base and
                                     no adapters; lossy: the largest |error| against the
                                     exact merge is stated in a warning and returned
    quantized, neither            -> ValueError before anything changes

GPT-2 ``Conv1D`` layers come back as ``Conv1D`` (weight ``[K, N]``).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .layers import LoRALinear
from .patch import get_submodule_parent, lora_layers, patch_state, unpatch
from .quant import quantize


def merge_and_unload(model: nn.Module, adapter: str | None = None, requantize: bool = False,
                     dequantize: bool = False) -> nn.Module:
    """Merge ``adapter`` into ``model``'s base weights and remove every ``LoRALinear``.

    Args:
        model: a model patched by lorart (``patch``, ``load_adapter``, ``from_gguf``).
        adapter: the adapter to merge (``None``: merge nothing, just unload).
        requantize: quantized bases are re-quantized with their own scheme and group size
            (lossy; they stay packed ``LoRALinear`` layers without adapters).
        dequantize: quantized bases become float32 ``nn.Linear`` layers (exact).

    Returns ``model`` (changed in place), as PEFT does. With ``requantize`` the largest
    absolute weight error against the exact merge is stated in a ``UserWarning`` and kept
    as ``model.lorart_merge_error``.
    """
    layers = list(lora_layers(model))
    if not layers:
        raise ValueError("model has no LoRALinear layers (not patched by lorart?)")
    if requantize and dequantize:
        raise ValueError("pass at most one of requantize=True and dequantize=True")
    if adapter is not None and not any(adapter in lyr.lora_A for _, lyr in layers):
        names = sorted({n for _, lyr in layers for n in lyr.adapter_names})
        raise ValueError(f"model has no adapter named {adapter!r}; it has {names}")
    quantized = [p for p, lyr in layers if lyr.is_quantized]
    if quantized and not (requantize or dequantize):
        raise ValueError(
            f"{len(quantized)} layers (e.g. {quantized[0]!r}) have a quantized base: merging "
            f"into it needs requantize=True (stays packed, adds the re-quantization error) or "
            f"dequantize=True (exact, float32 weights)")
    for _, lyr in layers:
        if lyr.merged:
            raise ValueError(f"adapters {lyr.merged} are merged already; unmerge them first")
    worst = 0.0
    for path, layer in layers:
        delta = layer.delta_weight(adapter) if adapter in layer.lora_A else None
        if layer.is_quantized and requantize:
            worst = max(worst, _requantize(layer, delta))
            continue
        parent, attr = get_submodule_parent(model, path)
        setattr(parent, attr, _plain_module(layer, delta))
    if requantize and quantized:
        model.lorart_merge_error = worst
        warnings.warn(f"merge_and_unload: re-quantizing merged weights changed them by up to "
                      f"{worst:.3e} (absolute) against the exact merge", stacklevel=2)
    if patch_state(model) is not None and not any(True for _ in lora_layers(model)):
        unpatch(model)  # nothing left to restore: removes the hooks and the patch state
    return model


def _plain_module(layer: LoRALinear, delta: torch.Tensor | None) -> nn.Module:
    """An ``nn.Linear`` (or the original ``Conv1D``) holding the merged weight."""
    base = layer.base
    w = base.dequantize(torch.float32) if layer.is_quantized else base.detach()
    if delta is not None:
        w = (w.float() + delta).to(w.dtype)
    bias = None if layer.bias is None else layer.bias.detach()
    original = layer.original
    if layer.fan_in_fan_out and original is not None:  # Conv1D: weight [K, N]
        original.weight = nn.Parameter(w.t().contiguous(), requires_grad=False)
        return original
    linear = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                       device="meta")
    linear.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias, requires_grad=False)
    return linear


def _requantize(layer: LoRALinear, delta: torch.Tensor | None) -> float:
    """Re-quantize ``layer``'s base with ``delta`` added; drop its adapters. The max error."""
    for name in layer.adapter_names:
        layer.delete_adapter(name)
    if delta is None:
        return 0.0
    qw = layer.base
    exact = qw.dequantize(torch.float32) + delta
    new = quantize(exact, qw.group_size, qw.scheme, qw.scales.dtype)
    layer._set_base(new)
    return float((new.dequantize(torch.float32) - exact).abs().max())
