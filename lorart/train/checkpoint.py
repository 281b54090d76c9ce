"""Checkpoints and shipped adapter files.

A checkpoint directory ``<output_dir>/checkpoint-<step>/`` holds

    <adapter>/adapter_config.json, adapter_model.safetensors    PEFT format, per adapter
    trainer_state.pt    exact fp32 adapter weights, optimizer + scheduler state, step,
                        every RNG state, the training config

``trainer_state.pt`` holds only tensors, numbers, strings and RNG tuples and is read
with ``torch.load(weights_only=True)``. The PEFT copies are for use; resuming reads
the exact weights from ``trainer_state.pt`` so a resumed run continues bit for bit.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from ..peft_io import CONFIG_NAME, WEIGHTS_NAME, save_adapter
from .engine import lora_parameters

STATE_NAME = "trainer_state.pt"
_SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def save_peft_adapter(model: nn.Module, path: str | os.PathLike, name: str,
                      dtype: str = "float32", base_model_name_or_path: str | None = None) -> Path:
    """``lorart.save_adapter`` plus an optional cast of the stored weights.

    ``dtype="bfloat16"`` halves the file; PEFT and lorart both load it into a float32
    model (the weights are cast on load).
    """
    if dtype not in _SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {list(_SAVE_DTYPES)}, got {dtype!r}")
    path = Path(path)
    save_adapter(model, path, name, base_model_name_or_path=base_model_name_or_path)
    if dtype != "float32":
        from safetensors.torch import load_file, save_file

        file = path / WEIGHTS_NAME
        tensors = {k: v.to(_SAVE_DTYPES[dtype]).contiguous() for k, v in load_file(file).items()}
        save_file(tensors, str(file), metadata={"format": "pt"})
    return path


def save_checkpoint(path: str | os.PathLike, model: nn.Module, names: list[str],
                    optimizer, scheduler, step: int, rng: dict, config: dict) -> Path:
    """Write a resumable checkpoint (see module doc); returns its directory."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name in names:
        save_peft_adapter(model, path / name, name)
    state = {
        "step": step,
        "adapters": {n: [p.detach().clone() for p in lora_parameters(model, n)] for n in names},
        "optimizer": optimizer.optimizer.state_dict(),
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "rng": rng,
        "config": json.dumps(config, sort_keys=True),
    }
    tmp = path / (STATE_NAME + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path / STATE_NAME)  # a crash mid-write never leaves a torn state
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """The state saved by :func:`save_checkpoint` (config decoded back to a dict)."""
    file = Path(path) / STATE_NAME
    if not file.is_file():
        raise FileNotFoundError(f"no {STATE_NAME} in checkpoint directory {path}")
    state = torch.load(file, map_location="cpu", weights_only=True)
    state["config"] = json.loads(state["config"])
    return state


def restore_adapters(model: nn.Module, state: dict) -> None:
    """Copy the checkpoint's exact adapter weights into ``model`` (shapes checked)."""
    for name, saved in state["adapters"].items():
        params = lora_parameters(model, name)
        if len(params) != len(saved):
            raise ValueError(f"checkpoint adapter {name!r} has {len(saved)} tensors, the model "
                             f"{len(params)}: different target modules?")
        with torch.no_grad():
            for p, s in zip(params, saved):
                if p.shape != s.shape:
                    raise ValueError(f"checkpoint adapter {name!r}: shape {list(s.shape)} != "
                                     f"model {list(p.shape)} (different rank?)")
                p.copy_(s)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The ``checkpoint-<step>`` directory with the largest step, or ``None``."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    best = None
    for d in root.iterdir():
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and (d / STATE_NAME).is_file() and (best is None or int(m[1]) > best[0]):
            best = (int(m[1]), d)
    return None if best is None else best[1]


__all__ = ["CONFIG_NAME", "latest_checkpoint", "load_checkpoint", "restore_adapters",
           "save_checkpoint", "save_peft_adapter"]
