"""Per-call adapter routing (lorart.routing): threads sharing one model, adapter_names checked
against the batch (forward, generate, beams, num_return_sequences; against PEFT), per-row
global ids (lorart.route), no host reads on a warm decode step, PEFT-parity of the model API."""

from __future__ import annotations

import copy
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from conftest import assert_close
from test_patch import tiny_llama
from torch.utils._python_dispatch import TorchDispatchMode

import lorart

NAMES = ["a", "b", "c"]


def three_adapter_model():
    """A tiny Llama with three random adapters on different (overlapping) targets."""
    m = tiny_llama()
    lorart.add_adapter(m, "a", r=4, lora_alpha=8, init_lora_weights=False,
                       target_modules=["q_proj", "v_proj", "down_proj"])
    lorart.add_adapter(m, "b", r=6, lora_alpha=3, use_rslora=True, init_lora_weights=False,
                       target_modules=["k_proj", "o_proj", "up_proj", "q_proj"])
    lorart.add_adapter(m, "c", r=2, lora_alpha=5, init_lora_weights=False,
                       target_modules="all-linear")
    return m


GEN = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)


# ------------------------------------------------------------------ validation at the top
@pytest.mark.parametrize("count", [1, 2, 3, 5, 8])
def test_wrong_length_adapter_names_raise(count):
    """4 sequences: too few, divisors of 4 (1, 2), too many (5, 8) all raise."""
    m = three_adapter_model()
    ids = torch.randint(1, 101, (4, 5))
    names = (NAMES * 3)[:count]
    with torch.no_grad():
        with pytest.raises(ValueError, match=f"got {count} names for 4 sequences"):
            m(ids, adapter_names=names)
        with pytest.raises(ValueError, match=f"got {count} names for 4 sequences"):
            m(input_ids=ids, adapter_names=names)
        with pytest.raises(ValueError, match=f"got {count} names for 4 sequences"):
            m.generate(ids, adapter_names=names, **GEN)
        with pytest.raises(ValueError, match=f"got {count} names for 4 sequences"):
            m.generate(input_ids=ids, adapter_names=names, num_beams=2, **GEN)
    assert lorart.routing._CURRENT.get() is None  # nothing left behind by the errors
    with torch.no_grad():
        m(ids)  # and the model still runs


def test_layer_level_check_for_sub_module_calls():
    """Inside lorart.route, a call that bypasses the top-level hook is checked per layer."""
    m = three_adapter_model()
    with lorart.route(m, adapter_names=["a", "b"]), torch.no_grad():
        m.model(torch.randint(1, 101, (2, 3)))  # the decoder alone: routed
        with pytest.raises(ValueError, match="adapter_names has 2 entries but the layer sees 9"):
            m.model(torch.randint(1, 101, (3, 3)))
    with pytest.raises(ValueError, match="exactly one of"):
        with lorart.route(m):
            pass
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        with lorart.route(m, adapter_names=["zz"]):
            pass


def _solo_generate(m, ids, name, **kw):
    lorart.set_adapter(m, name)
    try:
        return m.generate(ids, **kw)
    finally:
        lorart.set_adapter(m, None)


def test_num_return_sequences_and_beams_equal_per_adapter_runs():
    m = three_adapter_model()
    ids = torch.randint(1, 101, (3, 5))
    names = ["c", "__base__", "a"]
    cases = [dict(num_beams=2), dict(num_beams=3, num_return_sequences=2),
             dict(do_sample=True, top_k=1, num_return_sequences=2)]
    with torch.no_grad():
        for case in cases:
            kw = {**GEN, **case}
            out = m.generate(ids, adapter_names=names, **kw)
            per = kw.get("num_return_sequences", 1)
            for i, name in enumerate(names):
                solo = _solo_generate(m, ids[i:i + 1], name, **kw)
                assert torch.equal(out[i * per:(i + 1) * per], solo), (case, name)


