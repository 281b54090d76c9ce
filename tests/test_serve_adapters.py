"""Adapter pool and bad input: errors stay with their request, nothing leaks, tiers
(resident / host / disk) load and evict, replacement never mixes versions, fairness."""

from __future__ import annotations

import json

import pytest
import torch

from lorart.serve import Engine, SamplingParams, errors
from lorart.serve.testing import random_adapter, tiny_llama, write_peft_dir


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=2)


def engine_for(model, **kw):
    kw.setdefault("max_lora_rank", 16)
    return Engine(model, None, **kw)


def greedy(engine, prompt, adapter, n=6):
    h = engine.submit(prompt_token_ids=prompt, adapter=adapter,
                      sampling=SamplingParams(max_tokens=n, ignore_eos=True))
    engine.run_until_idle()
    return h.result(0)


def assert_clean(engine):
    m = engine.metrics()
    assert m.kv_blocks_used == 0 and m.running == 0 and m.queue_depth == 0
    assert m.adapter_refs == 0 and not engine._live


def test_bad_requests_rejected_synchronously_engine_keeps_serving(model, tmp_path):
    engine = engine_for(model, max_context=32)
    tensors, config = random_adapter(model, 4, seed=1)
    engine.add_adapter("good", write_peft_dir(tmp_path / "good", tensors, config))
    ok = engine.submit(prompt_token_ids=[3, 4], adapter="good",
                       sampling=SamplingParams(max_tokens=4, ignore_eos=True))
    cases = [
        (dict(prompt_token_ids=[3], adapter="nope"), errors.UnknownAdapterError, "adapter"),
        (dict(prompt_token_ids=list(range(3, 40))), errors.PromptTooLongError, "prompt"),
        (dict(prompt_token_ids=[3], sampling=SamplingParams(temperature=-1)),
         errors.InvalidRequestError, "temperature"),
        (dict(prompt_token_ids=[3], sampling=SamplingParams(max_tokens=0)),
         errors.InvalidRequestError, "max_tokens"),
        (dict(prompt_token_ids=[3], sampling=SamplingParams(top_k=-2)),
         errors.InvalidRequestError, "top_k"),
        (dict(prompt_token_ids=[1000]), errors.InvalidRequestError, "prompt_token_ids"),
        (dict(prompt_token_ids=[]), errors.InvalidRequestError, "prompt"),
        (dict(prompt="text but no tokenizer"), errors.InvalidRequestError, "prompt"),
        (dict(prompt_token_ids=[3], adapter=[("good", float("nan"))]),
         errors.InvalidRequestError, "adapter"),
        (dict(prompt_token_ids=[3], adapter=[("good", 1.0), ("good", 2.0)]),
         errors.InvalidRequestError, "adapter"),
    ]
    engine.submit(prompt_token_ids=[3], request_id="same", sampling=SamplingParams(max_tokens=1))
    cases.append((dict(prompt_token_ids=[3], request_id="same"), errors.InvalidRequestError,
                  "request_id"))
    for kwargs, exc, param in cases:
        with pytest.raises(exc) as info:
            engine.submit(**kwargs)
        assert info.value.param == param, kwargs
        assert isinstance(info.value, errors.EngineError) and info.value.status in (400, 404)
    engine.run_until_idle()
    assert ok.result(0).finish_reason == "length" and len(ok.result(0).token_ids) == 4
    assert engine.metrics().requests_total["rejected"] == len(cases)
    assert_clean(engine)


@pytest.mark.parametrize("breakage", ["no_weights", "bad_json", "wrong_shape", "pickle", "nan"])
def test_bad_adapter_files_rejected_by_add_adapter(model, tmp_path, breakage):
    engine = engine_for(model)
    tensors, config = random_adapter(model, 4, seed=1)
    path = write_peft_dir(tmp_path / "bad", tensors, config)
    weights = path / "adapter_model.safetensors"
    if breakage == "no_weights":
        weights.unlink()
    elif breakage == "bad_json":
        (path / "adapter_config.json").write_text("{not json")
    elif breakage == "wrong_shape":
        key = next(iter(tensors))
        tensors[key] = torch.zeros(5, 3)
        write_peft_dir(path, tensors, config)
    elif breakage == "pickle":
        weights.unlink()
        (path / "adapter_model.bin").write_bytes(b"\x80\x04")
    else:
        tensors[next(iter(tensors))][0, 0] = float("nan")
        write_peft_dir(path, tensors, config)
    with pytest.raises(errors.AdapterLoadError) as info:
        engine.add_adapter("bad", path)
    assert info.value.status == 422 and "bad" in str(info.value)
    assert [a.name for a in engine.list_adapters()] == []


