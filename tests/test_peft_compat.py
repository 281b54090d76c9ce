"""lorart against PEFT itself: same logits per adapter, without adapters, in mixed batches,
and adapter files that round-trip between the two libraries (tiny random models)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close

import lorart
from lorart import LoRALinear

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

# Several ranks/alphas, rsLoRA, rank/alpha patterns and different targets per adapter.
LLAMA_ADAPTERS = {
    "alpha": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    "beta": dict(r=8, lora_alpha=4, use_rslora=True,
                 target_modules=["k_proj", "o_proj", "gate_proj", "down_proj"],
                 rank_pattern={"down_proj": 3}, alpha_pattern={"o_proj": 11}),
    "gamma": dict(r=2, lora_alpha=5, target_modules="all-linear",
                  rank_pattern={r"layers\.1\.mlp\.up_proj": 7}),
}
GPT2_ADAPTERS = {
    "alpha": dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
    "beta": dict(r=6, lora_alpha=3, use_rslora=True, target_modules=["c_fc", "c_proj"],
                 fan_in_fan_out=True, alpha_pattern={"mlp.c_proj": 2}),
}
FACTOR = 4  # logits after a few layers: a few float32 roundings more than one op


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=101, n_embd=48, n_layer=2, n_head=4, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


def peft_model(base, adapters):
    """A PEFT model with random (``init_lora_weights=False``) adapters."""
    items = list(adapters.items())
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **items[0][1]),
                        adapter_name=items[0][0])
    for name, kw in items[1:]:
        pm.add_adapter(name, LoraConfig(init_lora_weights=False, **kw))
    return pm.eval()


@pytest.fixture(params=["llama", "gpt2"])
def setup(request, tmp_path):
    if request.param == "llama":
        base, adapters = tiny_llama(), LLAMA_ADAPTERS
    else:
        base, adapters = tiny_gpt2(), GPT2_ADAPTERS
    pm = peft_model(base, adapters)
    pm.save_pretrained(tmp_path)  # adapters not named "default" go to tmp_path/<name>
    dirs = {name: tmp_path / name for name in adapters}
    assert all((d / "adapter_config.json").exists() for d in dirs.values())
    return base, pm, dirs


def test_logits_match_peft(setup):
    base, pm, dirs = setup
    model = copy.deepcopy(base)
    for name, d in dirs.items():
        lorart.load_adapter(model, d, name)
    ids = torch.randint(0, 101, (3, 9))
    with torch.no_grad():
        for name in dirs:
            pm.set_adapter(name)
            lorart.set_adapter(model, name)
            assert_close(model(ids).logits, pm(ids).logits, factor=FACTOR, what=name)
        with pm.disable_adapter(), lorart.disable_adapters(model):
            assert_close(model(ids).logits, pm(ids).logits, factor=FACTOR, what="no adapter")
            assert_close(model(ids).logits, base(ids).logits, factor=FACTOR, what="vs base")
        names = list(dirs)[:2] + ["__base__"]
        assert_close(model(ids, adapter_names=names).logits,
                     pm(ids, adapter_names=names).logits, factor=FACTOR, what="mixed")


def test_mixed_generate_matches_peft(setup):
    base, pm, dirs = setup
    model = copy.deepcopy(base)
    for name, d in dirs.items():
        lorart.load_adapter(model, d, name)
    ids = torch.randint(1, 101, (3, 6))
    names = ["__base__"] + list(dirs)[:2]
    kw = dict(max_new_tokens=5, do_sample=False, attention_mask=torch.ones_like(ids),
              pad_token_id=0)
    with torch.no_grad():
        ours = model.generate(ids, adapter_names=names, **kw)
        theirs = pm.generate(input_ids=ids, adapter_names=names, **kw)
    assert torch.equal(ours, theirs)


def test_lorart_save_loads_in_peft(setup, tmp_path):
    base, _, dirs = setup
    model = copy.deepcopy(base)
    for name, d in dirs.items():
        lorart.load_adapter(model, d, name)
    ids = torch.randint(0, 101, (2, 7))
    for name in dirs:
        out = tmp_path / f"saved_{name}"
        lorart.save_adapter(model, out, name)
        loaded = PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
        lorart.set_adapter(model, name)
        with torch.no_grad():
            assert_close(loaded(ids).logits, model(ids).logits, factor=FACTOR, what=name)


def test_lorart_adapter_roundtrip_via_peft(tmp_path):
    """An adapter created in lorart (ragged ranks) -> save -> PEFT -> save -> lorart."""
    base = tiny_llama()
    model = copy.deepcopy(base)
    lorart.add_adapter(model, "mine", r=3, lora_alpha=6, init_lora_weights=False,
                       target_modules=["q_proj", "up_proj"])
    layer = model.model.layers[1].mlp.up_proj
    layer.delete_adapter("mine")
    layer.add_adapter("mine", 9, lora_alpha=2, init_lora_weights=False)  # a different rank
    lorart.save_adapter(model, tmp_path / "a", "mine")
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    pm.save_pretrained(tmp_path / "b")
    again = copy.deepcopy(base)
    lorart.load_adapter(again, tmp_path / "b", "mine")
    ids = torch.randint(0, 101, (2, 5))
    with torch.no_grad():
        expected = model(ids).logits
        assert_close(pm(ids).logits, expected, factor=FACTOR)
        assert_close(again(ids).logits, expected, factor=FACTOR)


@pytest.mark.parametrize("quantize, group_size, scale_dtype", [
    ("int4", 32, torch.float16), ("nf4", 32, torch.float16), ("int8", 16, torch.float32),
    ("int8", 32, torch.float16)])
def test_quantized_base_matches_peft_on_dequantized_weights(quantize, group_size, scale_dtype,
                                                            tmp_path):
    base = tiny_llama()
    pm = peft_model(base, {"alpha": LLAMA_ADAPTERS["alpha"]})
    pm.save_pretrained(tmp_path)
    model = copy.deepcopy(base)
    lorart.patch(model, "all-linear", quantize=quantize, group_size=group_size,
                 scale_dtype=scale_dtype)
    assert model.model.layers[0].mlp.up_proj.scales.dtype == scale_dtype
    lorart.load_adapter(model, tmp_path / "alpha", "alpha")
    # PEFT's base gets exactly the weights lorart's 4-/8-bit layers represent
    with torch.no_grad():
        for path, module in model.named_modules():
            if isinstance(module, LoRALinear):
                target = pm.base_model.model.get_submodule(path)
                target = getattr(target, "base_layer", target)
                target.weight.copy_(module.base.dequantize())
    ids = torch.randint(0, 101, (2, 8))
    with torch.no_grad():
        assert_close(model(ids).logits, pm(ids).logits, factor=FACTOR)
        delta = (model(ids).logits - base(ids).logits).abs().max()
        # the quantized base really differs from the float one (8 bits: ~16x less)
        assert delta > (1e-4 if quantize == "int8" else 1e-3)