def test_beam_search_matches_peft(tmp_path):
    pytest.importorskip("peft")
    from test_peft_compat import LLAMA_ADAPTERS, peft_model

    base = tiny_llama()
    pm = peft_model(base, LLAMA_ADAPTERS)
    pm.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    for name in LLAMA_ADAPTERS:
        lorart.load_adapter(model, tmp_path / name, name)
    ids = torch.randint(1, 101, (3, 6))
    names = ["beta", "__base__", "gamma"]
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=3, pad_token_id=0,
              attention_mask=torch.ones_like(ids))
    with torch.no_grad():
        ours = model.generate(ids, adapter_names=names, **kw)
        theirs = pm.generate(input_ids=ids, adapter_names=names, **kw)
    assert torch.equal(ours, theirs)


# ------------------------------------------------------------------ per-row global ids
def test_route_with_per_row_ids_equals_names_and_mixes_within_a_sequence():
    m = three_adapter_model()
    ids = torch.randint(1, 101, (3, 4))
    names = ["b", "__base__", "c"]
    glob = [lorart.adapter_names(m).index(n) if n != "__base__" else -1 for n in names]
    with torch.no_grad():
        by_name = m(ids, adapter_names=names).logits
        rows = torch.tensor(glob).repeat_interleave(4)
        with lorart.route(m, adapter_ids=rows):
            by_row = m(ids).logits
        assert torch.equal(by_name, by_row)
        with lorart.route(m, adapter_ids=lorart.AdapterBatch(rows, 3)):
            assert torch.equal(m(ids).logits, by_name)
        with pytest.raises(ValueError, match="adapter_ids must lie in -1..2"):
            with lorart.route(m, adapter_ids=torch.tensor([3] * 12)):
                pass
        with lorart.route(m, adapter_ids=rows[:-1]):
            with pytest.raises(ValueError, match="adapter_ids has 11 entries but the layer"):
                m(ids)
    # One layer, ids per token: each row equals that row run alone with its adapter.
    layer = m.model.layers[0].self_attn.q_proj  # has a, b and c
    x = torch.randn(2, 5, 64)
    row_ids = torch.tensor([2, -1, 0, 1, 1, 0, -1, 2, 2, 0])
    with torch.no_grad():
        y = layer(x, adapter_ids=row_ids).reshape(10, -1)
        for i, g in enumerate(row_ids.tolist()):
            layer.set_adapter(None if g < 0 else lorart.adapter_names(m)[g])
            assert_close(y[i], layer(x.reshape(10, 64)[i:i + 1])[0], what=f"row {i}")


# ------------------------------------------------------------------ threads
def _hammer(jobs, solo, repeats=3):
    """Run every job from its own thread, ``repeats`` times, all threads released together."""
    barrier = threading.Barrier(len(jobs))

    def work(job):
        barrier.wait()
        return [job() for _ in range(repeats)]

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(work, jobs))
    for i, outs in enumerate(results):
        for out in outs:
            assert torch.equal(out, solo[i]), f"thread {i} got another call's output"


def test_threads_sharing_one_model_each_get_their_own_adapters():
    m = three_adapter_model()
    torch.manual_seed(1)
    prompts = [torch.randint(1, 101, (2, 5)) for _ in range(7)]
    names = [["a", "a"], ["b", "__base__"], ["c", "c"], ["__base__", "__base__"],
             ["a", "c"], ["b", "b"], ["__base__", "a"]]

    def gen(i):
        return lambda: m.generate(prompts[i], adapter_names=names[i], **GEN)

    def fwd(i):
        return lambda: m(prompts[i], adapter_names=names[i]).logits

    with torch.no_grad():
        for make in (gen, fwd):
            solo = [make(i)() for i in range(7)]
            # Distinct adapters really give distinct outputs, so a mix-up cannot go unseen.
            assert not torch.equal(solo[0], solo[2]) and not torch.equal(solo[3], solo[5])
            _hammer([make(i) for i in range(7)], solo)


# ------------------------------------------------------------------ host reads
_LORART_DIR = str(Path(lorart.__file__).parent)


def _from_lorart() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_LORART_DIR):
            return True
        frame = frame.f_back
    return False


