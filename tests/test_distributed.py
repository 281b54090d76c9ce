"""Tensor parallelism (lorart.distributed) on 2 processes with gloo on CPU.

One spawn of 2 workers runs every scenario (process start-up and imports dominate the
cost), each rank writes what it saw to ``rank{r}.pt``; the tests below check those records.
Each worker also builds the single-process model itself (same state dict, same adapter
files), so "equal to one process" compares two real runs on the same inputs.
"""

from __future__ import annotations

import copy
import datetime
import re
import shutil
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from test_patch import tiny_llama

import lorart
import lorart.distributed as tpd
from lorart.distributed import accounting, shard
from lorart.distributed.collectives import bytes_sent, count_bytes
from lorart.patch import lora_layers

WORLD = 2
# Three adapters of different ranks on different (overlapping) targets; "c" is loaded after
# sharding through the slice reader, "a" and "b" before (sharded by tensor_parallel); "d"
# (rank 3) by lorart.load_adapter on the sharded model (full file read, then sliced).
ADAPTERS = (("a", 4, ["q_proj", "v_proj", "down_proj"]),
            ("b", 5, ["k_proj", "o_proj", "up_proj", "q_proj"]),  # odd: padded to 6
            ("c", 2, "all-linear"))
MIXED = ["a", "b", "c", "__base__", "d"]
GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def _variant(**overrides):
    """``tiny_llama``'s config with some fields changed (wider MLP, fewer KV heads)."""
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(tiny_llama().config)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return LlamaForCausalLM(cfg).eval()


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def _snapshot(model) -> dict:
    """Everything an error must leave untouched: module types and every tensor."""
    return {"types": [(n, type(m).__name__) for n, m in model.named_modules()],
            "tensors": {k: v.clone() for k, v in model.state_dict().items()}}


def _same(before: dict, model) -> bool:
    after = _snapshot(model)
    return before["types"] == after["types"] and before["tensors"].keys() == \
        after["tensors"].keys() and all(torch.equal(before["tensors"][k], after["tensors"][k])
                                        for k in before["tensors"])


# ------------------------------------------------------------------ the worker
def _dense_pair(d):
    m = tiny_llama()
    m.load_state_dict(load_file(f"{d}/dense.safetensors"))
    lorart.patch(m)
    ref = copy.deepcopy(m)
    for name, *_ in ADAPTERS:
        lorart.load_adapter(ref, f"{d}/{name}", name)
    for name in ("a", "b"):
        lorart.load_adapter(m, f"{d}/{name}", name)
    tpd.tensor_parallel(m)
    tpd.load_adapter(m, f"{d}/c", "c")
    lorart.load_adapter(m, f"{d}/d", "d")
    lorart.load_adapter(ref, f"{d}/d", "d")
    return m, ref


