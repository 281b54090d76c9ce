"""The C++ decode step (``lorart._C.DecodePlan``, csrc/cpu/decode_plan.cpp) against the
Python step of ``DecodeSession`` it replaces (itself tested against transformers in
test_decode_runner.py), on every ISA, and its argument checks."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close
from test_decode_runner import _tiny_llama

from lorart.backend import cpu
from lorart.runtime import LlamaDecoder


@pytest.fixture(params=cpu.available_isas())
def isa(request):
    before = cpu.isa()
    cpu.set_isa(request.param)
    yield request.param
    cpu.set_isa(before)


def _steps(model, adapter, ids, monkeypatch, plan: bool):
    monkeypatch.setenv("LORART_DECODE_PLAN", "1" if plan else "0")
    session = LlamaDecoder(model).session(40, adapter)
    assert (session.compiled is not None) == plan
    out = [session.forward(ids[:5], last_only=True)]
    out += [session.step(int(t)) for t in ids[5:]]
    return torch.cat(out), session


@pytest.mark.parametrize("quantize,bias", [(None, False), ("int4", True), ("nf4", False)])
@pytest.mark.parametrize("adapter", [None, "a", "b"])
def test_plan_step_equals_python_step(isa, quantize, bias, adapter, monkeypatch):
    model = _tiny_llama(quantize, bias, seed=1)
    ids = torch.randint(0, 101, (31,))  # 26 steps: attention over up to 31 positions
    want, ref = _steps(model, adapter, ids, monkeypatch, plan=False)
    got, session = _steps(model, adapter, ids, monkeypatch, plan=True)
    assert_close(got, want, what=f"logits, {isa}")
    assert_close(session.cache, ref.cache, what="KV cache")  # same cache writes


def test_plan_refuses_bad_shapes():
    from lorart import _C

    t = torch.zeros(64 * 8)
    buf = (t.data_ptr(), t.numel())
    with pytest.raises(ValueError, match="n_head must be a positive multiple of n_kv"):
        _C.DecodePlan(n_head=3, n_kv=2, head_dim=8, hidden=8, inter=8, max_len=4, vocab=5,
                      attn_scale=1.0, cos=buf, sin=buf, final_norm=buf, final_eps=1e-5)
    with pytest.raises(ValueError, match="cos"):
        _C.DecodePlan(n_head=2, n_kv=2, head_dim=8, hidden=8, inter=8, max_len=100, vocab=5,
                      attn_scale=1.0, cos=buf, sin=buf, final_norm=buf, final_eps=1e-5)
    plan = _C.DecodePlan(n_head=2, n_kv=1, head_dim=4, hidden=8, inter=8, max_len=4, vocab=5,
                         attn_scale=1.0, cos=buf, sin=buf, final_norm=buf, final_eps=1e-5)
    w = torch.zeros(16, 8)
    wrong = plan.add_linear(n=16, k=8, scheme=-1, weight=(w.data_ptr(), w.numel()),
                            scales=(0, 0), offsets=(0, 0), scale_dtype=0, group_size=0,
                            bias=(0, 0), a=(0, 0), b=(0, 0), total_rank=0, rank_offsets=[0],
                            lora_scales=[])
    with pytest.raises(ValueError, match=r"qkv must be \[16, 8\]|o must be"):
        plan.add_layer(attn_norm=buf, attn_eps=1e-5, mlp_norm=buf, mlp_eps=1e-5, qkv=wrong,
                       o=wrong, gate_up=wrong, down=wrong, k_cache=buf, v_cache=buf)
    with pytest.raises(ValueError, match="lm_head"):
        plan.step(x=buf, pos=0, logits=buf)


@pytest.mark.skipif(not __import__("lorart")._C.cpu_has_vnni(), reason="needs AVX512-VNNI")
@pytest.mark.parametrize("activations,tol", [("int16", 2e-5), ("int8", 6e-3)])
def test_integer_activation_steps_stay_close_to_float32(activations, tol, monkeypatch):
    """The opt-in integer-activation steps (decode_q8.cpp) against the float32 plan on a
    4-bit model with an adapter: int16 1.3e-5 relative, int8 3.6e-3 (with x's own float
    sum in the offset term instead of the rounded x's, as before 2026-12-03: 2.9e-5 and
    9.7e-3; decode_q8.h says why)."""
    model = _tiny_llama("int4", False, seed=2)
    ids = torch.randint(0, 101, (25,))
    want, _ = _steps(model, "a", ids, monkeypatch, plan=True)
    session = LlamaDecoder(model, activations=activations).session(40, "a")
    got = torch.cat([session.forward(ids[:5])] + [session.step(int(t)) for t in ids[5:]])
    err = (got - want).norm() / want.norm()
    assert 0 < err < tol, f"{activations}: relative error {err:.2e}"


def test_bad_activations_name():
    model = _tiny_llama(None, False)
    with pytest.raises(ValueError, match="activations must be one of"):
        LlamaDecoder(model, activations="fp8")


def test_sessions_on_many_threads_equal_solo_sessions():
    """Concurrent sessions (different adapters) build plans over the same decoder: each
    plan must own what it points into (a shared cache rebuilt by another thread once left
    a plan with a freed adapter buffer)."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    model = _tiny_llama("int4", False, seed=3)
    decoder = LlamaDecoder(model, activations="int16")
    ids = torch.randint(0, 101, (12,))
    adapters = [None, "a", "b", "a", "b", None]

    def run(adapter):
        s = decoder.session(16, adapter)
        return torch.cat([s.forward(ids[:4])] + [s.step(int(t)) for t in ids[4:]])

    solo = [run(a) for a in adapters]
    barrier = threading.Barrier(len(adapters))

    def work(i):
        barrier.wait()
        return [run(adapters[i]) for _ in range(4)]

    for _ in range(3):
        for a in ("a", "b"):  # new adapter versions: every thread rebuilds the bound groups
            for m in model.modules():
                if hasattr(m, "lora_B") and a in m.lora_B:
                    m.lora_B[a].data.add_(0)
        with ThreadPoolExecutor(len(adapters)) as pool:
            results = list(pool.map(work, range(len(adapters))))
        for i, outs in enumerate(results):
            for out in outs:
                assert torch.equal(out, solo[i]), f"thread {i} ({adapters[i]})"
