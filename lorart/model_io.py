"""Save and load a whole lorart model (quantized bases, adapters) as one safetensors file.

``save_model(model, path)`` writes every tensor the model holds — packed bases
(``qweight``/``scales``/``offsets`` of each ``LoRALinear`` and ``QuantizedEmbedding``),
dense weights, biases, norms, every adapter's A and B, rotary frequencies — into
``path/model.safetensors``; the safetensors header carries, as JSON strings, the
transformers config and class, and per lorart module its kind, layout (scheme, group size)
and adapters (rank, alpha, rsLoRA, active one). ``load_model(path)`` rebuilds the model on
the meta device and assigns those tensors: the round trip is exact (same bytes), nothing
is unpickled, and a file that does not fit raises ``ValueError`` before a model exists.

Scope: transformers models (``model.config``) patched by lorart or from ``from_gguf``.
Layers come back without the module they once replaced (``unpatch`` keeps them as
``LoRALinear``), as ``from_gguf``'s layers are.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .embedding import QuantizedEmbedding, QuantizedLinear, TiedQuantizedLinear
from .layers import AdapterRegistry, BaseLinear, LoRALinear
from .patch import ensure_patch_state, get_submodule_parent
from .quant import QuantizedWeight

WEIGHTS_NAME = "model.safetensors"
_FORMAT = "lorart.model"
_VERSION = "1"


def model_nbytes(model: nn.Module) -> int:
    """Bytes of every distinct storage ``model`` holds (parameters and buffers): what the
    model costs in memory, a tied embedding/output matrix counted once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _modules_meta(model: nn.Module) -> tuple[dict, list[str]]:
    """``{path: description}`` of every lorart module, and the adapter registry's order."""
    meta: dict[str, dict] = {}
    registry: list[str] = []
    for path, m in model.named_modules():
        if isinstance(m, LoRALinear):
            if m.merged:
                raise ValueError(f"{path}: adapters {m.merged} are merged into the base; "
                                 f"unmerge them (or merge_and_unload) before saving")
            registry = registry or list(m.registry.names)
            meta[path] = {
                "kind": "lora_linear", "in": m.in_features, "out": m.out_features,
                "bias": m.bias is not None, "fan_in_fan_out": m.fan_in_fan_out,
                "quant": _layout(m.base) if m.is_quantized else None,
                "active": m.active_adapter, "disabled": m.disabled,
                "adapters": {n: {"r": m.lora_A[n].shape[0], "alpha": m.lora_alpha[n],
                                 "rslora": m.use_rslora[n]} for n in m.adapter_names},
            }
        elif isinstance(m, QuantizedEmbedding):
            meta[path] = {"kind": "quantized_embedding", "quant": _layout(m.base),
                          "padding_idx": m.padding_idx}
        elif isinstance(m, QuantizedLinear):
            meta[path] = {"kind": "quantized_linear", "quant": _layout(m.base)}
        elif isinstance(m, TiedQuantizedLinear):
            embed = next(p for p, e in model.named_modules() if e is m.embedding)
            meta[path] = {"kind": "tied_quantized_linear", "embedding": embed}
        elif isinstance(m, BaseLinear):
            meta[path] = {"kind": "base_linear"}
    return meta, registry


def _layout(qw: QuantizedWeight) -> dict:
    return {"scheme": qw.scheme, "group_size": qw.group_size}


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every persistent tensor once (a tied weight under its first name), plus the rotary
    embeddings' non-persistent ``inv_freq`` (Llama 3 files change it)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if key in seen:
            continue  # tied: restored from the config's tie_word_embeddings
        seen[key] = name
        out[name] = t.detach().cpu().contiguous()
    for path, m in model.named_modules():
        inv = getattr(m, "inv_freq", None)
        if isinstance(inv, torch.Tensor):
            out[f"{path}.inv_freq"] = inv.detach().cpu().contiguous()
    return out