def _scenario_dense(d, out):
    m, ref = _dense_pair(d)
    ids = torch.randint(1, 101, (5, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out["logits_mixed"] = (m(ids, adapter_names=MIXED).logits,
                               ref(ids, adapter_names=MIXED).logits)
        per_row = torch.tensor([0, 2, -1, 1, 1, 0, 3] * 5)
        with lorart.route(m, adapter_ids=per_row):
            tp_rows = m(ids.reshape(1, -1)).logits
        with lorart.route(ref, adapter_ids=per_row):
            out["logits_route"] = (tp_rows, ref(ids.reshape(1, -1)).logits)
        lorart.set_adapter(m, "b")
        lorart.set_adapter(ref, "b")
        out["logits_set_b"] = (m(ids).logits, ref(ids).logits)
        lorart.set_adapter(m, None)
        lorart.set_adapter(ref, None)
    out["generate"] = (m.generate(ids, adapter_names=MIXED, **GEN),
                       ref.generate(ids, adapter_names=MIXED, **GEN))
    out["adapter_names"] = (lorart.adapter_names(m), lorart.adapter_names(ref))
    out["tp_group_marked"] = all(hasattr(mod, "tp_group") for mod in m.modules()
                                 if isinstance(mod, tpd.ShardedLoRALinear))

    # the bytes the collectives sent vs the accounting's prediction (adapter c: r=2 on all)
    lorart.set_adapter(m, "c")
    tokens = ids.numel()
    with torch.no_grad(), count_bytes() as log:
        m(ids)
    lorart.set_adapter(m, None)
    cfg = m.config
    shapes = accounting.llama_shapes(cfg.hidden_size, cfg.intermediate_size,
                                     cfg.num_attention_heads, cfg.num_key_value_heads)
    want = accounting.comm_per_token(shapes, 2, WORLD, "fully_sharded", dtype_bytes=4)
    out["comm"] = (sum(s for *_, s in log),
                   want.total_bytes * tokens * cfg.num_hidden_layers)
    # a mixed batch: each row sends as many values as its layer's widest adapter
    with torch.no_grad(), count_bytes() as log:
        m(ids, adapter_names=MIXED)
    predicted = 0.0
    for layer in m.modules():
        if isinstance(layer, tpd.ShardedLoRALinear):
            r = max(shard.padded_rank(layer.kind, layer.lora_rank[n], WORLD)
                    for n in layer.adapter_names)
            for op, nbytes, _ in accounting.collective_sizes(layer.kind, layer.out_features, r,
                                                             WORLD, "fully_sharded", 4):
                predicted += bytes_sent(op, nbytes, WORLD) * tokens
    out["comm_mixed"] = (sum(s for *_, s in log), predicted)

    # one training step: A/B gradients of this rank's slices vs the full gradients' slices
    ids = torch.randint(1, 101, (3, 6), generator=torch.Generator().manual_seed(2))
    for model in (m, ref):
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids, adapter_names=["a", "c", "b"]).loss
        loss.backward()
    modules = dict(ref.named_modules())
    worst, count = 0.0, 0
    for path, layer in m.named_modules():
        if not isinstance(layer, tpd.ShardedLoRALinear):
            continue
        full = modules[path]
        for name in layer.adapter_names:
            a_idx, b_idx = layer.adapter_index(layer.lora_rank[name])
            # the reference's gradients, padded like the sharded adapter (zeros), then sliced
            want_a, want_b = shard.pad_adapter(
                full.lora_A[name].grad, full.lora_B[name].grad,
                shard.padded_rank(layer.kind, layer.lora_rank[name], WORLD))
            for got, want_full, idx in ((layer.lora_A[name], want_a, a_idx),
                                        (layer.lora_B[name], want_b, b_idx)):
                worst = max(worst, _rel(got.grad, want_full[idx]))
                count += 1
    out["grads"] = (worst, count)


def _scenario_add_adapter(d, out):
    """lorart.add_adapter on a sharded model draws on group rank 0 and every rank slices that
    draw: rank 1's own generator is seeded differently, yet the result equals one process
    seeded like rank 0."""
    m, ref = _dense_pair(d)
    kw = dict(r=3, init_lora_weights=False, target_modules=["q_proj", "down_proj"])
    torch.manual_seed(7 + dist.get_rank())
    lorart.add_adapter(m, "fresh", **kw)
    torch.manual_seed(7)
    lorart.add_adapter(ref, "fresh", **kw)
    ids = torch.randint(1, 101, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out["logits_add_adapter"] = (m(ids, adapter_names=["fresh", "a"]).logits,
                                     ref(ids, adapter_names=["fresh", "a"]).logits)
    # save_adapter gathers the slices: the same PEFT directory as from one process
    for name in ("fresh", "b"):  # b: rank 5, stored padded to 6 on column layers
        tpd.save_adapter(m, f"{d}/saved_tp_{name}", name)
        if dist.get_rank() == 0:
            lorart.save_adapter(ref, f"{d}/saved_1p_{name}", name)
            got, want = (load_file(f"{d}/saved_{w}_{name}/adapter_model.safetensors")
                         for w in ("tp", "1p"))
            configs = [(Path(d) / f"saved_{w}_{name}" / "adapter_config.json").read_text()
                       for w in ("tp", "1p")]
            out[f"saved_{name}"] = (got.keys() == want.keys() and all(
                torch.equal(got[k], want[k]) for k in got), configs[0] == configs[1])
    try:  # the one-process writer would write this rank's slices only: it refuses
        lorart.save_adapter(m, f"{d}/saved_slices", "b")
    except ValueError as exc:
        out["save_adapter_refused"] = str(exc)


def _scenario_quantized(d, out):
    for scheme, group in (("int4", 32), ("int8", 16)):
        m = _variant(intermediate_size=128)
        m.load_state_dict(load_file(f"{d}/wide.safetensors"))
        if scheme == "int4":
            lorart.patch(m, quantize="int4", group_size=32)
        else:  # the 8-bit layout: quantize every patched layer's base the same way
            lorart.patch(m)
            for _, layer in lora_layers(m):
                layer._set_base(lorart.quantize(layer.weight.detach(), group, "int8"))
        lorart.load_adapter(m, f"{d}/wide_q", "q")
        ref = copy.deepcopy(m)
        tpd.tensor_parallel(m)
        ids = torch.randint(1, 101, (2, 5), generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            out[f"quantized_{scheme}"] = (m(ids, adapter_names=["q", "__base__"]).logits,
                                          ref(ids, adapter_names=["q", "__base__"]).logits)
        out[f"quantized_{scheme}_generate"] = (
            m.generate(ids, adapter_names=["q", "__base__"], **GEN),
            ref.generate(ids, adapter_names=["q", "__base__"], **GEN))


def _expect_error(out, key, model, fn):
    before = _snapshot(model)
    try:
        fn()
        out[key] = ("no error", False)
    except (ValueError, FileNotFoundError) as exc:
        out[key] = (str(exc), _same(before, model))


def _scenario_errors(d, out):
    m = _variant(num_key_value_heads=1)
    lorart.patch(m)
    _expect_error(out, "err_kv_heads", m, lambda: tpd.tensor_parallel(m))
    m = tiny_llama()  # intermediate 96: down_proj's 48 columns a rank split a group of 32
    lorart.patch(m, quantize="int4", group_size=32)
    _expect_error(out, "err_group_split", m, lambda: tpd.tensor_parallel(m))
    m, _ = _dense_pair(d)
    _expect_error(out, "err_twice", m, lambda: tpd.tensor_parallel(m))
    # NaN only in rank 1's rows of one B: rank 0 reads clean values, yet both must refuse
    _expect_error(out, "err_bad_slice", m, lambda: tpd.load_adapter(m, f"{d}/c_nan", "c2"))
    _expect_error(out, "err_missing", m, lambda: tpd.load_adapter(m, f"{d}/nope", "c3"))
    _expect_error(out, "err_shape", m, lambda: tpd.load_adapter(m, f"{d}/wide_q", "c4"))


ENGINE_RANKS = {"e3": 3, "e4": 4, "e8": 8}  # 3: the slot mirror pads it to split evenly
ENGINE_KW = dict(max_loras=2, max_lora_rank=8, max_num_seqs=4, max_batch_tokens=24,
                 kv_cache_tokens=512)  # 2 slots for 3 adapters: evictions and rewrites


def _engine_requests():
    g = torch.Generator().manual_seed(5)
    names = [None, "e3", "e4", "e8", "e4", "e3", None, "e8"]
    return [(torch.randint(3, 96, (int(torch.randint(2, 12, (1,), generator=g)),),
                           generator=g).tolist(), name) for name in names]


def _serve(engine, d):
    from lorart.serve import SamplingParams

    for name in ENGINE_RANKS:
        engine.add_adapter(name, f"{d}/{name}")
    handles = [engine.submit(prompt_token_ids=p, adapter=a,
                             sampling=SamplingParams(max_tokens=5, ignore_eos=True))
               for p, a in _engine_requests()]
    engine.run_until_idle()
    return [h.result(timeout=0).token_ids for h in handles]


def _scenario_engine(d, out):
    from lorart.distributed.engine import TensorParallelEngine
    from lorart.serve import Engine
    from lorart.serve.testing import tiny_llama as serving_llama

    model = serving_llama(seed=1)
    if dist.get_rank() == 0:
        single = Engine(copy.deepcopy(model), None, **ENGINE_KW)
        want = _serve(single, d)
        single.shutdown()
    tpd.tensor_parallel(model)
    engine = TensorParallelEngine(model, None, **ENGINE_KW)
    if dist.get_rank() == 0:
        got = _serve(engine, d)
        out["engine"] = (got, want, engine.metrics().adapter_evictions_total)
        engine.shutdown()
    else:
        out["engine_follower_steps"] = engine.follow()


def _worker(rank, port, d):
    torch.set_num_threads(1)
    # a short collective timeout: a rank that fails mid-step must not hang the suite
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=90))
    out = {}
    try:
        for scenario in (_scenario_dense, _scenario_add_adapter, _scenario_quantized,
                         _scenario_errors, _scenario_engine):
            try:
                scenario(d, out)
            except Exception:  # recorded, so the other scenarios still report
                out[f"crash_{scenario.__name__}"] = traceback.format_exc()
                raise
    finally:
        torch.save(out, f"{d}/rank{rank}.pt")
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------ fixture and tests
def _write_inputs(d) -> None:
    torch.manual_seed(0)
    dense = tiny_llama()
    save_file(dense.state_dict(), f"{d}/dense.safetensors")
    for name, r, targets in ADAPTERS + (("d", 3, ["gate_proj", "o_proj"]),):
        m = copy.deepcopy(dense)
        lorart.add_adapter(m, name, r=r, lora_alpha=2 * r, init_lora_weights=False,
                           target_modules=targets)
        lorart.save_adapter(m, f"{d}/{name}", name)
    # adapter c with a NaN in rank 1's half of one B (rows out/2 .. out of q_proj)
    shutil.copytree(f"{d}/c", f"{d}/c_nan")
    tensors = load_file(f"{d}/c_nan/adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    tensors[key][-1, 0] = float("nan")
    save_file(tensors, f"{d}/c_nan/adapter_model.safetensors", metadata={"format": "pt"})
    wide = _variant(intermediate_size=128)
    save_file(wide.state_dict(), f"{d}/wide.safetensors")
    lorart.add_adapter(wide, "q", r=4, lora_alpha=8, init_lora_weights=False,
                       target_modules="all-linear")
    lorart.save_adapter(wide, f"{d}/wide_q", "q")
    from lorart.serve.testing import random_adapter, write_peft_dir
    from lorart.serve.testing import tiny_llama as serving_llama

    served = serving_llama(seed=1)
    for i, (name, r) in enumerate(ENGINE_RANKS.items()):
        targets = None if i != 1 else ("q_proj", "v_proj", "down_proj")
        write_peft_dir(f"{d}/{name}", *random_adapter(served, r, seed=10 + i, targets=targets))


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    d = tmp_path_factory.mktemp("tp")
    _write_inputs(d)
    try:
        mp.spawn(_worker, args=(_free_port(), str(d)), nprocs=WORLD)
    except Exception:  # the records say which scenario failed; tests report it
        pass
    return [torch.load(d / f"rank{r}.pt", weights_only=True) if (d / f"rank{r}.pt").exists() else {}
            for r in range(WORLD)]


def _get(records, key):
    crashes = [v for rec in records for k, v in rec.items() if k.startswith("crash_")]
    for rank, rec in enumerate(records):
        if key not in rec:
            pytest.fail(f"rank {rank} recorded no {key!r}; crashes on any rank: {crashes}")
    return [rec[key] for rec in records]


@pytest.mark.parametrize("key", ["logits_mixed", "logits_route", "logits_set_b",
                                 "logits_add_adapter", "quantized_int4", "quantized_int8"])
def test_sharded_logits_equal_one_process(records, key):
    for got, want in _get(records, key):
        assert got.shape == want.shape
        assert _rel(got, want) < 1e-5


@pytest.mark.parametrize("key", ["generate", "quantized_int4_generate",
                                 "quantized_int8_generate"])
def test_greedy_generate_equal(records, key):
    for got, want in _get(records, key):
        assert torch.equal(got, want)


def test_adapter_api_and_marking(records):
    for (got, want), marked in zip(_get(records, "adapter_names"),
                                   _get(records, "tp_group_marked")):
        assert got == want == ["a", "b", "c", "d"]
        assert marked


def test_training_step_gradients_equal(records):
    for worst, count in _get(records, "grads"):
        assert count > 20  # every adapter of every sharded layer was compared
        assert worst < 1e-5


@pytest.mark.parametrize("key", ["comm", "comm_mixed"])
def test_comm_bytes_match_accounting(records, key):
    for sent, predicted in _get(records, key):
        assert sent == pytest.approx(predicted)


@pytest.mark.parametrize("key,match", [
    ("err_kv_heads", "num_key_value_heads=1 is not divisible"),
    ("err_group_split", "would split a quantization group"),
    ("err_shape", r"down_proj.lora_A.weight has shape \[4, 128\], expected \[4, 96\]"),
    ("err_twice", "already sharded"),
    ("err_bad_slice", "finite floats|failed to load on rank"),
    ("err_missing", "is not a directory"),
])
def test_bad_configurations_raise_before_changing_anything(records, key, match):
    for message, unchanged in _get(records, key):
        assert re.search(match, message), message
        assert unchanged


def test_engine_across_ranks_equals_one_process(records):
    rank0, rank1 = records
    if "engine" not in rank0:
        pytest.fail(f"no engine record; crashes: {[v for k, v in rank0.items() if 'crash' in k]}")
    got, want, evictions = rank0["engine"]
    assert got == want
    assert all(len(t) == 5 for t in got)
    assert evictions > 0  # slots were rewritten while serving: the mirror followed
    assert rank1["engine_follower_steps"] > 0


@pytest.mark.parametrize("name", ["fresh", "b"])
def test_save_adapter_gathers_the_same_directory_as_one_process(records, name):
    tensors_equal, configs_equal = records[0][f"saved_{name}"]
    assert tensors_equal and configs_equal


def test_one_process_save_adapter_refuses_a_sharded_model(records):
    for rank in records:
        assert "lorart.distributed.save_adapter" in rank.get("save_adapter_refused", "")
