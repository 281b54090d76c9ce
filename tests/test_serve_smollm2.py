"""The headline test on the real model: SmolLM2-135M-Instruct 4-bit (``lorart.from_gguf()``)
serving 32 chat/text requests over 8 adapters (ranks 8..16, all linear layers) + base,
staggered arrivals, through 4 resident slots: every greedy output equals
``model.generate(adapter_names=[that adapter])`` for that prompt alone."""

from __future__ import annotations

import pytest
import torch

import lorart
from lorart.serve import Engine, SamplingParams
from lorart.serve.testing import random_adapter, write_peft_dir

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Name three colors.", "Say hi.",
             "Count from one to five.", "What is 2 + 2?", "Describe the sea in one line.",
             "Who wrote Hamlet?", "Give me a fruit."]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    model, tokenizer = lorart.from_gguf()
    root = tmp_path_factory.mktemp("smol_adapters")
    paths = {}
    for i, rank in enumerate([8, 10, 12, 14, 16, 8, 12, 16]):
        tensors, config = random_adapter(model, rank, seed=200 + i, std=0.03)
        paths[f"s{i}"] = write_peft_dir(root / f"s{i}", tensors, config)
        lorart.load_adapter(model, paths[f"s{i}"], f"s{i}")
    return model, tokenizer, paths


def generate_alone(model, tokenizer, ids, adapter, n):
    out = model.generate(torch.tensor([ids]), adapter_names=[adapter or "__base__"],
                         max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return out[0, len(ids):].tolist()


def test_32_requests_8_adapters_equal_generate_alone(smollm2):
    model, tokenizer, paths = smollm2
    engine = Engine(model, tokenizer, max_loras=4, max_batch_tokens=96, max_num_seqs=16)
    for name, path in paths.items():
        engine.add_adapter(name, path)
    adapters = [None] + list(paths)
    requests, handles = [], []
    for i in range(32):
        adapter = adapters[i % len(adapters)]
        q = QUESTIONS[i % len(QUESTIONS)]
        n = 3 + i % 4
        if i % 2:
            h = engine.submit(messages=[{"role": "user", "content": q}], adapter=adapter,
                              sampling=SamplingParams(max_tokens=n))
        else:
            h = engine.submit(q, adapter=adapter, sampling=SamplingParams(max_tokens=n))
        requests.append((h.prompt_token_ids, adapter, n))
        handles.append(h)
        if i % 4 == 3:
            engine.step()
    engine.run_until_idle(timeout=600)
    for (ids, adapter, n), h in zip(requests, handles):
        got = h.result(0)
        want = generate_alone(model, tokenizer, ids, adapter, n)
        assert got.token_ids == want, (adapter, tokenizer.decode(ids))
        assert got.text == tokenizer.decode(want, skip_special_tokens=True)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": QUESTIONS[1]}],
                                         add_generation_prompt=True, tokenize=False)
    assert tokenizer.decode(requests[1][0]) == chat  # request 1 came as chat messages
    m = engine.metrics()
    assert m.adapter_refs == 0 and m.kv_blocks_used == 0 and m.adapter_evictions_total > 0


def test_stop_string_cuts_text(smollm2):
    model, tokenizer, _ = smollm2
    engine = Engine(model, tokenizer)
    msgs = [{"role": "user", "content": "Count from one to ten, separated by commas."}]
    free = engine.submit(messages=msgs, sampling=SamplingParams(max_tokens=24))
    engine.run_until_idle(timeout=300)
    text = free.result(0).text
    stop = text.split(",")[1] if "," in text else text[3:6]
    h = engine.submit(messages=msgs, sampling=SamplingParams(max_tokens=24, stop=(stop,)))
    deltas = []
    while not h.finished:
        engine.step()
    deltas = list(h)
    out = h.result(0)
    assert out.finish_reason == "stop"
    assert out.text == text[:text.index(stop)]
    assert "".join(d.text for d in deltas) == out.text
