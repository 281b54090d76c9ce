"""Engine correctness on tiny Llama models: greedy outputs equal ``model.generate`` per
request, whatever shares the batch; preemption; weighted adapters; streaming; cancel."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch

import lorart
from lorart.patch import lora_layers
from lorart.serve import Engine, SamplingParams
from lorart.serve.testing import random_adapter, tiny_llama, write_peft_dir

RANKS = [2, 4, 6, 8, 10, 12, 14, 16]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny model with 8 adapters of different ranks (some on a subset of layers),
    loaded into the model (for the reference generate) and saved as PEFT dirs."""
    root = tmp_path_factory.mktemp("adapters")
    model = tiny_llama(seed=1)
    paths = {}
    for i, rank in enumerate(RANKS):
        targets = None if i % 3 else ("q_proj", "v_proj", "up_proj", "down_proj")
        tensors, config = random_adapter(model, rank, seed=100 + i, targets=targets)
        paths[f"ad{i}"] = write_peft_dir(root / f"ad{i}", tensors, config)
    for name, path in paths.items():
        lorart.load_adapter(model, path, name)
    return model, paths


def reference(model, prompt, adapter, max_tokens):
    out = model.generate(torch.tensor([prompt]), adapter_names=[adapter or "__base__"],
                         max_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def new_engine(model, paths, **kw):
    """An engine over ``model`` with the adapters registered from their directories
    (the model's own loaded copies are imported too; registering replaces them)."""
    kw.setdefault("max_lora_rank", 16)
    engine = Engine(model, None, **kw)
    for name, path in paths.items():
        engine.add_adapter(name, path)
    return engine


def make_requests(n, seed):
    g = torch.Generator().manual_seed(seed)
    names = [None] + [f"ad{i}" for i in range(len(RANKS))]
    out = []
    for i in range(n):
        length = int(torch.randint(1, 20, (1,), generator=g))
        prompt = torch.randint(3, 96, (length,), generator=g).tolist()
        out.append((prompt, names[i % len(names)], int(torch.randint(1, 14, (1,), generator=g))))
    return out


def check_against_generate(model, requests, handles):
    for (prompt, adapter, max_tokens), handle in zip(requests, handles):
        got = handle.result(timeout=0)
        want = reference(model, prompt, adapter, max_tokens)
        assert got.token_ids == want, f"adapter {adapter}, prompt {prompt}"
        assert got.usage.prompt_tokens == len(prompt)
        assert got.usage.completion_tokens == len(want)
        assert got.finish_reason == ("stop" if want[-1] == 2 and len(want) <= max_tokens
                                     and 2 in want else "length")


def assert_no_leaks(engine):
    m = engine.metrics()
    assert m.kv_blocks_used == 0 and m.running == 0 and m.queue_depth == 0
    assert m.adapter_refs == 0 and not engine.pool.refs and not engine._live


def test_36_requests_8_adapters_staggered_equal_generate(served):
    """36 requests over 8 adapters (ranks 2..16) + base, 4 resident slots (adapters
    swap in and out), arriving over 12 steps, prompt lengths 1..19, prefill chunks of at
    most 24 tokens per step: each output equals generate() for that request alone."""
    model, paths = served
    engine = new_engine(model, paths, max_loras=4, max_batch_tokens=24, max_num_seqs=12)
    requests = make_requests(36, seed=0)
    handles = []
    for i, (prompt, adapter, max_tokens) in enumerate(requests):
        handles.append(engine.submit(prompt_token_ids=prompt, adapter=adapter,
                                     sampling=SamplingParams(max_tokens=max_tokens)))
        if i % 3 == 2:
            engine.step()
    engine.run_until_idle()
    check_against_generate(model, requests, handles)
    m = engine.metrics()
    assert m.adapter_evictions_total > 0  # 8 adapters through 4 slots
    assert m.requests_total.get("length", 0) + m.requests_total.get("stop", 0) == 36
    assert_no_leaks(engine)


def test_preemption_under_tiny_kv_budget_gives_same_outputs(served):
    """A KV cache of 12 blocks x 4 tokens forces the youngest requests out and back
    (recomputed); outputs still equal generate() and nothing leaks."""
    model, paths = served
    engine = new_engine(model, paths, max_loras=3, kv_cache_tokens=48, block_size=4,
                        max_batch_tokens=32)
    requests = [(p, a, 12) for p, a, _ in make_requests(10, seed=3)]
    handles = [engine.submit(prompt_token_ids=p, adapter=a, sampling=SamplingParams(max_tokens=n))
               for p, a, n in requests]
    engine.run_until_idle()
    check_against_generate(model, requests, handles)
    assert engine.metrics().preemptions_total > 0
    assert_no_leaks(engine)


def test_weighted_adapter_equals_offline_merged_weights(served):
    """[(ad1, 0.5), (ad4, 1.5)] serves like the base with 0.5·Δ1 + 1.5·Δ4 merged into
    its dense weights offline (the engine never merges: it serves one ragged adapter of
    rank 4 + 10 = 14 built from the parts' A rows and weight-scaled B columns)."""
    model, paths = served
    engine = new_engine(model, paths, max_loras=2)
    parts = [("ad1", 0.5), ("ad4", 1.5)]
    merged = copy.deepcopy(model)
    with torch.no_grad():
        for _, layer in lora_layers(merged):
            for name, w in parts:
                if name in layer.lora_A:
                    layer.weight.add_(w * layer.delta_weight(name))
    prompts = [torch.randint(3, 96, (n,)).tolist() for n in (3, 9)]
    handles = [engine.submit(prompt_token_ids=p, adapter=parts,
                             sampling=SamplingParams(max_tokens=10)) for p in prompts]
    engine.run_until_idle()
    for p, h in zip(prompts, handles):
        want = reference(merged, p, None, 10)
        assert h.result(0).token_ids == want
        assert want != reference(model, p, "ad1", 10)  # the mix is not just one part
    assert engine.pool._combos == {} or all(  # a combo outlives its requests only resident
        w in engine.slots.holder for w in engine.pool._combos.values())
    assert_no_leaks(engine)


def test_streaming_sync_and_async_and_usage(served):
    model, paths = served
    engine = new_engine(model, paths).start()
    try:
        prompt = torch.randint(3, 96, (5,)).tolist()
        want = reference(model, prompt, "ad2", 8)
        h = engine.submit(prompt_token_ids=prompt, adapter="ad2",
                          sampling=SamplingParams(max_tokens=8))
        deltas = list(h)
        assert [t for d in deltas for t in d.token_ids] == want
        assert deltas[-1].finished and all(not d.finished for d in deltas[:-1])

        async def consume():
            h2 = engine.submit(prompt_token_ids=prompt, adapter="ad2",
                               sampling=SamplingParams(max_tokens=8))
            ticks = 0

            async def ticker():  # the event loop keeps running while we wait
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.001)

            t = asyncio.create_task(ticker())
            got = [d async for d in h2.stream()]
            t.cancel()
            return got, ticks

        got, ticks = asyncio.run(consume())
        assert [t for d in got for t in d.token_ids] == want and ticks > 0
        assert h.result(1).usage.completion_tokens == len(want)
    finally:
        engine.shutdown()
    assert_no_leaks(engine)