def test_bad_adapter_found_in_dir_fails_only_its_request(model, tmp_path):
    """A directory-scanned adapter that fails to load (in the loader thread) ends only
    the requests that need it, with finish_reason "error" and AdapterLoadError."""
    engine = engine_for(model)
    tensors, config = random_adapter(model, 4, seed=1)
    write_peft_dir(tmp_path / "fine", tensors, config)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "adapter_config.json").write_text(json.dumps(config))
    (tmp_path / "broken" / "adapter_model.safetensors").write_bytes(b"garbage")
    engine.add_adapter_dir(tmp_path)
    assert {a.name for a in engine.list_adapters()} == {"fine", "broken"}
    sp = SamplingParams(max_tokens=3, ignore_eos=True)
    handles = [engine.submit(prompt_token_ids=[3, 4], adapter=a, sampling=sp)
               for a in ("broken", "fine", None, "broken")]
    engine.run_until_idle()
    res = [h.result(0) for h in handles]
    assert [r.finish_reason for r in res] == ["error", "length", "length", "error"]
    assert isinstance(handles[0].error, errors.AdapterLoadError)
    assert handles[0].error.status == 422 and handles[1].error is None
    assert engine.metrics().adapter_disk_loads_total == 1
    assert_clean(engine)


def test_dir_adapters_load_on_first_use_and_host_tier_evicts_lru(model, tmp_path):
    """Six adapters in a directory, host tier of 2: each loads from disk on first use,
    the least recently used unreferenced copies are dropped, and a dropped one reloads
    to the same outputs."""
    engine = engine_for(model, max_cpu_loras=2, max_loras=2)
    for i in range(6):
        t, c = random_adapter(model, 2 + i, seed=50 + i)
        write_peft_dir(tmp_path / f"d{i}", t, c)
    engine.add_adapter_dir(tmp_path)
    first = [greedy(engine, [5, 6, 7], f"d{i}").token_ids for i in range(6)]
    m = engine.metrics()
    assert m.adapter_disk_loads_total == 6 and m.adapter_host_evictions_total >= 3
    held = [e for e in engine.pool.entries.values() if e.weights is not None]
    assert len(held) <= 2 + engine.slots.num_slots  # resident ones cannot be dropped
    assert greedy(engine, [5, 6, 7], "d0").token_ids == first[0]
    assert engine.metrics().adapter_disk_loads_total == 7
    assert len(set(map(tuple, first))) > 1
    assert_clean(engine)


def test_pushed_adapter_replacement_never_mixes_versions(model):
    """A request bound to version 1 keeps it after add_adapter_tensors replaces the name
    mid-generation; the next request gets version 2."""
    engine = engine_for(model)
    t1, c1 = random_adapter(model, 4, seed=11)
    t2, c2 = random_adapter(model, 8, seed=12)
    ref = engine_for(model)
    ref.add_adapter_tensors("v1", t1, c1)
    ref.add_adapter_tensors("v2", t2, c2)
    want1 = greedy(ref, [7, 8], "v1", 10).token_ids
    want2 = greedy(ref, [7, 8], "v2", 10).token_ids
    assert want1 != want2

    engine.add_adapter_tensors("live", t1, c1)
    old = engine.submit(prompt_token_ids=[7, 8], adapter="live",
                        sampling=SamplingParams(max_tokens=10, ignore_eos=True))
    for _ in range(4):
        engine.step()
    engine.add_adapter_tensors("live", t2, c2)  # e.g. a training loop pushing a new step
    new = engine.submit(prompt_token_ids=[7, 8], adapter="live",
                        sampling=SamplingParams(max_tokens=10, ignore_eos=True))
    engine.run_until_idle()
    assert old.result(0).token_ids == want1
    assert new.result(0).token_ids == want2
    assert_clean(engine)


