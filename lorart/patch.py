"""Patch any ``nn.Module`` (HF transformers models included) with ``LoRALinear`` layers.

``patch`` replaces module *instances* through their parent (``setattr``), never
classes, and installs two instance-level hooks so a patched model takes PEFT's
mixed-batch argument:

    model(input_ids, adapter_names=["a", "__base__", "b"])       one name per sequence
    model.generate(input_ids, adapter_names=[...])

A forward pre-hook (with kwargs) pops ``adapter_names`` and sets the per-sequence
ids that every ``LoRALinear`` reads (``AdapterRegistry.rows``); a forward hook clears
them. ``generate`` is wrapped by an instance attribute that does the same around the
whole generation. ``unpatch`` removes hooks and wrapper and puts the original modules
back.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence

from torch import nn

from .layers import AdapterRegistry, LoRALinear, is_linear_like
from .quant import check_group_size

_STATE_ATTR = "_lorart_patch_state"
QUANTIZE_SCHEMES = {None: None, "int4": "asym", "asym": "asym", "sym": "sym", "nf4": "nf4"}


class PatchState:
    """What ``patch`` changed on one model, so ``unpatch`` can undo it."""

    def __init__(self) -> None:
        self.registry = AdapterRegistry()
        self.wrapped_generate = False


def _output_layer_names(model: nn.Module) -> set[str]:
    """Module paths of the output layer that ``"all-linear"`` skips (PEFT's rule)."""
    names = {"lm_head"}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
        if out is not None:
            names |= {n for n, m in model.named_modules() if m is out}
    return names


def _name_match(key: str, names) -> bool:
    """PEFT's matching: a str is a regex full-matched against the module path ``key``;
    a list matches a path equal to an entry or ending in ``"." + entry``."""
    if isinstance(names, str):
        return re.fullmatch(names, key) is not None
    return any(key == t or key.endswith("." + t) for t in names)


def matches_target(key: str, target_modules, exclude_modules=None) -> bool:
    """Whether module path ``key`` is selected by ``target_modules`` and not excluded."""
    if exclude_modules and _name_match(key, exclude_modules):
        return False
    return _name_match(key, target_modules)


def find_targets(model: nn.Module, target_modules, exclude_modules=None) -> list[str]:
    """Paths of the linear layers (``nn.Linear``, ``Conv1D``, ``LoRALinear``) selected by
    ``target_modules``: a list of names (suffix match), a regex, or ``"all-linear"``."""
    if target_modules is None:
        raise ValueError("target_modules must be a list of module names, a regex string or "
                         "'all-linear', got None")
    if not isinstance(target_modules, str | Sequence):
        raise TypeError(f"target_modules must be a list of names, a regex string or "
                        f"'all-linear', got {type(target_modules).__name__}")
    out = []
    if target_modules == "all-linear":
        skip = _output_layer_names(model)
        for path, module in model.named_modules():
            last = path.rsplit(".", 1)[-1]
            if (is_linear_like(module) or isinstance(module, LoRALinear)) and \
                    path not in skip and last not in skip and \
                    matches_target(path, r".*", exclude_modules):
                out.append(path)
        return out
    for path, module in model.named_modules():
        if path and matches_target(path, target_modules, exclude_modules):
            if not (is_linear_like(module) or isinstance(module, LoRALinear)):
                raise TypeError(f"target module {path!r} is a {type(module).__name__}; lorart "
                                f"adapts only nn.Linear and Conv1D layers")
            out.append(path)
    return out


def get_submodule_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, name = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), name


def patch_state(model: nn.Module) -> PatchState | None:
    return model.__dict__.get(_STATE_ATTR)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    """``(path, layer)`` for every ``LoRALinear`` in ``model``."""
    for path, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield path, module


