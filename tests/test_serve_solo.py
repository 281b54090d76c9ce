"""A lone request's steps through the batch-1 decoder (lorart/serve/solo.py): same tokens
as the batched step and as ``model.generate``, across joins, preemption and adapters; the
paged cache holds what the batched step would have written."""

from __future__ import annotations

import pytest
import torch

import lorart
from lorart.serve import Engine, SamplingParams
from lorart.serve.solo import SoloDecoder
from lorart.serve.testing import random_adapter, tiny_llama, write_peft_dir


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A 4-bit tiny Llama with two adapters (one on a subset of projections)."""
    root = tmp_path_factory.mktemp("solo")
    model = tiny_llama(seed=3, quantize="int4")
    paths = {}
    for name, rank, targets in (("a", 4, None), ("b", 6, ("q_proj", "v_proj", "down_proj"))):
        tensors, config = random_adapter(model, rank, seed=ord(name), targets=targets)
        paths[name] = write_peft_dir(root / name, tensors, config)
        lorart.load_adapter(model, paths[name], name)
    return model, paths


def _engine(model, paths, **kw):
    engine = Engine(model, None, max_lora_rank=8, **kw)
    for name, path in paths.items():
        engine.add_adapter(name, path)
    return engine


def _count_solo(monkeypatch) -> list[int]:
    """How many steps ran through the batch-1 decoder."""
    runs = [0]
    real = SoloDecoder.logits

    def counted(self, req, slots):
        out = real(self, req, slots)
        runs[0] += out is not None
        return out

    monkeypatch.setattr(SoloDecoder, "logits", counted)
    return runs


def _reference(model, prompt, adapter, n):
    out = model.generate(torch.tensor([prompt]), adapter_names=[adapter or "__base__"],
                         max_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("adapter", [None, "a", "b"])
def test_lone_request_equals_generate_and_batched_step(served, adapter, monkeypatch):
    model, paths = served
    runs = _count_solo(monkeypatch)
    prompt = list(range(5, 22))
    engine = _engine(model, paths)
    handle = engine.submit(prompt_token_ids=prompt, adapter=adapter,
                           sampling=SamplingParams(max_tokens=12, temperature=0.0))
    engine.run_until_idle()
    assert runs[0] == 11  # every decode step after the prefill's
    assert handle.result().token_ids == _reference(model, prompt, adapter, 12)
    monkeypatch.setenv("LORART_ENGINE_SOLO", "0")
    batched = _engine(model, paths)
    assert not batched.solo.enabled
    again = batched.submit(prompt_token_ids=prompt, adapter=adapter,
                           sampling=SamplingParams(max_tokens=12, temperature=0.0))
    batched.run_until_idle()
    assert again.result().token_ids == handle.result().token_ids


def test_joining_and_leaving_requests_keep_the_paged_cache_right(served, monkeypatch):
    """A runs alone (solo steps write its K/V to the paged cache), B joins (batched steps
    read A's cache), B finishes, A is alone again (a new session from the paged cache)."""
    model, paths = served
    runs = _count_solo(monkeypatch)
    engine = _engine(model, paths)
    greedy = dict(temperature=0.0)
    a = engine.submit(prompt_token_ids=list(range(3, 12)), adapter="a",
                      sampling=SamplingParams(max_tokens=30, **greedy))
    for _ in range(6):
        engine.step()
    alone = runs[0]
    b = engine.submit(prompt_token_ids=list(range(40, 47)), adapter="b",
                      sampling=SamplingParams(max_tokens=5, **greedy))
    engine.run_until_idle()
    assert alone == 5 and runs[0] > alone + 10  # solo before B, batched with B, solo after
    assert a.result().token_ids == _reference(model, list(range(3, 12)), "a", 30)
    assert b.result().token_ids == _reference(model, list(range(40, 47)), "b", 5)


def test_preempted_requests_restart_from_the_paged_cache(served, monkeypatch):
    """A KV cache of 12 blocks x 4 tokens preempts requests (recomputed later); the last
    ones finish alone through solo sessions started from the recomputed paged cache."""
    model, paths = served
    runs = _count_solo(monkeypatch)
    engine = _engine(model, paths, kv_cache_tokens=48, block_size=4, max_batch_tokens=32)
    g = torch.Generator().manual_seed(5)
    requests = [(torch.randint(3, 96, (int(torch.randint(4, 16, (1,), generator=g)),),
                               generator=g).tolist(), (None, "a", "b")[i % 3])
                for i in range(8)]
    handles = [engine.submit(prompt_token_ids=p, adapter=ad,
                             sampling=SamplingParams(max_tokens=12, temperature=0.0))
               for p, ad in requests]
    engine.run_until_idle()
    assert engine.metrics().preemptions_total > 0 and runs[0] > 0
    for h, (p, ad) in zip(handles, requests):
        assert h.result().token_ids == _reference(model, p, ad, 12)


def test_what_the_solo_step_does_not_take(served, monkeypatch):
    """A session whose static cache would be too large, and bf16 engines: batched steps."""
    import lorart.serve.solo as solo

    model, paths = served
    runs = _count_solo(monkeypatch)
    monkeypatch.setattr(solo, "MAX_SESSION_CACHE_BYTES", 1024)
    engine = _engine(model, paths)
    h = engine.submit(prompt_token_ids=[5, 6, 7], adapter="a",
                      sampling=SamplingParams(max_tokens=6, temperature=0.0))
    engine.run_until_idle()
    assert runs[0] == 0 and h.result().token_ids == _reference(model, [5, 6, 7], "a", 6)
    assert not Engine(tiny_llama(seed=3).to(torch.bfloat16), None).solo.enabled


def test_smollm2_lone_request_equals_the_batched_step(smollm2_pirate, monkeypatch):
    """The real SmolLM2 (4-bit GGUF, Q8_0 tied output layer) with its pirate adapter."""
    model, tok = smollm2_pirate
    runs = _count_solo(monkeypatch)
    messages = [{"role": "user", "content": "Name three colours."}]
    out = {}
    for solo_on in ("1", "0"):
        monkeypatch.setenv("LORART_ENGINE_SOLO", solo_on)
        engine = Engine(model, tok, max_loras=2)
        for adapter in (None, "pirate"):
            h = engine.submit(messages=messages, adapter=adapter,
                              sampling=SamplingParams(max_tokens=16, temperature=0.0))
            engine.run_until_idle()
            out[solo_on, adapter] = h.result().token_ids
    assert runs[0] == 30
    assert out["1", None] == out["0", None] and out["1", "pirate"] == out["0", "pirate"]
    assert out["1", None] != out["1", "pirate"]
