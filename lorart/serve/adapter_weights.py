"""One adapter's weights in host memory, read and validated from PEFT files or tensors.

``AdapterWeights.layers`` maps a projection's module path to ``(A [r, K], B [N, r],
scale)`` in PEFT's shapes. Validation is ``lorart.peft_format``'s, shared with
``load_adapter`` (config fields, key names, pickle refusal, every shape against the
served model) and done before the adapter is accepted, so a bad adapter is rejected whole.

A weighted combination ``[(a, w_a), (b, w_b)]`` is itself an ``AdapterWeights``: per
layer, A is the concatenation of the parts' A rows and B the concatenation of the
parts' B columns each multiplied by ``w · scale``, with scale 1 — rank = sum of ranks,
nothing padded:   Σ w_i c_i B_i A_i  =  [w_a c_a B_a | w_b c_b B_b] · [A_a ; A_b].
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import peft_format
from .errors import AdapterLoadError

_versions = itertools.count(1)


@dataclass(eq=False)
class AdapterWeights:
    """Host copy of one adapter version (see module doc). Identity = one version:
    replacing an adapter under the same name makes a new object."""

    name: str
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, float]]
    source: str | None = None
    version: int = field(default_factory=lambda: next(_versions))

    @property
    def rank(self) -> int:
        """Largest rank over the layers (what one resident slot must hold)."""
        return max(a.shape[0] for a, _, _ in self.layers.values())

    @property
    def nbytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size()
                   for a, b, _ in self.layers.values())


def read_dir(name: str, path: str | Path, model, shapes: dict[str, tuple[int, int]]
             ) -> AdapterWeights:
    """Read a PEFT adapter directory; ``AdapterLoadError`` if anything is wrong."""
    try:
        raw, tensors = peft_format.read_dir(path)
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(f"adapter {name!r}: {exc}") from exc
    return from_tensors(name, tensors, raw, model, shapes, source=str(path))


def from_tensors(name: str, tensors: dict[str, torch.Tensor], config: dict, model,
                 shapes: dict[str, tuple[int, int]], source: str | None = None
                 ) -> AdapterWeights:
    """Build from PEFT-keyed tensors (``base_model.model.<module>.lora_A.weight`` ...)
    and a PEFT config dict; every key and shape is checked against ``shapes``
    (``{module path: (out, in)}`` of the projections the engine serves)."""
    where = source or f"adapter {name!r}"
    try:
        cfg = peft_format.AdapterConfig(config, f"{where} config")
        if not isinstance(tensors, dict) or not all(
                isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in tensors.items()):
            raise ValueError(f"{where}: tensors must map PEFT key strings to tensors")
        by_module = peft_format.lora_pairs(tensors, where)
        if not by_module:
            raise ValueError(f"{where}: no LoRA weights")
        selected = peft_format.targeted(model, cfg, where)
        if selected is not None:
            missing = sorted((selected & set(shapes)) - set(by_module))
            if missing:
                raise ValueError(f"{where}: missing weights for {missing[:3]} "
                                 f"({len(missing)} modules) selected by target_modules")
        layers = {}
        for path, pair in sorted(by_module.items()):
            layers[path] = _check_layer(path, pair, cfg, shapes, where)
    except ValueError as exc:
        if isinstance(exc, AdapterLoadError):
            raise
        raise AdapterLoadError(f"adapter {name!r}: {exc}") from exc
    return AdapterWeights(name, layers, source)


def _check_layer(path: str, pair: dict, cfg, shapes, where: str):
    if path not in shapes:
        raise ValueError(f"{where}: adapter targets module {path!r}, which is not a "
                         f"LoRA-patched projection of the served model")
    if cfg.fan_in_fan_out:
        raise ValueError(f"{where}: fan_in_fan_out=True (Conv1D) is not served")
    a, b = peft_format.check_pair(path, pair, cfg, *shapes[path], where)
    return a.detach().float().contiguous(), b.detach().float().contiguous(), cfg.scale(path)


def from_model(model, name: str, layers) -> AdapterWeights:
    """Adapter ``name`` already loaded into the model's ``LoRALinear`` layers
    (``[(path, layer), ...]``) as a host copy."""
    out = {}
    for path, layer in layers:
        if name in layer.lora_A:
            out[path] = (layer.lora_A[name].detach().float().clone(),
                         layer.lora_B[name].detach().float().clone(), layer.scaling(name))
    return AdapterWeights(name, out, source=None)


def combine(parts: list[tuple[AdapterWeights, float]]) -> AdapterWeights:
    """The weighted sum of adapters as one ragged adapter (see module doc)."""
    layers = {}
    paths = sorted({p for w, _ in parts for p in w.layers})
    for path in paths:
        a_rows, b_cols = [], []
        for weights, w in parts:
            if path in weights.layers:
                a, b, scale = weights.layers[path]
                a_rows.append(a)
                b_cols.append(b * (w * scale))
        layers[path] = (torch.cat(a_rows, 0), torch.cat(b_cols, 1), 1.0)
    name = "+".join(f"{w:g}*{weights.name}" for weights, w in parts)
    return AdapterWeights(name, layers, source=None)