def patch(model: nn.Module, target_modules="all-linear", quantize: str | None = None,
          group_size: int = 128, exclude_modules=None) -> nn.Module:
    """Replace the selected linear layers of ``model`` by ``LoRALinear`` (in place).

    Args:
        model: any ``nn.Module``; HF transformers models keep ``forward``/``generate``.
        target_modules: list of module names (suffix match, like PEFT), a regex string
            (full match on the module path), or ``"all-linear"`` (every Linear/Conv1D
            except the output layer ``lm_head``).
        quantize: ``None`` (keep dense), ``"int4"`` (asym 4-bit), ``"sym"`` or ``"nf4"``;
            quantizing frees the float weights.
        group_size: quantization group along in_features (32, 64, 128 or 256).

    Calling it again patches further layers (already patched ones are left alone).
    Returns ``model``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if quantize not in QUANTIZE_SCHEMES:
        raise ValueError(f"quantize must be one of {list(QUANTIZE_SCHEMES)}, got {quantize!r}")
    scheme = QUANTIZE_SCHEMES[quantize]
    paths = find_targets(model, target_modules, exclude_modules)
    if not paths:
        raise ValueError(f"target_modules={target_modules!r} matched no linear layer of "
                         f"{type(model).__name__}")
    todo = [p for p in paths if not isinstance(model.get_submodule(p), LoRALinear)]
    if scheme is not None:  # check every layer before changing any
        check_group_size(group_size)
        for p in todo:
            m = model.get_submodule(p)
            in_f = m.weight.shape[0] if not isinstance(m, nn.Linear) else m.in_features
            if in_f % group_size != 0:
                raise ValueError(f"cannot quantize {p!r}: in_features={in_f} is not divisible "
                                 f"by group_size={group_size}")
    state = ensure_patch_state(model)
    for p in todo:
        parent, name = get_submodule_parent(model, p)
        layer = LoRALinear.from_linear(getattr(parent, name), scheme, group_size,
                                       state.registry)
        setattr(parent, name, layer)
    return model


def ensure_patch_state(model: nn.Module) -> PatchState:
    """The model's ``PatchState``; created (hooks installed, one registry shared by all
    ``LoRALinear`` layers already in the model) if missing."""
    state = patch_state(model)
    if state is None:
        state = PatchState()
        for _, layer in lora_layers(model):  # layers built elsewhere, e.g. from_gguf
            if layer.registry.names:
                state.registry = layer.registry
                break
        for _, layer in lora_layers(model):
            if layer.registry is not state.registry:
                for n in layer.registry.names:
                    state.registry.register(n)
                layer.__dict__["registry"] = state.registry
        _install_hooks(model, state)
        model.__dict__[_STATE_ATTR] = state
    return state


def unpatch(model: nn.Module) -> nn.Module:
    """Undo ``patch``: original modules back (dense weights; a quantized base comes back
    dequantized), hooks and the ``generate`` wrapper removed. Returns ``model``."""
    state = patch_state(model)
    if state is None:
        raise ValueError("model is not patched by lorart")
    for path, layer in list(lora_layers(model)):
        parent, name = get_submodule_parent(model, path)
        if layer.original is not None:
            setattr(parent, name, layer.to_original())
    _remove_hooks(model, state)
    state.registry.rows = None
    del model.__dict__[_STATE_ATTR]
    return model


# ------------------------------------------------------------------ mixed batches
# Hooks and the generate wrapper find the registry through the module they run on
# (never a closure), so a deep-copied patched model routes to its own layers.
def _adapter_names_pre_hook(module, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    if names is not None:
        registry = patch_state(module).registry
        registry.rows = registry.rows_from_names(names)
        module.__dict__["_lorart_clear_rows"] = True  # this call set them, it clears
    return args, kwargs


def _adapter_names_post_hook(module, args, output):
    if module.__dict__.pop("_lorart_clear_rows", False):
        patch_state(module).registry.rows = None
    return output


class _GenerateWithAdapters:
    """``model.generate`` taking ``adapter_names=[...]`` (one per sequence), as PEFT does."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.__wrapped__ = type(model).generate
        self.__doc__ = type(model).generate.__doc__

    def __call__(self, *args, adapter_names=None, **kwargs):
        generate = type(self.model).generate.__get__(self.model)
        if adapter_names is None:
            return generate(*args, **kwargs)
        registry = patch_state(self.model).registry
        registry.rows = registry.rows_from_names(adapter_names)
        try:
            return generate(*args, **kwargs)
        finally:
            registry.rows = None


