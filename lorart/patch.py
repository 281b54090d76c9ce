"""Patch any ``nn.Module`` (HF transformers models included) with ``LoRALinear`` layers.

``patch`` replaces module *instances* through their parent (``setattr``), never
classes, and installs two instance-level hooks so a patched model takes PEFT's
mixed-batch argument:

    model(input_ids, adapter_names=["a", "__base__", "b"])       one name per sequence
    model.generate(input_ids, adapter_names=[...])
    with lorart.route(model, adapter_names=[...]) / route(model, adapter_ids=ids [M]):
        model(...)                                               any forward(s) inside

A forward pre-hook (with kwargs) pops ``adapter_names``, checks there is one per
sequence and makes them the call's route (``lorart.routing``: a ContextVar, so threads
sharing the model never see each other's adapters); a forward hook (always called)
restores the previous route. ``generate`` is wrapped by an instance attribute that does
the same around the whole generation. The hooks are kept as ``RemovableHandle``s;
``unpatch`` removes them through the handles, drops the wrapper and puts the original
modules back. The model-level adapter API (``adapter_names``, ``add_adapter``,
``set_adapter``, ...) is at the end of this file and exported as ``lorart.*``.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from contextvars import ContextVar

import torch
from torch import nn

from . import routing
from .layers import AdapterRegistry, LoRALinear, is_linear_like
from .quant import SCALE_DTYPES, bits_of, check_group_size
from .routing import BASE_ADAPTER, Route

_STATE_ATTR = "_lorart_patch_state"
QUANTIZE_SCHEMES = {None: None, "int4": "asym", "asym": "asym", "sym": "sym", "nf4": "nf4",
                    "int8": "int8"}


class PatchState:
    """What ``patch`` changed on one model, so ``unpatch`` can undo it."""

    def __init__(self) -> None:
        self.registry = AdapterRegistry()
        self.handles: list = []  # RemovableHandles of the two forward hooks
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
          group_size: int = 128, exclude_modules=None,
          scale_dtype: torch.dtype = torch.float16) -> nn.Module:
    """Replace the selected linear layers of ``model`` by ``LoRALinear`` (in place).

    Args:
        model: any ``nn.Module``; HF transformers models keep ``forward``/``generate``.
        target_modules: list of module names (suffix match, like PEFT), a regex string
            (full match on the module path), or ``"all-linear"`` (every Linear/Conv1D
            except the output layer ``lm_head``).
        quantize: ``None`` (keep dense), ``"int4"`` (asym 4-bit), ``"sym"``, ``"nf4"`` or
            ``"int8"`` (symmetric 8-bit, GGUF Q8_0's rule); quantizing frees the float
            weights.
        group_size: quantization group along in_features (32, 64, 128 or 256; also 16
            for ``"int8"``).
        scale_dtype: ``torch.float16`` (default) or ``torch.float32`` group scales.

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
        check_group_size(group_size, bits=bits_of(scheme))
        if scale_dtype not in SCALE_DTYPES:
            raise TypeError(f"scale_dtype must be torch.float16 or torch.float32, got "
                            f"{scale_dtype!r}")
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
                                       state.registry, scale_dtype)
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
    for handle in state.handles:
        handle.remove()
    if state.wrapped_generate:
        model.__dict__.pop("generate", None)
    del model.__dict__[_STATE_ATTR]
    return model


# ------------------------------------------------------------------ mixed batches
# Hooks and the generate wrapper find the registry through the module they run on
# (never a closure), so a deep-copied patched model routes to its own layers.
_HOOK_TOKENS: ContextVar[tuple] = ContextVar("lorart_hook_tokens", default=())


def _num_sequences(args, kwargs) -> int | None:
    """Batch size of the call's ``input_ids``/``inputs``/``inputs_embeds`` (None: unknown)."""
    for t in (kwargs.get("input_ids"), kwargs.get("inputs"), kwargs.get("inputs_embeds"),
              args[0] if args else None):
        if isinstance(t, torch.Tensor) and t.dim() >= 2:
            return t.shape[0]
    return None


