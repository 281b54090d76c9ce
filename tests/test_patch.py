"""lorart.patch / unpatch, mixed-adapter batches, set_adapter, disable_adapters."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import assert_close
from torch import nn

import lorart
from lorart import LoRALinear, reference


def tiny_llama(layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=96,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(32, 64)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(64, 64), nn.ReLU()) for _ in range(2)])
        self.lm_head = nn.Linear(64, 10)

    def forward(self, x):
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h)
        return self.lm_head(h)


def _lora_paths(model):
    return sorted(p for p, m in model.named_modules() if isinstance(m, LoRALinear))


def test_target_modules_forms():
    m = tiny_llama()
    lorart.patch(m, ["q_proj", "v_proj"])
    assert _lora_paths(m) == [f"model.layers.{i}.self_attn.{n}" for i in range(2)
                              for n in ("q_proj", "v_proj")]
    m = tiny_llama()
    lorart.patch(m, r"model\.layers\.1\.mlp\..*_proj")
    assert _lora_paths(m) == [f"model.layers.1.mlp.{n}" for n in ("down_proj", "gate_proj",
                                                                   "up_proj")]
    m = tiny_llama()
    lorart.patch(m, "all-linear")
    paths = _lora_paths(m)
    assert len(paths) == 14 and "lm_head" not in paths
    assert type(m.lm_head) is nn.Linear
    with pytest.raises(ValueError, match="matched no linear layer"):
        lorart.patch(tiny_llama(), ["nothing_here"])
    with pytest.raises(TypeError, match="Linear"):
        lorart.patch(tiny_llama(), ["embed_tokens"])


def test_patch_replaces_instances_not_classes_and_unpatch_restores():
    m = tiny_llama()
    ref = copy.deepcopy(m)
    originals = {p: mod for p, mod in m.named_modules() if isinstance(mod, nn.Linear)}
    forward_before = nn.Linear.forward
    ids = torch.randint(0, 101, (2, 6))
    lorart.patch(m, "all-linear")
    assert nn.Linear.forward is forward_before  # no class-level monkeypatching
    assert "generate" in m.__dict__ and m._forward_pre_hooks and m._forward_hooks
    with torch.no_grad():
        assert_close(m(ids).logits, ref(ids).logits)  # no adapters: same model
    lorart.add_adapter(m, "x", r=4, init_lora_weights=False)
    lorart.unpatch(m)
    assert "generate" not in m.__dict__
    for p, mod in m.named_modules():
        if p in originals:
            assert mod is originals[p]
    assert not _lora_paths(m)
    with torch.no_grad():
        assert torch.equal(m(ids).logits, ref(ids).logits)
    assert not m._forward_pre_hooks and not m._forward_hooks  # hooks removed


def test_plain_module_patch_and_quantize():
    toy = Toy()
    ref = copy.deepcopy(toy)
    lorart.patch(toy, "all-linear", quantize="nf4", group_size=32)
    assert _lora_paths(toy) == ["blocks.0.0", "blocks.1.0", "inp"]
    for p in ("inp", "blocks.0.0"):
        layer = toy.get_submodule(p)
        assert layer.is_quantized and layer.scheme == "nf4"
        assert layer.original.weight.numel() == 0  # float weights freed
    x = torch.randn(3, 32)
    err = (toy(x) - ref(x)).abs().max()
    assert 0 < err < 0.2 * ref(x).abs().max()
    lorart.unpatch(toy)
    assert type(toy.inp) is nn.Linear and toy.inp.weight.shape == (64, 32)
    with pytest.raises(ValueError, match="quantize must be"):
        lorart.patch(Toy(), "all-linear", quantize="int3")
    with pytest.raises(ValueError, match="group_size"):
        lorart.patch(Toy(), "all-linear", quantize="int4", group_size=256)
    toy = Toy()
    with pytest.raises(ValueError, match="group_size must be one of"):
        lorart.patch(toy, "all-linear", quantize="int4", group_size=16)
    assert not _lora_paths(toy)  # nothing half-patched


@pytest.mark.parametrize("group_size, scale_dtype", [(16, torch.float32), (32, torch.float16)])
def test_patch_int8_matches_the_reference(group_size, scale_dtype):
    """quantize="int8": symmetric 8-bit layers (groups from 16, fp16/fp32 scales) whose
    output, with an adapter, is the reference op on the layer's own dequantized weight."""
    toy = Toy()
    ref = copy.deepcopy(toy)
    lorart.patch(toy, "all-linear", quantize="int8", group_size=group_size,
                 scale_dtype=scale_dtype)
    for p in ("inp", "blocks.0.0", "blocks.1.0"):
        layer = toy.get_submodule(p)
        assert layer.scheme == "int8" and layer.qweight.dtype == torch.int8
        assert layer.scales.dtype == scale_dtype and layer.group_size == group_size
        assert layer.original.weight.numel() == 0
        # the model with these dequantized weights is the dense reference
        ref.get_submodule(p).weight.data.copy_(layer.base.dequantize())
    x = torch.randn(5, 32)
    with torch.no_grad():
        assert_close(toy(x), ref(x), factor=4)
    lorart.add_adapter(toy, "a", r=3, lora_alpha=6, init_lora_weights=False)
    layer = toy.inp
    a, b = layer.lora_A["a"], layer.lora_B["a"]
    with torch.no_grad():
        expected = reference.lora_forward(x, layer.base, layer.bias, a, b, [0, 3],
                                                 [2.0], None)
        assert (expected - reference.lora_forward(
            x, layer.base, layer.bias, None, None, [0], [], None)).abs().max() > 1e-3
        assert_close(layer(x), expected)