def _install_hooks(model: nn.Module, state: PatchState) -> None:
    model.register_forward_pre_hook(_adapter_names_pre_hook, with_kwargs=True)
    model.register_forward_hook(_adapter_names_post_hook, always_call=True)
    if callable(getattr(type(model), "generate", None)) and "generate" not in model.__dict__:
        model.__dict__["generate"] = _GenerateWithAdapters(model)
        state.wrapped_generate = True


def _remove_hooks(model: nn.Module, state: PatchState) -> None:
    for hooks, fn in ((model._forward_pre_hooks, _adapter_names_pre_hook),
                      (model._forward_hooks, _adapter_names_post_hook)):
        for key in [k for k, h in hooks.items() if h is fn]:
            del hooks[key]
            for extra in (model._forward_pre_hooks_with_kwargs, model._forward_hooks_always_called,
                          model._forward_hooks_with_kwargs):
                extra.pop(key, None)
    if state.wrapped_generate:
        model.__dict__.pop("generate", None)


# ------------------------------------------------------------------ model-level API
def _layers_or_error(model: nn.Module) -> list[LoRALinear]:
    layers = [m for _, m in lora_layers(model)]
    if not layers:
        raise ValueError("model has no LoRALinear layers; call lorart.patch or "
                         "lorart.load_adapter first")
    return layers


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters loaded into ``model``, in registry order."""
    layers = _layers_or_error(model)
    return [n for n in layers[0].registry.names if any(n in lyr.lora_A for lyr in layers)]


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Use adapter ``name`` for every layer that has it (others run the base);
    ``None`` or ``"__base__"``: no adapter."""
    layers = _layers_or_error(model)
    if name is not None and name != "__base__" and not any(name in lyr.lora_A for lyr in layers):
        raise ValueError(f"unknown adapter {name!r}; loaded: {adapter_names(model)}")
    for layer in layers:
        layer.active_adapter = None if name == "__base__" else name


def add_adapter(model: nn.Module, name: str, r: int = 8, lora_alpha: float | None = None,
                use_rslora: bool = False, init_lora_weights: bool = True,
                target_modules=None) -> None:
    """Add a fresh adapter to the patched layers of ``model`` (or those matching
    ``target_modules``, patching them if needed)."""
    if target_modules is not None:
        patch(model, target_modules)
        paths = set(find_targets(model, target_modules))
    else:
        paths = {p for p, _ in lora_layers(model)}
        if not paths:
            raise ValueError("model has no LoRALinear layers; pass target_modules or patch it")
    for path, layer in lora_layers(model):
        if path in paths and name in layer.lora_A:
            raise ValueError(f"adapter {name!r} already exists in {path!r}")
    for path, layer in lora_layers(model):
        if path in paths:
            layer.add_adapter(name, r, lora_alpha, use_rslora, init_lora_weights)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter ``name`` from every layer that has it."""
    layers = [lyr for lyr in _layers_or_error(model) if name in lyr.lora_A]
    if not layers:
        raise ValueError(f"unknown adapter {name!r}")
    for layer in layers:
        layer.delete_adapter(name)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """``with lorart.disable_adapters(model):`` runs the base model only."""
    layers = _layers_or_error(model)
    before = [lyr.disabled for lyr in layers]
    for layer in layers:
        layer.disabled = True
    try:
        yield model
    finally:
        for layer, was in zip(layers, before):
            layer.disabled = was


def merge_adapter(model: nn.Module, name: str, requantize: bool = False) -> None:
    """Merge adapter ``name`` into the base of every layer that has it."""
    for layer in _layers_or_error(model):
        if name in layer.lora_A:
            layer.merge(name, requantize)


def unmerge_adapter(model: nn.Module, name: str, requantize: bool = False) -> None:
    for layer in _layers_or_error(model):
        if name in layer.merged:
            layer.unmerge(name, requantize)