class HostReads(TorchDispatchMode):
    """Counts reads of tensor values by the host: ``aten._local_scalar_dense`` and Python's
    ``tolist``/``item``/``bool``/``int``/``float``/``index`` on tensors, split into those
    made from lorart's code and all of them (transformers does a few of its own)."""

    PY = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")

    def __init__(self):
        super().__init__()
        self.lorart, self.total, self._inside = [], [], False

    def _record(self, what):
        self.total.append(what)
        if _from_lorart():
            self.lorart.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and not self._inside:
            self._record(str(func))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._saved = {n: getattr(torch.Tensor, n) for n in self.PY}
        for name, real in self._saved.items():
            def counted(t, *a, _name=name, _real=real, **k):
                self._record(_name)
                self._inside = True
                try:
                    return _real(t, *a, **k)
                finally:
                    self._inside = False
            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, real in self._saved.items():
            setattr(torch.Tensor, name, real)
        return super().__exit__(*exc)


def _decode_step(m, route_kw, ids, prefill_kw=None):
    """Prefill + two warm decode steps; returns the host reads of the last step."""
    from transformers import DynamicCache

    cache = DynamicCache()
    with torch.no_grad():
        with lorart.route(m, **(prefill_kw or route_kw)):
            out = m(ids, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
        with lorart.route(m, **route_kw):
            out = m(nxt, past_key_values=cache, use_cache=True)
        nxt = out.logits[:, -1:].argmax(-1)
    with HostReads() as reads, torch.no_grad():
        with lorart.route(m, **route_kw):  # the route is made inside the counted step
            m(nxt, past_key_values=cache, use_cache=True)
    return reads


@pytest.mark.parametrize("quantize", [None, "int4"])
def test_warm_decode_step_reads_nothing_back_from_the_device(quantize):
    m = tiny_llama(layers=3)
    if quantize:
        lorart.patch(m, "all-linear", quantize="int4", group_size=32)
    for name, r in zip(NAMES, (4, 8, 2)):
        lorart.add_adapter(m, name, r=r, init_lora_weights=False, target_modules="all-linear")
    ids = torch.randint(1, 101, (5, 6))
    names = ["a", "__base__", "c", "b", "a"]
    reads = _decode_step(m, dict(adapter_names=names), ids)
    assert reads.lorart == [], reads.lorart  # 21 adapted layers, mixed batch: zero reads
    glob = torch.tensor([0, -1, 2, 1, 0])
    reads = _decode_step(m, dict(adapter_ids=glob), ids,
                         dict(adapter_ids=glob.repeat_interleave(ids.shape[1])))
    assert len(reads.lorart) <= 1, reads.lorart  # the range check of the id tensor
    print(f"host reads in a warm decode step: lorart {len(reads.lorart)}, all {len(reads.total)}")


def test_host_read_counter_can_fail():
    """The counter sees a read made from lorart code (here: a layer given a bad id list)."""
    with HostReads() as reads:
        lorart.AdapterBatch(torch.tensor([0, 1]), 3)
    assert len(reads.lorart) == 1


# ------------------------------------------------------------------ PEFT parity (#18)
def test_base_frozen_after_add_adapter_and_load_adapter(tmp_path):
    m = tiny_llama()
    assert all(p.requires_grad for p in m.parameters())
    lorart.add_adapter(m, "a", r=4, target_modules=["q_proj", "v_proj"])
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    lorart.save_adapter(m, tmp_path / "a", "a")
    fresh = tiny_llama()
    lorart.load_adapter(fresh, tmp_path / "a", "a")
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    ids = torch.randint(1, 101, (2, 5))
    fresh(ids, labels=ids).loss.backward()
    assert all(p.grad is None for n, p in fresh.named_parameters() if "lora_" not in n)


def test_model_api_exported_at_top_level():
    m = three_adapter_model()
    assert lorart.adapter_names(m) == NAMES
    for fn in ("add_adapter", "delete_adapter", "set_adapter", "merge_adapter",
               "unmerge_adapter", "disable_adapters", "adapter_names", "route"):
        assert callable(getattr(lorart, fn)) and fn in lorart.__all__
    lorart.delete_adapter(m, "b")
    assert lorart.adapter_names(m) == ["a", "c"]


def test_unpatch_removes_hooks_through_their_handles():
    m = three_adapter_model()
    assert len(m._forward_pre_hooks) == 1 and len(m._forward_hooks) == 1
    lorart.unpatch(m)
    assert not m._forward_pre_hooks and not m._forward_hooks
    assert not m._forward_hooks_always_called and not m._forward_pre_hooks_with_kwargs
    assert "generate" not in m.__dict__
