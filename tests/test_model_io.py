"""Whole-model save/load (quantized bases + adapters), merge_and_unload against PEFT's,
load_adapter on a quantized model, and the adapter config fields save_adapter fills."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import assert_close

import lorart
from lorart import LoRALinear

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


def _tiny_llama(tied: bool = False):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(cfg).eval()


IDS = torch.arange(10).reshape(2, 5)


def _logits(model, **kw):
    with torch.no_grad():
        return model(IDS, **kw).logits


# ------------------------------------------------------------------ save / load
@pytest.mark.parametrize("quantize,group", [(None, 32), ("int4", 32), ("nf4", 64)])
def test_save_load_roundtrip_exact(tmp_path, quantize, group):
    model = lorart.patch(_tiny_llama(), quantize=quantize, group_size=group)
    lorart.add_adapter(model, "a", r=4, init_lora_weights=False)
    lorart.add_adapter(model, "b", r=2, lora_alpha=8, init_lora_weights=False,
                       target_modules=["q_proj", "v_proj"])
    lorart.save_model(model, tmp_path / "m")
    back = lorart.load_model(tmp_path / "m")
    mine, theirs = dict(model.state_dict()), dict(back.state_dict())
    assert mine.keys() == theirs.keys()
    for k in mine:
        assert mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]), k
    names = ["a", "b"]
    assert torch.equal(_logits(model, adapter_names=names), _logits(back, adapter_names=names))
    assert torch.equal(_logits(model), _logits(back))


@pytest.mark.parametrize("tied", [True, False])
def test_save_load_8bit_and_gguf_layers(tmp_path, tied):
    """The 8-bit layout (with offsets) and from_gguf's modules (quantized embedding, tied or
    own output matrix, rope) round-trip, on a GGUF file written like test_gguf_architectures."""
    from test_gguf_architectures import TYPES, _hf_model, write_gguf

    path = tmp_path / "q.gguf"
    write_gguf(path, _hf_model("qwen2", tied=tied), "qwen2", TYPES)
    model, _ = lorart.from_gguf(path, tokenizer=False)
    lorart.add_adapter(model, "x", r=3, init_lora_weights=False)
    lorart.save_model(model, tmp_path / "m")
    back = lorart.load_model(tmp_path / "m")
    assert type(back.model.embed_tokens) is type(model.model.embed_tokens)
    assert type(back.lm_head) is type(model.lm_head)
    if tied:
        assert back.lm_head.embedding is back.model.embed_tokens
    else:
        assert torch.equal(back.lm_head.qweight, model.lm_head.qweight)
    schemes = {m.scheme for m in back.modules() if isinstance(m, LoRALinear)}
    assert schemes == {"int8", "asym", "sym"}
    with torch.no_grad():
        ids = torch.randint(0, 300, (2, 7))
        assert torch.equal(model(ids, adapter_names=["x", "__base__"]).logits,
                           back(ids, adapter_names=["x", "__base__"]).logits)


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file

    (tmp_path / "m").mkdir()
    save_file({"x": torch.zeros(2)}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(ValueError, match="not a lorart model"):
        lorart.load_model(tmp_path / "m")
    with pytest.raises(FileNotFoundError):
        lorart.load_model(tmp_path / "nothing")


# ------------------------------------------------------------------ merge_and_unload
def _peft_pair(tmp_path):
    """A PEFT adapter with random A and B on the tiny model, and lorart loading it."""
    base = _tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                          init_lora_weights=False)
    peft_model = peft.get_peft_model(base, cfg)
    peft_model.save_pretrained(tmp_path / "ad")
    ours = _tiny_llama()  # same seed: same base weights
    lorart.load_adapter(ours, tmp_path / "ad", "ad")
    return peft_model, ours


def test_merge_and_unload_dense_matches_peft(tmp_path):
    peft_model, ours = _peft_pair(tmp_path)
    with_adapter = _logits(ours, adapter_names=["ad", "ad"])
    merged = lorart.merge_and_unload(ours, "ad")
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert isinstance(merged.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    reference = peft_model.merge_and_unload()
    for (name, p), (rname, q) in zip(merged.named_parameters(), reference.named_parameters()):
        assert name == rname
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
    assert_close(_logits(merged), with_adapter)
    assert_close(_logits(merged), _logits(reference))


def test_merge_and_unload_quantized_needs_a_choice(tmp_path):
    model = lorart.patch(_tiny_llama(), quantize="int4", group_size=32)
    lorart.add_adapter(model, "a", r=4, init_lora_weights=False)
    before = _logits(model)
    with pytest.raises(ValueError, match="requantize=True .* dequantize=True"):
        lorart.merge_and_unload(model, "a")
    assert torch.equal(_logits(model), before)  # nothing changed
    exact = _logits(model, adapter_names=["a", "a"])
    lorart.merge_and_unload(model, "a", dequantize=True)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert_close(_logits(model), exact)


def test_merge_and_unload_requantize_states_the_error():
    model = lorart.patch(_tiny_llama(), quantize="int4", group_size=32)
    lorart.add_adapter(model, "a", r=4, init_lora_weights=False)
    with pytest.warns(UserWarning, match="changed them by up to"):
        lorart.merge_and_unload(model, "a", requantize=True)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert layers and all(m.is_quantized and not m.adapter_names for m in layers)
    assert 0 < model.lorart_merge_error < 1


def test_merge_and_unload_bad_input():
    model = lorart.patch(_tiny_llama())
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        lorart.merge_and_unload(model, "zz")
    with pytest.raises(ValueError, match="no LoRALinear"):
        lorart.merge_and_unload(_tiny_llama(), None)


# ------------------------------------------------------------------ load_adapter
@pytest.mark.parametrize("quantize,scheme", [("int4", "asym"), ("nf4", "nf4")])
def test_load_adapter_quantizes_new_layers_like_the_model(tmp_path, quantize, scheme):
    peft_model, _ = _peft_pair(tmp_path)  # targets q_proj, v_proj, down_proj
    model = lorart.patch(_tiny_llama(), target_modules=["q_proj"], quantize=quantize,
                         group_size=32)
    lorart.load_adapter(model, tmp_path / "ad", "ad")
    for i in range(2):
        for name in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            layer = model.get_submodule(f"model.layers.{i}.{name}")
            assert layer.is_quantized and layer.scheme == scheme and layer.group_size == 32
            assert layer.original is None or layer.original.weight.numel() == 0  # freed
    assert isinstance(model.model.layers[0].mlp.up_proj, torch.nn.Linear)  # not targeted


def test_load_adapter_on_quantized_model_refuses_unfit_layer(tmp_path):
    """A newly targeted layer that cannot be quantized like the model: error, no change."""
    _peft_pair(tmp_path)  # targets q_proj, v_proj (K=64), down_proj (K=128)
    model = lorart.patch(_tiny_llama(), target_modules=["down_proj"], quantize="int4",
                         group_size=128)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="q_proj.*group_size"):
        lorart.load_adapter(model, tmp_path / "ad", "ad")
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


# ------------------------------------------------------------------ #18 save_adapter fields
def test_save_adapter_fills_task_type_and_base_model(tmp_path):
    model = _tiny_llama()
    model.config._name_or_path = "my-org/tiny-llama"
    lorart.add_adapter(model, "a", r=2, target_modules=["q_proj"])
    lorart.save_adapter(model, tmp_path / "a", "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "CAUSAL_LM"
    assert cfg["base_model_name_or_path"] == "my-org/tiny-llama"
    lorart.save_adapter(model, tmp_path / "b", "a", base_model_name_or_path="explicit")
    cfg = json.loads((tmp_path / "b" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "explicit"
    # PEFT loads it as a causal-LM adapter
    loaded = peft.PeftModel.from_pretrained(_tiny_llama(), tmp_path / "a")
    assert type(loaded).__name__ == "PeftModelForCausalLM"


def test_save_adapter_task_type_unknown_is_none(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(8, 8))
    lorart.add_adapter(net, "a", r=2, target_modules=["0"])
    lorart.save_adapter(net, tmp_path / "a", "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["task_type"] is None and cfg["base_model_name_or_path"] is None
