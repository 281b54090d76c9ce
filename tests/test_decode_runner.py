"""The lean batch-1 decoder (lorart.runtime) against transformers' forward of the same
model: logits of prefill, chunked prefill and decode steps, with and without adapters,
and ``model.generate`` routing (lean path only where it returns what transformers would)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import lorart
from lorart.runtime import DecodeLinear, LlamaDecoder, enable_fast_generate, greedy_generate


def _tiny_llama(quantize, bias: bool, seed: int = 0):
    """A random 3-layer Llama (GQA 4/2 heads, odd vocab) patched by lorart, 2 adapters."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, attention_bias=bias, rope_theta=1e4,
                         tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    lorart.patch(model, "all-linear", quantize=quantize, group_size=32)
    lorart.add_adapter(model, "a", r=4, lora_alpha=8, init_lora_weights=False)
    lorart.add_adapter(model, "b", r=2, lora_alpha=2, init_lora_weights=False,
                       target_modules=["q_proj", "down_proj"])
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _hf_logits(model, ids, adapter):
    names = ["__base__"] if adapter is None else [adapter]  # "a" is active by default
    with torch.no_grad():
        return model(ids, adapter_names=names).logits[0]


@pytest.mark.parametrize("quantize,bias", [(None, False), ("int4", True), ("nf4", False)])
@pytest.mark.parametrize("adapter", [None, "a", "b"])
def test_tiny_llama_logits_match_transformers(quantize, bias, adapter):
    model = _tiny_llama(quantize, bias)
    ids = torch.randint(0, 101, (1, 13))
    expected = _hf_logits(model, ids, adapter)
    decoder = LlamaDecoder(model)
    whole = decoder.session(20, adapter).forward(ids[0], last_only=False)
    assert_close(whole, expected, what="prefill")
    session = decoder.session(20, adapter)  # 6-token prefill, a 4-token chunk, 3 decode steps
    assert session.compiled is not None  # the one-token step runs as one C++ call
    parts = [session.forward(ids[0, :6], last_only=False),
             session.forward(ids[0, 6:10], last_only=False)]
    parts += [session.forward(ids[0, 10:11])]  # the general path, one token
    parts += [session.step(int(ids[0, i])) for i in (11, 12)]  # the one-token hot path
    assert_close(torch.cat(parts), expected, what="chunked")
    with pytest.raises(ValueError, match="max_len"):
        session.forward(ids[0, :8])


def test_decode_linear_groups_equal_separate_layers():
    model = _tiny_llama("int4", True)
    attn = model.model.layers[1].self_attn
    group = DecodeLinear([attn.q_proj, attn.k_proj, attn.v_proj])
    x = torch.randn(5, 64)
    for adapter in (None, "a", "b"):
        y = group.bind(adapter)(x)
        with torch.no_grad():
            ref = torch.cat([m(x, adapter_ids=[-1 if adapter is None else
                                               m.registry.index(adapter)] * 5)
                             if adapter is None or adapter in m.lora_A else
                             m(x, adapter_ids=[-1] * 5)
                             for m in (attn.q_proj, attn.k_proj, attn.v_proj)], -1)
        assert_close(y, ref, what=f"adapter {adapter}")
    residual = torch.randn(1, group.out_features)
    y1 = group.bind("a")(x[:1], residual=residual)
    assert_close(y1, group.bind("a")(x[:1]) + residual, what="residual as bias")
    # Adapter weights written in place (training) are picked up on the next bind.
    with torch.no_grad():
        attn.q_proj.lora_B["a"].mul_(3)
    assert_close(group.bind("a")(x), torch.cat([attn.q_proj(x, adapter_ids=[0] * 5),
                                                attn.k_proj(x, adapter_ids=[0] * 5),
                                                attn.v_proj(x, adapter_ids=[0] * 5)], -1))