def test_remove_adapter_lets_inflight_finish(model):
    engine = engine_for(model)
    t, c = random_adapter(model, 4, seed=3)
    engine.add_adapter_tensors("gone", t, c)
    h = engine.submit(prompt_token_ids=[3], adapter="gone",
                      sampling=SamplingParams(max_tokens=5, ignore_eos=True))
    engine.step()
    engine.remove_adapter("gone")
    with pytest.raises(errors.UnknownAdapterError):
        engine.submit(prompt_token_ids=[3], adapter="gone")
    with pytest.raises(errors.UnknownAdapterError):
        engine.remove_adapter("gone")
    engine.run_until_idle()
    assert len(h.result(0).token_ids) == 5
    assert_clean(engine)


def test_rank_above_slot_capacity_is_rejected(model):
    engine = engine_for(model, max_lora_rank=4)
    t, c = random_adapter(model, 8, seed=3)
    with pytest.raises(errors.AdapterLoadError, match="max_lora_rank"):
        engine.add_adapter_tensors("big", t, c)
    t, c = random_adapter(model, 3, seed=4)
    engine.add_adapter_tensors("a", t, c)
    engine.add_adapter_tensors("b", t, c)
    with pytest.raises(errors.AdapterLoadError, match="max_lora_rank"):  # rank 3 + 3 > 4
        engine.submit(prompt_token_ids=[3], adapter=[("a", 1.0), ("b", 1.0)])
    assert_clean(engine)


def test_queue_full_and_stopped(model):
    engine = engine_for(model, max_queue=2)
    for _ in range(2):
        engine.submit(prompt_token_ids=[3])
    with pytest.raises(errors.QueueFullError) as info:
        engine.submit(prompt_token_ids=[3])
    assert info.value.status == 429 and info.value.retry_after > 0
    engine.shutdown()
    with pytest.raises(errors.EngineStoppedError):
        engine.submit(prompt_token_ids=[3])
    assert_clean(engine)


def test_popular_adapter_cannot_starve_a_rare_one(model):
    """max_loras=1: a stream of requests for 'hot' keeps arriving every step. The one
    request for 'rare' still starts within fairness_patience steps plus the longest
    running 'hot' request (max_tokens 4), not after the whole stream."""
    engine = engine_for(model, max_loras=1, fairness_patience=3, max_num_seqs=8)
    for name, seed in (("hot", 1), ("rare", 2)):
        t, c = random_adapter(model, 4, seed=seed)
        engine.add_adapter_tensors(name, t, c)
    sp = SamplingParams(max_tokens=4, ignore_eos=True)
    engine.submit(prompt_token_ids=[3], adapter="hot", sampling=sp)
    engine.step()
    rare = engine.submit(prompt_token_ids=[4], adapter="rare", sampling=sp)
    hot_after = []
    started = None
    for step in range(40):
        hot_after.append(engine.submit(prompt_token_ids=[3], adapter="hot", sampling=sp))
        engine.step()
        if started is None and rare._request.output_ids:
            started = step
    assert started is not None and started <= 3 + 4 + 2
    engine.run_until_idle()
    # once starving, later 'hot' requests waited behind it (FCFS from the starving one)
    assert rare.result(0).finish_reason == "length"
    assert_clean(engine)


def test_threaded_engine_many_clients(model):
    """The background loop with requests submitted from several threads."""
    import threading

    engine = engine_for(model).start()
    t, c = random_adapter(model, 4, seed=9)
    engine.add_adapter_tensors("x", t, c)
    results = {}

    def client(i):
        h = engine.submit(prompt_token_ids=[3 + i, 4], adapter="x" if i % 2 else None,
                          sampling=SamplingParams(max_tokens=5, ignore_eos=True))
        results[i] = h.result(timeout=60)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    engine.shutdown()
    assert all(len(r.token_ids) == 5 for r in results.values()) and len(results) == 8
    assert_clean(engine)