def save_model(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model`` (a lorart-patched transformers model) to ``path/model.safetensors``."""
    from safetensors.torch import save_file

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"save_model needs a transformers model (with .config), got "
                        f"{type(model).__name__}")
    modules, registry = _modules_meta(model)
    metadata = {
        "format": _FORMAT, "version": _VERSION,
        "model_class": type(model).__name__, "config_class": type(config).__name__,
        "config": json.dumps(config.to_dict()), "modules": json.dumps(modules),
        "registry": json.dumps(registry),
    }
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(model), str(root / WEIGHTS_NAME), metadata=metadata)


def load_model(path: str | os.PathLike) -> nn.Module:
    """The model saved by :func:`save_model` (eval mode, base frozen, patched)."""
    import transformers
    from safetensors import safe_open

    file = Path(path) / WEIGHTS_NAME
    if not file.exists():
        raise FileNotFoundError(f"{file} not found (written by lorart.save_model)")
    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != _FORMAT:
            raise ValueError(f"{file} is not a lorart model (format={meta.get('format')!r})")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config_cls = getattr(transformers, meta["config_class"], None)
    model_cls = getattr(transformers, meta["model_class"], None)
    if config_cls is None or model_cls is None:
        raise ValueError(f"{file}: transformers has no {meta['model_class']}/"
                         f"{meta['config_class']}")
    config = config_cls.from_dict(json.loads(meta["config"]))
    with torch.device("meta"):
        model = model_cls(config)
    registry = AdapterRegistry()
    for name in json.loads(meta["registry"]):
        registry.register(name)
    modules = json.loads(meta["modules"])
    used: set[str] = set()
    for mod_path, desc in modules.items():  # embeddings before their tied output layers
        if desc["kind"] == "quantized_embedding":
            _set(model, mod_path, QuantizedEmbedding(_packed(tensors, mod_path, desc, used),
                                                     desc["padding_idx"]))
    for mod_path, desc in modules.items():
        if desc["kind"] == "lora_linear":
            _set(model, mod_path, _lora_linear(tensors, mod_path, desc, registry, used))
        elif desc["kind"] == "quantized_linear":
            _set(model, mod_path, QuantizedLinear(_packed(tensors, mod_path, desc, used)))
        elif desc["kind"] == "tied_quantized_linear":
            _set(model, mod_path, TiedQuantizedLinear(model.get_submodule(desc["embedding"])))
    _load_rest(model, config, tensors, used, file)
    for mod_path, desc in modules.items():
        if desc["kind"] == "base_linear":
            _set(model, mod_path, BaseLinear.wrap(model.get_submodule(mod_path)))
    model.eval()
    for name, p in model.named_parameters():  # base frozen, adapters trainable
        p.requires_grad_(".lora_A." in name or ".lora_B." in name)
    ensure_patch_state(model)
    return model


def _set(model: nn.Module, path: str, module: nn.Module) -> None:
    parent, attr = get_submodule_parent(model, path)
    setattr(parent, attr, module)


def _take(tensors: dict, key: str, used: set, file=None) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"{file or 'file'}: tensor {key!r} is missing")
    used.add(key)
    return tensors[key]


def _packed(tensors: dict, path: str, desc: dict, used: set) -> QuantizedWeight:
    offsets = tensors.get(f"{path}.offsets")
    if offsets is not None:
        used.add(f"{path}.offsets")
    q = desc["quant"]
    return QuantizedWeight(_take(tensors, f"{path}.qweight", used),
                           _take(tensors, f"{path}.scales", used), offsets, int(q["group_size"]),
                           q["scheme"])


def _lora_linear(tensors: dict, path: str, desc: dict, registry: AdapterRegistry,
                 used: set) -> LoRALinear:
    if desc["quant"] is not None:
        base = _packed(tensors, path, desc, used)
    else:
        base = nn.Parameter(_take(tensors, f"{path}.weight", used), requires_grad=False)
    bias = _take(tensors, f"{path}.bias", used) if desc["bias"] else None
    layer = LoRALinear(desc["in"], desc["out"], base, bias, registry)
    layer.fan_in_fan_out = desc["fan_in_fan_out"]
    for name, a in desc["adapters"].items():
        lora_a = _take(tensors, f"{path}.lora_A.{name}", used)
        lora_b = _take(tensors, f"{path}.lora_B.{name}", used)
        layer.add_adapter(name, int(a["r"]), a["alpha"], a["rslora"], lora_a=lora_a,
                          lora_b=lora_b, dtype=lora_a.dtype)
    layer.active_adapter = desc["active"]
    layer.disabled = desc["disabled"]
    return layer


def _load_rest(model: nn.Module, config, tensors: dict, used: set, file: Path) -> None:
    """Assign the remaining (dense) tensors, then the rotary ``inv_freq`` and ties."""
    inv_freqs = {k: v for k, v in tensors.items() if k.endswith(".inv_freq")}
    rest = {k: v for k, v in tensors.items() if k not in used and k not in inv_freqs}
    result = model.load_state_dict(rest, strict=False, assign=True)
    tied = getattr(config, "tie_word_embeddings", False)
    missing = [k for k in result.missing_keys if not (tied and k == "lm_head.weight")
               and _on_meta(model, k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"{file}: missing tensors {missing[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}")
    if tied and isinstance(getattr(model, "lm_head", None), nn.Linear):
        model.lm_head.weight = model.get_input_embeddings().weight
    for key, value in inv_freqs.items():
        path = key.removesuffix(".inv_freq")
        old = model.get_submodule(path)
        rotary = type(old)(config)
        rotary.inv_freq = value
        rotary.original_inv_freq = value
        _set(model, path, rotary)


def _on_meta(model: nn.Module, key: str) -> bool:
    """Whether state-dict entry ``key`` still has no data (so it really is missing)."""
    try:
        t = model.get_parameter(key)
    except AttributeError:
        try:
            t = model.get_buffer(key)
        except AttributeError:
            return True
    return t.is_meta
