"""Read and write LoRA adapters in PEFT's on-disk format.

A PEFT adapter directory holds ``adapter_config.json`` and
``adapter_model.safetensors`` with keys such as

    base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight    [r, in]
    base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight    [out, r]

``load_adapter`` is all-or-nothing: the config, every key and every shape are
checked against the model before anything changes, so a bad adapter raises and
leaves the model exactly as it was. Pickle files (``adapter_model.bin``) are refused:
only safetensors are read, nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .layers import BASE_ADAPTER, LoRALinear, is_linear_like
from .patch import ensure_patch_state, freeze_base, lora_layers, matches_target, patch
from .peft_format import (
    CONFIG_NAME,
    PEFT_PREFIX,
    WEIGHTS_NAME,
    AdapterConfig,
    check_pair,
    lora_pairs,
    read_dir,
    targeted,
)


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> None:
    """Load a PEFT LoRA adapter directory into ``model`` as adapter ``name``.

    Honours ``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``,
    ``alpha_pattern``, ``target_modules``, ``exclude_modules``, ``fan_in_fan_out``
    (``bias`` must be ``"none"``). Layers the adapter targets are patched into
    ``LoRALinear`` if they are not yet. Unsupported features (DoRA,
    ``modules_to_save``, embedding LoRA, LoRA bias) and any mismatch (missing or
    extra key, wrong shape, a module the model lacks, a pickle file) raise
    ``ValueError``/``FileNotFoundError`` with the model left unchanged.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(name, str) or not name or "." in name or name == BASE_ADAPTER:
        raise ValueError(f"name must be a non-empty adapter name without '.', got {name!r}")
    where = str(path)
    raw, tensors = read_dir(path)
    cfg = AdapterConfig(raw, f"{where}/{CONFIG_NAME}")
    by_module = lora_pairs(tensors, where)
    if not by_module:
        raise ValueError(f"{where}: {WEIGHTS_NAME} holds no LoRA weights")

    modules = dict(model.named_modules())
    for mod_path in by_module:
        if mod_path not in modules:
            raise ValueError(f"{where}: adapter targets module {mod_path!r}, which "
                             f"{type(model).__name__} does not have")
        module = modules[mod_path]
        if not (is_linear_like(module) or isinstance(module, LoRALinear)):
            raise ValueError(f"{where}: adapter targets {mod_path!r}, a "
                             f"{type(module).__name__}; only Linear/Conv1D layers are supported")
    selected = targeted(model, cfg, where)
    if selected is not None:
        extra = sorted(set(by_module) - selected)
        missing = sorted(selected - set(by_module))
        if extra:
            raise ValueError(f"{where}: unexpected weights for {extra[:3]} "
                             f"({len(extra)} modules) not selected by target_modules="
                             f"{cfg.target_modules!r}")
        if missing:
            raise ValueError(f"{where}: missing weights for {missing[:3]} ({len(missing)} "
                             f"modules) selected by target_modules={cfg.target_modules!r}")

    plan = []  # (path, A, B, alpha) — everything checked before the model changes
    for mod_path, pair in sorted(by_module.items()):
        module = modules[mod_path]
        a, b = check_pair(mod_path, pair, cfg, *_linear_shape(module), where)
        if isinstance(module, LoRALinear) and name in module.lora_A:
            raise ValueError(f"adapter {name!r} already exists in {mod_path!r}; delete it or "
                             f"choose another name")
        plan.append((mod_path, a, b, cfg.alpha(mod_path)))

    # Apply. Nothing below can fail on valid input; roll back anyway if it does.
    to_patch = [p for p, *_ in plan if not isinstance(modules[p], LoRALinear)]
    quant = _model_quantization(model, [(p, modules[p]) for p in to_patch], where)
    had_state = "_lorart_patch_state" in model.__dict__
    added: list[LoRALinear] = []
    try:
        if to_patch:
            patch(model, _exact(to_patch))
        ensure_patch_state(model)
        for mod_path, a, b, alpha in plan:
            layer = model.get_submodule(mod_path)
            layer.add_adapter(name, a.shape[0], alpha, cfg.use_rslora, lora_a=a, lora_b=b)
            added.append(layer)
    except Exception:
        for layer in added:
            layer.delete_adapter(name)
        _undo_patch(model, to_patch, had_state)
        raise
    if quant is not None:  # last: the float weights are freed only once all else succeeded
        for p in to_patch:
            _quantize_layer(model.get_submodule(p), *quant)
    freeze_base(model)  # PEFT parity: only adapters train once one is loaded


def _model_quantization(model: nn.Module, new_layers: list, where: str) -> tuple | None:
    """``(scheme, group_size, scale_dtype)`` the model's quantized ``LoRALinear`` layers use
    most (``None`` for a dense model), checked to fit every newly targeted layer, so
    ``load_adapter`` quantizes the layers it patches the way the model was quantized."""
    from .quant import bits_of, check_group_size

    kinds = Counter((lyr.scheme, lyr.group_size, lyr.scales.dtype)
                    for _, lyr in lora_layers(model) if lyr.is_quantized)
    if not kinds or not new_layers:
        return None
    scheme, group_size, scale_dtype = kinds.most_common(1)[0][0]
    for path, module in new_layers:
        in_f = _linear_shape(module)[1]
        try:
            check_group_size(group_size, in_f, bits_of(scheme))
        except ValueError as exc:
            raise ValueError(f"{where}: the model is quantized ({scheme}, group {group_size}) "
                             f"but newly targeted {path!r} cannot be: {exc}") from exc
        if not bool(torch.isfinite(module.weight).all()):
            raise ValueError(f"{where}: newly targeted {path!r} has NaN/inf weights; cannot "
                             f"quantize it like the rest of the model")
    return scheme, group_size, scale_dtype


