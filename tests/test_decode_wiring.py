"""Where the lean batch-1 decoder is wired in (issue #15): ``lorart demo``'s single-prompt
answer and ``lorart.bench.generate`` at batch 1 take it on the real SmolLM2; the batched
multi-adapter calls keep transformers' loop."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def smollm2(smollm2_pirate):
    return smollm2_pirate


@pytest.mark.slow
def test_demo_single_prompt_takes_the_lean_decoder(smollm2):
    from lorart.commands.demo import generate_batch, generate_one

    model, tok = smollm2
    for adapter in ("pirate", "__base__"):
        answer, n, seconds, path = generate_one(model, tok, "What is the largest ocean?",
                                                adapter, 8)
        assert path == "lorart" and n == 8 and answer and seconds > 0
    generate_batch(model, tok, ["Hi.", "Hello."], ["pirate", "__base__"], 2)
    assert model.generate.last_path == "transformers"  # two sequences: transformers' loop


@pytest.mark.slow
def test_bench_generate_batch1_takes_the_lean_decoder(smollm2):
    from lorart.bench.generate import timed_generate

    model, tok = smollm2
    text = tok.apply_chat_template([{"role": "user", "content": "Name three colors."}],
                                   tokenize=False, add_generation_prompt=True)
    batch = tok([text], return_tensors="pt", padding=True)
    seconds, out = timed_generate(model, batch, ["pirate"], 4, 1, tok.pad_token_id)
    assert model.generate.last_path == "lorart"
    assert out.shape == (1, batch["input_ids"].shape[1] + 4) and seconds > 0
    assert torch.equal(out[:, : batch["input_ids"].shape[1]], batch["input_ids"])