def test_cancel_frees_everything_and_others_finish(served):
    model, paths = served
    engine = new_engine(model, paths)
    keep = engine.submit(prompt_token_ids=[5, 6, 7], adapter="ad0",
                         sampling=SamplingParams(max_tokens=6))
    drop = engine.submit(prompt_token_ids=[9, 10], adapter="ad3",
                         sampling=SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    drop.cancel()
    engine.run_until_idle()
    assert drop.result(0).finish_reason == "cancelled"
    assert len(drop.result(0).token_ids) == 2
    assert keep.result(0).token_ids == reference(model, [5, 6, 7], "ad0", 6)
    assert engine.metrics().requests_total["cancelled"] == 1
    assert_no_leaks(engine)


def test_seeded_sampling_is_reproducible_whatever_shares_the_batch(served):
    model, paths = served
    sp = SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, top_k=20, seed=7,
                        ignore_eos=True)
    outs = []
    for others in (0, 5):
        engine = new_engine(model, paths)
        h = engine.submit(prompt_token_ids=[4, 5, 6], adapter="ad5", sampling=sp)
        for i in range(others):
            engine.submit(prompt_token_ids=[8 + i] * (i + 1), adapter=f"ad{i}",
                          sampling=SamplingParams(max_tokens=10, temperature=1.0))
        engine.run_until_idle()
        outs.append(h.result(0).token_ids)
    assert outs[0] == outs[1] and len(outs[0]) == 12
    greedy = reference(model, [4, 5, 6], "ad5", 12)
    assert outs[0] != greedy  # it really sampled


def test_stop_token_ids(served):
    model, paths = served
    engine = new_engine(model, paths)
    want = reference(model, [3, 4, 5], None, 10)
    stop = want[3]
    h = engine.submit(prompt_token_ids=[3, 4, 5],
                      sampling=SamplingParams(max_tokens=10, stop_token_ids=(stop,)))
    engine.run_until_idle()
    out = h.result(0)
    assert out.finish_reason == "stop" and out.token_ids == want[:want.index(stop) + 1]