def test_patch_int8_bad_options_change_nothing():
    toy = Toy()
    with pytest.raises(TypeError, match="scale_dtype"):
        lorart.patch(toy, "all-linear", quantize="int8", scale_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="group_size must be one of"):
        lorart.patch(toy, "all-linear", quantize="int8", group_size=8)
    with pytest.raises(ValueError, match="not divisible"):
        lorart.patch(toy, "all-linear", quantize="int8", group_size=256)
    assert not _lora_paths(toy)


def test_int4_is_asym():
    toy = Toy()
    lorart.patch(toy, ["inp"], quantize="int4", group_size=32)
    assert toy.inp.scheme == "asym"


def _two_adapter_model():
    m = tiny_llama()
    lorart.add_adapter(m, "a", r=4, lora_alpha=8, init_lora_weights=False,
                       target_modules=["q_proj", "v_proj", "down_proj"])
    lorart.add_adapter(m, "b", r=6, lora_alpha=3, use_rslora=True, init_lora_weights=False,
                       target_modules=["k_proj", "o_proj", "up_proj"])
    return m


def test_mixed_batch_equals_per_sequence_runs():
    m = _two_adapter_model()
    ids = torch.randint(0, 101, (4, 7))
    names = ["b", "__base__", "a", "b"]
    with torch.no_grad():
        mixed = m(ids, adapter_names=names).logits
        for i, name in enumerate(names):
            lorart.set_adapter(m, name)
            single = m(ids[i:i + 1]).logits
            assert_close(mixed[i:i + 1], single, what=name)
    assert lorart.routing._CURRENT.get() is None  # cleared after forward
    with pytest.raises(ValueError, match="unknown adapter 'zz'"):
        m(ids, adapter_names=["a", "zz", "a", "a"])
    assert lorart.routing._CURRENT.get() is None


def test_one_adapter_batch_per_forward_shared_by_layers(monkeypatch):
    m = _two_adapter_model()
    seen = []
    real = lorart.layers.multi_lora_linear

    def spy(x, base, stack, ids, bias=None):
        seen.append(ids)
        return real(x, base, stack, ids, bias)

    monkeypatch.setattr(lorart.layers, "multi_lora_linear", spy)
    with torch.no_grad():
        m(torch.randint(0, 101, (3, 5)), adapter_names=["a", "b", "a"])
    # 12 adapted layers; two distinct adapter sets ({a} and {b}) -> two AdapterBatch objects
    assert len(seen) == 12
    assert len({id(b) for b in seen}) == 2
    assert all(isinstance(b, lorart.AdapterBatch) for b in seen)


def test_generate_with_adapter_names():
    m = _two_adapter_model()
    ids = torch.randint(1, 101, (3, 5))
    names = ["a", "__base__", "b"]
    with torch.no_grad():
        out = m.generate(ids, adapter_names=names, max_new_tokens=5, do_sample=False,
                         attention_mask=torch.ones_like(ids))
        for i, name in enumerate(names):
            lorart.set_adapter(m, name)
            single = m.generate(ids[i:i + 1], max_new_tokens=5, do_sample=False,
                                attention_mask=torch.ones_like(ids[i:i + 1]))
            assert torch.equal(out[i:i + 1], single), name
    assert lorart.routing._CURRENT.get() is None


def test_set_adapter_and_disable():
    m = _two_adapter_model()
    base = copy.deepcopy(m)
    lorart.unpatch(base)
    ids = torch.randint(0, 101, (2, 6))
    with torch.no_grad():
        ref = base(ids).logits
        lorart.set_adapter(m, "a")
        with_a = m(ids).logits
        assert (with_a - ref).abs().max() > 1e-4
        with lorart.disable_adapters(m):
            assert_close(m(ids).logits, ref)
        assert_close(m(ids).logits, with_a)
        lorart.set_adapter(m, "__base__")
        assert_close(m(ids).logits, ref)
    with pytest.raises(ValueError, match="unknown adapter"):
        lorart.set_adapter(m, "c")


def test_merge_adapter_model_level():
    m = _two_adapter_model()
    ids = torch.randint(0, 101, (2, 6))
    with torch.no_grad():
        lorart.set_adapter(m, "b")
        before = m(ids).logits
        lorart.merge_adapter(m, "b")
        assert_close(m(ids).logits, before, factor=10)
        lorart.unmerge_adapter(m, "b")
        assert_close(m(ids).logits, before, factor=10)


def test_deepcopy_of_patched_model_routes_to_its_own_layers():
    m = _two_adapter_model()
    clone = copy.deepcopy(m)
    with torch.no_grad():
        for lyr in (x for x in clone.modules() if isinstance(x, LoRALinear)):
            for p in lyr.lora_B.values():
                p.mul_(3.0)  # the copy now has different adapters
    ids = torch.randint(1, 101, (2, 5))
    names = ["a", "b"]
    with torch.no_grad():
        mixed = clone(ids, adapter_names=names).logits
        for i, name in enumerate(names):
            lorart.set_adapter(clone, name)
            assert_close(mixed[i:i + 1], clone(ids[i:i + 1]).logits, what=name)
        out = clone.generate(ids, adapter_names=names, max_new_tokens=3, do_sample=False,
                             attention_mask=torch.ones_like(ids))
        lorart.set_adapter(clone, "a")
        single = clone.generate(ids[:1], max_new_tokens=3, do_sample=False,
                                attention_mask=torch.ones_like(ids[:1]))
        assert torch.equal(out[:1], single)
    lorart.unpatch(clone)
    assert not clone._forward_pre_hooks and "generate" not in clone.__dict__
    assert m._forward_pre_hooks and "generate" in m.__dict__  # the original is untouched