def _adapter_names_pre_hook(module, args, kwargs):
    names = kwargs.pop("adapter_names", None)
    _HOOK_TOKENS.set((*_HOOK_TOKENS.get(), None))  # popped by the post-hook, even on error
    if names is not None:
        route = Route.from_names(patch_state(module).registry, names,
                                 _num_sequences(args, kwargs))
        _HOOK_TOKENS.set((*_HOOK_TOKENS.get()[:-1], routing.enter(route)))
    return args, kwargs


def _adapter_names_post_hook(module, args, output):
    *rest, token = _HOOK_TOKENS.get() or (None,)
    _HOOK_TOKENS.set(tuple(rest))
    if token is not None:
        routing.leave(token)
    return output


def _expansion(model: nn.Module, kwargs) -> int:
    """How many rows ``generate`` makes of each input: ``max(num_beams,
    num_return_sequences)``, as ``GenerationMixin._expand_inputs_for_generation``."""
    config = kwargs.get("generation_config") or getattr(model, "generation_config", None)
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    returns = kwargs.get("num_return_sequences", getattr(config, "num_return_sequences", 1)) or 1
    return max(int(beams), int(returns))


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
        route = Route.from_names(patch_state(self.model).registry, adapter_names,
                                 _num_sequences(args, kwargs), _expansion(self.model, kwargs))
        with routing.using(route):
            return generate(*args, **kwargs)


def _install_hooks(model: nn.Module, state: PatchState) -> None:
    state.handles = [
        model.register_forward_pre_hook(_adapter_names_pre_hook, with_kwargs=True),
        model.register_forward_hook(_adapter_names_post_hook, always_call=True)]
    if callable(getattr(type(model), "generate", None)) and "generate" not in model.__dict__:
        model.__dict__["generate"] = _GenerateWithAdapters(model)
        state.wrapped_generate = True


@contextlib.contextmanager
def route(model: nn.Module, adapter_names: Sequence[str | None] | None = None,
          adapter_ids=None):
    """Route every forward of ``model`` inside the block (this thread/task only).

    Give exactly one of:
        adapter_names: one name per sequence (``"__base__"`` or ``None``: no adapter);
            a layer with ``B·T`` rows gives each name ``T`` consecutive rows.
        adapter_ids: one *global* adapter index per row ``[M]`` (int tensor or list, or
            an ``AdapterBatch``; ``-1`` = base; index = position in
            ``lorart.adapter_names(model)``): for packed, ragged batches where every
            token has its own adapter (x ``[M, K]`` or ``[1, M, K]``).
    Checked once here (names known, ids in range); calls to sub-modules are routed too.
    """
    registry = ensure_patch_state(model).registry
    if (adapter_names is None) == (adapter_ids is None):
        raise ValueError("give exactly one of adapter_names (one per sequence) and "
                         "adapter_ids (one global index per row)")
    r = (Route.from_names(registry, adapter_names) if adapter_names is not None
         else Route.from_ids(registry, adapter_ids))
    with routing.using(r):
        yield r


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
    if name is not None and name != BASE_ADAPTER and not any(name in lyr.lora_A for lyr in layers):
        raise ValueError(f"unknown adapter {name!r}; loaded: {adapter_names(model)}")
    for layer in layers:
        layer.active_adapter = None if name == BASE_ADAPTER else name


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
    freeze_base(model)


def freeze_base(model: nn.Module) -> None:
    """PEFT's rule once adapters are added: only the adapters' A and B train; every other
    parameter (embeddings, norms, base weights, biases) stops requiring grad."""
    lora = {id(p) for _, layer in lora_layers(model)
            for p in (*layer.lora_A.values(), *layer.lora_B.values())}
    for p in model.parameters():
        if id(p) not in lora:
            p.requires_grad_(False)


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
