"""PEFT's LoRA adapter format: the config fields lorart honours, the safetensors keys,
and the checks every reader shares (``lorart.peft_io.load_adapter`` into a model, the
serving engine's host copies in ``lorart.serve.adapter_weights``).

    adapter_config.json          r, lora_alpha, use_rslora, rank/alpha_pattern, target_modules ...
    adapter_model.safetensors    base_model.model.<module>.lora_A.weight  [r, in]
                                 base_model.model.<module>.lora_B.weight  [out, r]

Only safetensors are read; a pickle file (``adapter_model.bin``) is refused, never loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from .patch import find_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_NAMES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
PEFT_PREFIX = "base_model.model."

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

    def scale(self, path: str) -> float:
        """``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA) of the layer at ``path``."""
        r = self.rank(path)
        return self.alpha(path) / (math.sqrt(r) if self.use_rslora else r)


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


def config_and_weights(path: str | os.PathLike) -> tuple[dict, Path]:
    """``(config dict, path of adapter_model.safetensors)`` of an adapter directory, the
    files checked present and the config parsed; a pickle file is refused."""
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
    return raw, weights_file


def read_dir(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config dict, {PEFT key: tensor})`` of an adapter directory; pickles refused."""
    from safetensors import SafetensorError, safe_open

    raw, weights_file = config_and_weights(path)
    try:
        with safe_open(str(weights_file), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{weights_file}: not a readable safetensors file ({exc})") from exc
    return raw, tensors


_KEY = re.compile(r"^(?P<path>.+)\.(?P<kind>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")


def lora_pairs(tensors: dict[str, torch.Tensor], where: str) -> dict[str, dict[str, torch.Tensor]]:
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
        if not key.startswith(PEFT_PREFIX):
            raise ValueError(f"{where}: unexpected key {key!r} (PEFT keys start with "
                             f"{PEFT_PREFIX!r})")
        m = _KEY.match(key[len(PEFT_PREFIX):])
        if m is None:
            raise ValueError(f"{where}: unexpected key {key!r} (expected "
                             f"'<module>.lora_A.weight' or '<module>.lora_B.weight')")
        entry = out.setdefault(m["path"], {})
        if m["kind"] in entry:
            raise ValueError(f"{where}: two {m['kind']} tensors for module {m['path']!r}")
        entry[m["kind"]] = t
    return out


def check_pair(mod_path: str, pair: dict[str, torch.Tensor], cfg: AdapterConfig,
               out_features: int, in_features: int, where: str
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [r, in], B [out, r])`` of one layer, checked: both present, shapes match the
    layer ``[out_features, in_features]`` at the config's rank, finite floats."""
    for kind in ("lora_A", "lora_B"):
        if kind not in pair:
            raise ValueError(f"{where}: missing key {PEFT_PREFIX}{mod_path}.{kind}.weight")
    r = cfg.rank(mod_path)
    a, b = pair["lora_A"], pair["lora_B"]
    for kind, t, shape in (("lora_A", a, (r, in_features)), ("lora_B", b, (out_features, r))):
        if tuple(t.shape) != shape:
            raise ValueError(f"{where}: {mod_path}.{kind}.weight has shape "
                             f"{list(t.shape)}, expected {list(shape)} (r={r}, layer "
                             f"[{out_features}, {in_features}])")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {mod_path}.{kind}.weight must be finite floats")
    return a, b


def targeted(model: nn.Module, cfg: AdapterConfig, where: str) -> set[str] | None:
    """Module paths of ``model`` the config's ``target_modules`` selects (``None`` when
    the config names none); a bad pattern is a ``ValueError`` naming it."""
    if cfg.target_modules is None:
        return None
    try:
        return set(find_targets(model, cfg.target_modules, cfg.exclude_modules))
    except (TypeError, re.error) as exc:
        raise ValueError(f"{where}: target_modules={cfg.target_modules!r}: {exc}") from exc
