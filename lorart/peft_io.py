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
import math
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .layers import BASE_ADAPTER, LoRALinear, is_linear_like
from .patch import ensure_patch_state, find_targets, freeze_base, lora_layers, matches_target, patch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_PREFIX = "base_model.model."

# Config fields lorart implements, and what a non-default value of others means.
_UNSUPPORTED = {
    "use_dora": (False, None, "DoRA (use_dora=True)"),
    "modules_to_save": (None, [], "modules_to_save (fully trained extra modules)"),
    "layers_to_transform": (None, [], "layers_to_transform"),
    "layer_replication": (None, [], "layer_replication"),
    "lora_bias": (False, None, "LoRA bias (lora_bias=True)"),
    "target_parameters": (None, [], "target_parameters (LoRA on raw parameters)"),
    "trainable_token_indices": (None, [], "trainable_token_indices"),
    "use_qalora": (False, None, "QA-LoRA (use_qalora=True)"),
    "alora_invocation_tokens": (None, [], "aLoRA (alora_invocation_tokens)"),
    "megatron_config": (None, {}, "megatron_config"),
    "use_bdlora": (None, False, "BD-LoRA (use_bdlora)"),
}


class AdapterConfig:
    """The fields of a PEFT ``LoraConfig`` that lorart honours, validated."""

    def __init__(self, raw: dict, where: str) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"{where}: {msg}")

        if not isinstance(raw, dict):
            raise bad("adapter_config.json must hold a JSON object")
        peft_type = raw.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise bad(f"peft_type {peft_type!r} is not supported; lorart loads LoRA adapters")
        for key, (*defaults, feature) in _UNSUPPORTED.items():
            if key in raw and raw[key] not in defaults and raw[key] is not False:
                raise bad(f"{feature} is not supported by lorart")
        bias = raw.get("bias", "none")
        if bias != "none":
            raise bad(f"lora bias={bias!r} is not supported by lorart (only bias='none')")
        self.r = raw.get("r", 8)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise bad(f"r must be a positive integer, got {self.r!r}")
        self.lora_alpha = raw.get("lora_alpha", 8)
        if not _is_number(self.lora_alpha):
            raise bad(f"lora_alpha must be a number, got {self.lora_alpha!r}")
        self.use_rslora = raw.get("use_rslora", False)
        if not isinstance(self.use_rslora, bool):
            raise bad(f"use_rslora must be true or false, got {self.use_rslora!r}")
        self.fan_in_fan_out = raw.get("fan_in_fan_out", False)
        if not isinstance(self.fan_in_fan_out, bool):
            raise bad(f"fan_in_fan_out must be true or false, got {self.fan_in_fan_out!r}")
        self.rank_pattern = raw.get("rank_pattern") or {}
        self.alpha_pattern = raw.get("alpha_pattern") or {}
        for name, pat, ok in (("rank_pattern", self.rank_pattern, _is_rank),
                              ("alpha_pattern", self.alpha_pattern, _is_number)):
            if not isinstance(pat, dict) or not all(
                    isinstance(k, str) and ok(v) for k, v in pat.items()):
                raise bad(f"{name} must map module names to "
                          f"{'positive integers' if name == 'rank_pattern' else 'numbers'}, "
                          f"got {pat!r}")
        self.target_modules = raw.get("target_modules")
        tm = self.target_modules
        if tm is not None and not isinstance(tm, str) and not (
                isinstance(tm, list) and all(isinstance(t, str) for t in tm)):
            raise bad(f"target_modules must be a list of names or a regex string, got {tm!r}")
        self.exclude_modules = raw.get("exclude_modules")
        self.raw = raw

    def rank(self, path: str) -> int:
        key = _pattern_key(self.rank_pattern, path)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha(self, path: str) -> float:
        key = _pattern_key(self.alpha_pattern, path)
        return float(self.alpha_pattern[key] if key is not None else self.lora_alpha)


