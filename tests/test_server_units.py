"""The server's pieces that need no model: adapter-path confinement, request models,
error shapes, and ``lorart serve``'s argument checks (which run before any model load)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("fastapi")

from lorart.serve import errors  # noqa: E402
from lorart.serve.http_errors import APIError, from_engine_error  # noqa: E402
from lorart.serve.http_models import ChatCompletionRequest, CompletionRequest  # noqa: E402
from lorart.serve.http_security import confine_adapter_path  # noqa: E402

# ---- adapter-directory confinement -----------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    """allowed/{good, link_out -> ../secret, link_in -> good}, secret/evil, allowed2/x."""
    allowed, secret, allowed2 = tmp_path / "allowed", tmp_path / "secret", tmp_path / "allowed2"
    (allowed / "good").mkdir(parents=True)
    (secret / "evil").mkdir(parents=True)
    (allowed2 / "x").mkdir(parents=True)
    os.symlink(secret, allowed / "link_out")
    os.symlink(allowed / "good", allowed / "link_in")
    return tmp_path


def _status(fn) -> int:
    with pytest.raises(APIError) as info:
        fn()
    return info.value.status


def test_confine_accepts_paths_inside(tree):
    dirs = [tree / "allowed", tree / "allowed2"]
    good = (tree / "allowed" / "good").resolve()
    assert confine_adapter_path(str(tree / "allowed" / "good"), dirs) == good
    assert confine_adapter_path("good", dirs) == good  # relative to an adapter dir
    assert confine_adapter_path("x", dirs) == (tree / "allowed2" / "x").resolve()
    # a symlink that stays inside is fine, and the resolved target is what gets loaded
    assert confine_adapter_path(str(tree / "allowed" / "link_in"), dirs) == good


@pytest.mark.parametrize("path", [
    "{t}/secret/evil",                      # plainly outside
    "{t}/allowed/../secret/evil",           # .. out of the directory
    "../secret/evil",                       # relative .. out of the directory
    "{t}/allowed/link_out/evil",            # symlink pointing outside
    "link_out",                             # relative symlink pointing outside
    "{t}/allowed/../secret/does_not_exist",  # outside AND missing: 403, no probing
    "/etc",
])
def test_confine_refuses_paths_outside(tree, path):
    dirs = [tree / "allowed"]
    assert _status(lambda: confine_adapter_path(path.format(t=tree), dirs)) == 403


def test_confine_missing_inside_is_404_and_no_dirs_is_403(tree):
    assert _status(lambda: confine_adapter_path("nope", [tree / "allowed"])) == 404
    assert _status(lambda: confine_adapter_path(str(tree / "allowed" / "good"), [])) == 403
    assert _status(lambda: confine_adapter_path("a\x00b", [tree / "allowed"])) == 400


# ---- request models and error shapes ---------------------------------------------------


def test_completion_prompt_forms():
    assert CompletionRequest(prompt="hi").prompts() == [{"prompt": "hi"}]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == [{"prompt": "a"}, {"prompt": "b"}]
    assert CompletionRequest(prompt=[1, 2]).prompts() == [{"prompt_token_ids": [1, 2]}]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [
        {"prompt_token_ids": [1]}, {"prompt_token_ids": [2, 3]}]
    assert _status(lambda: CompletionRequest(prompt=[]).prompts()) == 400


@pytest.mark.parametrize("field,value", [("logprobs", 3), ("presence_penalty", 0.5),
                                         ("logit_bias", {"1": 2.0}), ("echo", True)])
def test_unsupported_options_are_refused_by_name(field, value):
    req = CompletionRequest(prompt="hi", **{field: value})
    with pytest.raises(APIError) as info:
        req.reject_unsupported()
    assert info.value.status == 400 and info.value.param == field


def test_chat_content_parts_and_roles():
    req = ChatCompletionRequest(messages=[
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hel"},
                                     {"type": "text", "text": "lo"}]}])
    assert req.message_dicts() == [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": "hello"}]
    bad = ChatCompletionRequest(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}])
    assert _status(bad.message_dicts) == 400


def test_engine_errors_map_to_openai_shape():
    err = from_engine_error(errors.QueueFullError("queue full", retry_after=2.2))
    assert err.status == 429 and err.headers["Retry-After"] == "3"
    assert err.body() == {"error": {"message": "queue full", "type": "rate_limit_error",
                                    "param": None, "code": "queue_full"}}
    assert from_engine_error(errors.PromptTooLongError("too long")).status == 400
    assert from_engine_error(errors.UnknownAdapterError("x")).status == 404
    assert from_engine_error(errors.AdapterLoadError("bad")).status == 422
    assert from_engine_error(errors.EngineStoppedError()).status == 503


# ---- lorart serve argument checks (exit 2 before the model loads) ----------------------


@pytest.mark.parametrize("argv,needle", [
    (["--max-loras", "0"], "--max-loras must be at least 1"),
    (["--max-loras", "8", "--max-cpu-loras", "4"], "--max-cpu-loras (4) must be at least"),
    (["--model", "/nonexistent.gguf"], "--model /nonexistent.gguf: no such file"),
    (["--adapter", "x=/nonexistent"], "not a PEFT adapter directory"),
    (["--adapter", "a=/x", "--adapter", "a=/y"], "adapter names repeat"),
    (["--adapter-dir", "/nonexistent"], "--adapter-dir /nonexistent: not a directory"),
    (["--port", "70000"], "--port must be in 0..65535"),
    (["--api-key", " "], "--api-key must not be empty"),
])
def test_serve_rejects_bad_arguments_before_loading(argv, needle, capsys):
    from lorart.cli import main

    assert main(["serve", *argv]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert "loading" not in out  # the model was never loaded


def test_serve_exit_status_from_the_console_script():
    proc = subprocess.run([sys.executable, "-m", "lorart", "serve", "--max-queue", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--max-queue must be at least 1" in proc.stderr