def _quantize_layer(layer: LoRALinear, scheme: str, group_size: int, scale_dtype) -> None:
    """Replace a dense ``LoRALinear`` base by its quantized form and free the float weight
    its original module held (as ``LoRALinear.from_linear(..., quantize_scheme)`` does)."""
    from .quant import quantize

    w = layer.weight.detach()
    layer._set_base(quantize(w, group_size, scheme, scale_dtype))
    original = layer.original
    if original is not None:
        original.weight = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)


def _exact(paths: list[str]) -> str:
    """A regex full-matching exactly these module paths."""
    return "|".join(re.escape(p) for p in paths)


def _undo_patch(model: nn.Module, paths: list[str], had_state: bool) -> None:
    from .patch import get_submodule_parent, unpatch

    if not had_state and "_lorart_patch_state" in model.__dict__:
        unpatch(model)
        return
    for p in paths:
        layer = model.get_submodule(p)
        if isinstance(layer, LoRALinear):
            parent, attr = get_submodule_parent(model, p)
            setattr(parent, attr, layer.to_original())


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, LoRALinear):
        return module.out_features, module.in_features
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    in_f, out_f = module.weight.shape  # Conv1D: [in, out]
    return out_f, in_f


# ------------------------------------------------------------------ saving
def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 base_model_name_or_path: str | None = None) -> None:
    """Write adapter ``name`` of ``model`` as a PEFT adapter directory.

    ``PeftModel.from_pretrained(base_model, path)`` loads it to the same outputs:
    the most common rank/alpha become ``r``/``lora_alpha``, others go into
    ``rank_pattern``/``alpha_pattern`` keyed by exact module path.
    ``base_model_name_or_path`` defaults to the model's own (``config._name_or_path``, or
    the GGUF file of ``lorart.from_gguf``) and ``task_type`` is PEFT's name for the
    model's head (``CAUSAL_LM`` for ``*ForCausalLM`` ...) when known, else ``None``.
    """
    from safetensors.torch import save_file

    layers = [(p, lyr) for p, lyr in lora_layers(model) if name in lyr.lora_A]
    if not layers:
        raise ValueError(f"model has no adapter named {name!r}")
    if any(getattr(lyr, "tp_world", 1) > 1 for _, lyr in layers):  # ShardedLoRALinear
        raise ValueError("model is tensor-parallel: each rank holds only slices of the adapter; "
                         "use lorart.distributed.save_adapter (gathers them, rank 0 writes)")
    rslora = {lyr.use_rslora[name] for _, lyr in layers}
    if len(rslora) != 1:
        raise ValueError(f"adapter {name!r} mixes rsLoRA and plain LoRA layers; PEFT's "
                         f"config has one use_rslora flag")
    ranks = {p: lyr.lora_A[name].shape[0] for p, lyr in layers}
    alphas = {p: lyr.lora_alpha[name] for p, lyr in layers}
    r = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    paths = [p for p, _ in layers]
    suffixes = sorted({p.rsplit(".", 1)[-1] for p in paths})
    target_modules: list[str] | str = suffixes
    selected = {p for p, m in model.named_modules()
                if (is_linear_like(m) or isinstance(m, LoRALinear)) and
                matches_target(p, suffixes)}
    if selected != set(paths):  # suffix names would select other layers: be exact
        target_modules = _exact(paths)
    if base_model_name_or_path is None:
        base_model_name_or_path = _name_or_path(model)
    config = {
        "peft_type": "LORA",
        "task_type": task_type(model),
        "base_model_name_or_path": base_model_name_or_path,
        "r": r,
        "lora_alpha": alpha,
        "use_rslora": rslora.pop(),
        "rank_pattern": {re.escape(p): v for p, v in ranks.items() if v != r},
        "alpha_pattern": {re.escape(p): v for p, v in alphas.items() if v != alpha},
        "target_modules": target_modules,
        "fan_in_fan_out": any(lyr.fan_in_fan_out for _, lyr in layers),
        "bias": "none",
        "lora_dropout": 0.0,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    tensors = {}
    for p, lyr in layers:
        tensors[f"{PEFT_PREFIX}{p}.lora_A.weight"] = lyr.lora_A[name].detach().cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{p}.lora_B.weight"] = lyr.lora_B[name].detach().cpu().contiguous()
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / WEIGHTS_NAME), metadata={"format": "pt"})
    (root / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


# PEFT TaskType by the transformers head class name's suffix.
_TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for ``model`` (by its class name), ``None`` when unknown."""
    cls = type(model).__name__
    for suffix, task in _TASK_TYPES:
        if cls.endswith(suffix):
            return task
    return None


def _name_or_path(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return str(name) if name else None