def _is_number(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _is_rank(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _pattern_key(pattern: dict, path: str) -> str | None:
    """PEFT's ``get_pattern_key``: the first key whose regex matches the end of ``path``."""
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", path):
            return key
    return None


# ------------------------------------------------------------------ loading
def _read_dir(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"adapter path {str(root)!r} is not a directory")
    cfg_file, weights_file = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not weights_file.exists():
        pickles = [n for n in PICKLE_NAMES if (root / n).exists()]
        if pickles:
            raise ValueError(f"{root}: refusing to load {pickles[0]} (a pickle file can run "
                             f"code when loaded); lorart reads only {WEIGHTS_NAME}")
        raise FileNotFoundError(f"{root}: no {WEIGHTS_NAME}")
    if not cfg_file.exists():
        raise FileNotFoundError(f"{root}: no {CONFIG_NAME}")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{cfg_file}: malformed JSON ({exc})") from exc
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights_file}: not a readable safetensors file ({exc})") from exc
    return raw, tensors


_KEY = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")


def _parse_keys(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
    """``{module path: {"lora_A": A, "lora_B": B}}`` from PEFT keys."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        for feature, what in (("lora_embedding_", "embedding LoRA"),
                              ("lora_magnitude_vector", "DoRA (lora_magnitude_vector)"),
                              ("modules_to_save", "modules_to_save"),
                              ("trainable_tokens", "trainable_token_indices")):
            if feature in key:
                raise ValueError(f"{where}: key {key!r}: {what} is not supported by lorart")
        if key.endswith(".bias") and (".lora_A." in key or ".lora_B." in key):
            raise ValueError(f"{where}: key {key!r}: LoRA bias is not supported by lorart")
        if not key.startswith(_PREFIX):
            raise ValueError(f"{where}: unexpected key {key!r} (PEFT keys start with "
                             f"{_PREFIX!r})")
        m = _KEY.match(key[len(_PREFIX):])
        if m is None:
            raise ValueError(f"{where}: unexpected key {key!r} (expected "
                             f"'<module>.lora_A.weight' or '<module>.lora_B.weight')")
        entry = out.setdefault(m["path"], {})
        if m["kind"] in entry:
            raise ValueError(f"{where}: two {m['kind']} tensors for module {m['path']!r}")
        entry[m["kind"]] = t
    return out


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
    raw, tensors = _read_dir(path)
    cfg = AdapterConfig(raw, f"{where}/{CONFIG_NAME}")
    by_module = _parse_keys(tensors, where)
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
    if cfg.target_modules is not None:
        try:
            targeted = set(find_targets(model, cfg.target_modules, cfg.exclude_modules))
        except (TypeError, re.error) as exc:
            raise ValueError(f"{where}: target_modules={cfg.target_modules!r}: {exc}") from exc
        extra = sorted(set(by_module) - targeted)
        missing = sorted(targeted - set(by_module))
        if extra:
            raise ValueError(f"{where}: unexpected weights for {extra[:3]} "
                             f"({len(extra)} modules) not selected by target_modules="
                             f"{cfg.target_modules!r}")
        if missing:
            raise ValueError(f"{where}: missing weights for {missing[:3]} ({len(missing)} "
                             f"modules) selected by target_modules={cfg.target_modules!r}")

    plan = []  # (path, A, B, alpha) — everything checked before the model changes
    for mod_path, pair in sorted(by_module.items()):
        for kind in ("lora_A", "lora_B"):
            if kind not in pair:
                raise ValueError(f"{where}: missing key {_PREFIX}{mod_path}.{kind}.weight")
        module = modules[mod_path]
        out_f, in_f = _linear_shape(module)
        r = cfg.rank(mod_path)
        a, b = pair["lora_A"], pair["lora_B"]
        for kind, t, shape in (("lora_A", a, (r, in_f)), ("lora_B", b, (out_f, r))):
            if tuple(t.shape) != shape:
                raise ValueError(f"{where}: {mod_path}.{kind}.weight has shape "
                                 f"{list(t.shape)}, expected {list(shape)} (r={r}, layer "
                                 f"[{out_f}, {in_f}])")
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise ValueError(f"{where}: {mod_path}.{kind}.weight must be finite floats")
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
        tensors[f"{_PREFIX}{p}.lora_A.weight"] = lyr.lora_A[name].detach().cpu().contiguous()
        tensors[f"{_PREFIX}{p}.lora_B.weight"] = lyr.lora_B[name].detach().cpu().contiguous()
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