def test_tiny_generate_routing(monkeypatch):
    model = _tiny_llama("int4", False)
    fast = enable_fast_generate(model)
    assert enable_fast_generate(model) is fast
    ids = torch.randint(3, 101, (1, 7))
    kw = dict(max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=None)

    def both(**extra):
        out = model.generate(ids, **kw, **extra)
        path = fast.last_path
        monkeypatch.setenv("LORART_FAST_DECODE", "0")
        ref = model.generate(ids, **kw, **extra)
        monkeypatch.delenv("LORART_FAST_DECODE")
        assert fast.last_path == "transformers"
        return path, out, ref

    for extra in ({}, {"adapter_names": ["a"]}, {"adapter_names": ["__base__"]},
                  {"adapter_names": ["b"]}):
        path, out, ref = both(**extra)
        assert path == "lorart", extra
        assert torch.equal(out, ref), extra
    # A generation_config argument, completed from the model's as transformers does.
    from transformers import GenerationConfig

    kw = {}
    for config in (GenerationConfig(max_new_tokens=5, do_sample=False, pad_token_id=0),
                   GenerationConfig(max_length=12, eos_token_id=int(ref[0, 9]), pad_token_id=0),
                   GenerationConfig(max_new_tokens=6, min_new_tokens=4, pad_token_id=0)):
        path, out, ref = both(generation_config=config)
        assert path == "lorart" and torch.equal(out, ref), config
    path, out, ref = both(generation_config=GenerationConfig(max_new_tokens=5,
                                                             repetition_penalty=1.3))
    assert path == "transformers" and torch.equal(out, ref)
    kw = dict(max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=None)
    # A streamer sees the same calls on both loops (prompt, each token, end).
    from transformers.generation.streamers import BaseStreamer

    class Recorder(BaseStreamer):
        def __init__(self):
            self.calls = []

        def put(self, value):
            self.calls.append(value.tolist())

        def end(self):
            self.calls.append("end")

    fast_rec, slow_rec = Recorder(), Recorder()
    out = model.generate(ids, **kw, streamer=fast_rec)
    assert fast.last_path == "lorart"
    monkeypatch.setenv("LORART_FAST_DECODE", "0")
    assert torch.equal(model.generate(ids, **kw, streamer=slow_rec), out)
    monkeypatch.delenv("LORART_FAST_DECODE")
    assert fast_rec.calls == slow_rec.calls and len(fast_rec.calls) == 11
    lorart.set_adapter(model, "b")
    path, out, ref = both()
    assert path == "lorart" and torch.equal(out, ref)
    with lorart.disable_adapters(model):
        path, out, ref = both()
        assert path == "lorart" and torch.equal(out, ref)
    # Not greedy batch-1: transformers' loop serves it.
    model.generate(ids.repeat(2, 1), **kw)
    assert fast.last_path == "transformers"
    model.generate(ids, **{**kw, "do_sample": True, "top_k": 5})
    assert fast.last_path == "transformers"
    model.generate(ids, **kw, repetition_penalty=1.3)
    assert fast.last_path == "transformers"
    with pytest.raises(ValueError, match="unknown adapter"):
        model.generate(ids, **kw, adapter_names=["nope"])
    lorart.unpatch(model)
    assert "generate" not in model.__dict__


def test_greedy_generate_stops_at_eos_after_min_new_tokens():
    model = _tiny_llama(None, False, seed=1)
    decoder = LlamaDecoder(model)
    ids = torch.randint(3, 101, (1, 5))
    free = greedy_generate(decoder, ids, 12)
    eos = int(free[0, 7])  # the third generated token becomes "EOS"
    first = (free[0, 5:] == eos).nonzero()[0].item()
    stopped = greedy_generate(decoder, ids, 12, eos_token_ids=[eos])
    assert stopped.shape[1] == 5 + first + 1 and int(stopped[0, -1]) == eos
    forced = greedy_generate(decoder, ids, 12, min_new_tokens=12, eos_token_ids=[eos])
    assert forced.shape[1] == 17 and eos not in forced[0, 5:].tolist()


def test_unsupported_model_is_refused():
    with pytest.raises(ValueError, match="only transformers Llama"):
        LlamaDecoder(torch.nn.Linear(3, 3))


# --------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smollm2(smollm2_pirate):
    return smollm2_pirate


@pytest.mark.slow
@pytest.mark.parametrize("adapter", [None, "pirate"])
def test_smollm2_decode_matches_transformers(smollm2, adapter):
    """Prefill + 4 decode steps of the real 4-bit model equal transformers' forward of
    the same model (which test_smollm2 checks against transformers' own GGUF load)."""
    model, tok = smollm2
    ids = tok.apply_chat_template([{"role": "user", "content": "Name three colours."}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    with torch.no_grad():
        expected = model(ids, adapter_names=[adapter or "__base__"]).logits[0]
    session = LlamaDecoder(model).session(ids.shape[1], adapter)
    assert session.compiled is not None
    t = ids.shape[1] - 4
    got = [session.forward(ids[0, :t], last_only=False)]
    got += [session.step(int(ids[0, i])) for i in range(t, ids.shape[1])]
    assert_close(torch.cat(got), expected, factor=4, what="logits")


@pytest.mark.slow
def test_smollm2_generate_takes_lean_path(smollm2, monkeypatch):
    """float32 activations: the lean path returns transformers' tokens exactly. The default
    (int16 activations) may differ only where float32's top two logits nearly tie."""
    model, tok = smollm2
    ids = tok.apply_chat_template([{"role": "user", "content": "Say hello."}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    for names in (None, ["pirate"], ["__base__"]):  # None: the active adapter (pirate)
        monkeypatch.setenv("LORART_DECODE_ACTIVATIONS", "float32")
        out = model.generate(ids, max_new_tokens=16, do_sample=False, adapter_names=names)
        assert model.generate.last_path == "lorart"
        monkeypatch.setenv("LORART_FAST_DECODE", "0")
        ref = model.generate(ids, max_new_tokens=16, do_sample=False, adapter_names=names)
        monkeypatch.delenv("LORART_FAST_DECODE")
        assert torch.equal(out, ref), tok.decode(out[0]) + " != " + tok.decode(ref[0])
        monkeypatch.delenv("LORART_DECODE_ACTIVATIONS")
        default = model.generate(ids, max_new_tokens=16, do_sample=False, adapter_names=names)
        assert model.generate.last_path == "lorart"
        if not torch.equal(default, ref):  # 'Say hello.' base: a tie within 2.5e-4 at step 1
            k = next(i for i in range(ref.shape[1]) if default[0, i] != ref[0, i])
            adapter = "pirate" if names != ["__base__"] else None
            logits = LlamaDecoder(model).session(k, adapter).forward(ref[0, :k])[-1]
            margin = float(logits[ref[0, k]] - logits[default[0, k]])
            assert 0 <= margin < 1e-3, f"int16 flipped a token with a float32 margin {margin}"


def test_tensor_parallel_or_unknown_layers_are_refused():
    """A sharded (tensor-parallel) projection or a layer class the decoder does not know
    keeps transformers' loop: the decoder would read a shard as the whole weight."""
    from lorart.runtime.llama import unsupported

    model = _tiny_llama("int4", False)
    assert unsupported(model) is None
    model.model.layers[1].mlp.down_proj.tp_group = object()  # how tp marks a shard
    assert "tensor-parallel" in unsupported(model)
    ids = torch.randint(0, 101, (1, 5))
    enable_fast_generate(model)
    model.generate(ids, max_new_tokens=2, do_sample=False)
    assert model.generate.last_path == "transformers"
    del model.model.layers[1].mlp.down_proj.tp_group

    class Sharded(type(model.model.layers[0].self_attn.q_proj)):
        pass

    model.model.layers[0].self_attn.q_proj.__class__ = Sharded
    assert "Sharded" in unsupported(model)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def test_fused_groups_hold_the_packed_codes_once(tmp_path):
    """q/k/v and gate/up fused by the decoder are not a second copy: the layers hold views
    of the group's base, a second decoder (or the serving runner) reuses it, and the model
    still computes, saves and loads exactly as before."""
    model = _tiny_llama("int4", True)
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    ids = torch.randint(0, 101, (1, 9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    expected = _hf_logits(model, ids, "a")
    with torch.inference_mode():  # as generate usually runs: the views stay normal tensors
        decoder = LlamaDecoder(model)
    assert not attn.q_proj.qweight.is_inference()
    qkv, gate_up = decoder.layers[1].qkv.base, decoder.layers[1].gate_up.base
    for whole, mods in ((qkv, (attn.q_proj, attn.k_proj, attn.v_proj)),
                        (gate_up, (mlp.gate_proj, mlp.up_proj))):
        for name in ("qweight", "scales", "offsets"):
            assert {_storage(getattr(m, name)) for m in mods} == {_storage(getattr(whole, name))}
    o = attn.o_proj.qweight
    assert o.untyped_storage().nbytes() == o.numel()  # a one-layer group is left alone
    again = LlamaDecoder(model)  # adjacent views: concatenated without a copy
    assert again.layers[1].qkv.base.qweight.data_ptr() == qkv.qweight.data_ptr()
    assert again.signature == decoder.signature  # no rebuild on the next generate
    assert_close(_hf_logits(model, ids, "a"), expected, what="module forward on the views")
    session = again.session(12, "a")
    got = [session.forward(ids[0, :7], last_only=False)]
    got += [session.step(int(ids[0, i])) for i in (7, 8)]
    assert_close(torch.cat(got), expected, what="decoder on the shared base")
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    a = attn.q_proj.lora_A["a"].requires_grad_(True)  # and the layers still train
    attn.q_proj(torch.randn(3, 64), adapter_ids=[0] * 3).sum().backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    a.requires_grad_(False)
    lorart.save_model(model, tmp_path / "m")  # views of one storage, written one by one
    back = lorart.load_model(tmp_path / "m")
    assert torch.equal(_hf_logits(back, ids, "a"), _hf_logits(model, ids, "a"))


def test_model_built_under_inference_mode_decodes():
    """Inference tensors have no version counter: a model loaded (and its adapters added)
    inside ``torch.inference_mode()`` still builds a decoder and generates, in and out of
    inference mode (the signature crashed on ``_version`` before)."""
    with torch.inference_mode():
        model = _tiny_llama("int4", False)
        assert model.model.layers[0].mlp.down_proj.qweight.is_inference()
        ids = torch.randint(0, 101, (1, 6))
        expected = _hf_logits(model, ids, "a")
        enable_fast_generate(model)
        out = model.generate(ids, max_new_tokens=3, do_sample=False, adapter_names=["a"])
        assert model.generate.last_path == "lorart"
    assert torch.equal(model.generate(ids, max_new_tokens=3, do_sample=False,
                                      adapter_names=["a"]), out)
    decoder = LlamaDecoder(model)
    session = decoder.session(8, "a")
    got = [session.forward(ids[0, :5], last_only=False), session.step(int(ids[0, 5]))]
    assert_close(torch.cat(got), expected, what="decoder of an inference-mode model")
    with torch.inference_mode():  # adapter weights written in place, where no version moves
        for m in model.modules():
            if isinstance(m, lorart.LoRALinear) and "a" in m.lora_B:
                m.lora_B["a"].mul_(-2)
        changed = _hf_logits(model, ids, "a")
        assert not torch.allclose(changed, expected)
        session = decoder.session(8, "a")  # the same decoder rebinds the adapter
        got = [session.forward(ids[0, :5], last_only=False), session.step(int(ids[0, 5]))]
    assert_close(torch.cat(got), changed, what="after an in-place write under inference_mode")


def test_share_packed_refuses_another_layout():
    model = _tiny_llama("int4", False)
    q = model.model.layers[0].self_attn.q_proj
    with pytest.raises(ValueError, match="scales must match"):
        q.share_packed(q.qweight, q.scales.float(), q.offsets)
    with pytest.raises(ValueError, match="offsets must match"):
        q.share_packed(q.qweight, q.scales, None)


def test_groups_of_mixed_layouts_decode_exactly():
    """GGUF K-quant files mix layouts inside q/k/v and gate/up (Q4_K_M: Q4_K beside Q6_K,
    Q5_K_M: int8 with and without offsets): the decoder fuses them through one exact
    common layout and still equals transformers."""
    model = _tiny_llama("int4", True)  # asym, group 32, float16 scales
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        k_w, v_w = attn.k_proj.base.dequantize(), attn.v_proj.base.dequantize()
        attn.k_proj._set_base(lorart.quantize(k_w, 16, "int8", torch.float32))  # no offsets
        attn.v_proj._set_base(lorart.quantize(v_w, 64, "asym"))
        if i == 1:
            mlp.up_proj._set_base(lorart.quantize(mlp.up_proj.base.dequantize(), 32, "sym"))
    ids = torch.randint(0, 101, (1, 9))
    for adapter in (None, "a"):
        expected = _hf_logits(model, ids, adapter)
        session = LlamaDecoder(model).session(12, adapter)
        got = [session.forward(ids[0, :7], last_only=False)]
        got += [session.step(int(ids[0, i])) for i in (7, 8)]
        assert_close(torch.cat(got), expected, what=f"mixed layouts, adapter {adapter}")
    # Relaid-out groups are a copy: the layers keep their own layouts and buffers.
    attn = model.model.layers[0].self_attn
    assert (attn.k_proj.scheme, attn.v_proj.scheme) == ("int8", "asym")
    assert attn.q_proj.qweight.untyped_storage().nbytes() == attn.q_proj.qweight.numel()


@pytest.mark.parametrize("src", [("asym", 64, torch.float16), ("sym", 32, torch.float16),
                                 ("int8", 32, torch.float16), ("int8", 16, torch.float32)])
def test_relayout_is_exact(src):
    scheme, group, scale_dtype = src
    w = torch.randn(24, 128) * 0.1
    qw = lorart.quantize(w, group, scheme, scale_dtype)
    wide = qw.relayout("int8", 16, torch.float32, offsets=True)
    assert wide.scheme == "int8" and wide.group_size == 16 and wide.offsets is not None
    assert torch.equal(wide.dequantize(), qw.dequantize())
    assert qw.relayout(qw.scheme, group, scale_dtype, qw.offsets is not None) is qw


@pytest.mark.parametrize("source,target,match", [
    (("nf4", 32, torch.float16), ("int8", 32, torch.float16, False), "cannot be written"),
    (("asym", 32, torch.float16), ("int8", 64, torch.float16, True), "cannot be split"),
    (("int8", 32, torch.float32), ("int8", 32, torch.float16, False), "float32 scales"),
    (("asym", 32, torch.float16), ("int8", 32, torch.float16, False), "offsets"),
    (("int8", 32, torch.float16), ("asym", 32, torch.float16, True), "cannot be written"),
])
def test_relayout_refuses_what_is_not_exact(source, target, match):
    qw = lorart.quantize(torch.randn(8, 128), source[1], source[0], source[2])
    with pytest.raises(ValueError, match=match):
        qw.relayout(*target)
