"""Activation memory of training: lean RMSNorm / SwiGLU against transformers' modules and a
float64 reference, selective checkpointing keeping per-row adapters through recomputation
(LoRATrainer step and the HF-style forward-then-backward), compute-dtype set-up."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from conftest import assert_close
from test_train import add, random_batch, tiny_llama

import lorart
from lorart.train import (
    AdapterOptimizer,
    TrainConfig,
    checkpoint_layers,
    lean_activations,
    lora_parameters,
    prepare_for_training,
    response_losses,
    train_step,
)
from lorart.train.memory import RMSNormFunction, SiluMulFunction

transformers = pytest.importorskip("transformers")
DTYPES = [torch.float32, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 33), (2, 5, 64)])
def test_rmsnorm_matches_transformers_and_float64(dtype, shape):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    h = shape[-1]
    norm = LlamaRMSNorm(h, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(h))
    norm = norm.to(dtype)
    x = torch.randn(shape).to(dtype)
    dy = torch.randn(shape).to(dtype)

    def run(fn, x, w):
        x = x.detach().clone().requires_grad_(True)
        w = w.detach().clone().requires_grad_(True)
        y = fn(x, w)
        y.backward(dy.to(y.dtype))
        return y.detach(), x.grad, w.grad

    def transformers_norm(x, w):
        norm.weight = torch.nn.Parameter(w)
        return norm(x)

    outs = [run(lambda x, w: RMSNormFunction.apply(x, w, 1e-5), x, norm.weight),
            run(transformers_norm, x, norm.weight),
            run(lambda x, w: RMSNormFunction.apply(x, w, 1e-5), x.double(),
                norm.weight.double())]
    lean, hf, ref = outs
    assert_close(lean[0], ref[0], dtype, what="y")
    assert_close(lean[1], ref[1], dtype, what="dx")
    assert_close(lean[2], ref[2], dtype, factor=2, what="dweight")
    assert torch.equal(lean[0], hf[0])  # the same forward arithmetic as transformers
    assert_close(hf[1], ref[1], dtype, what="transformers dx")


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_matches_float64(dtype):
    gate, up, dy = (torch.randn(13, 40).to(dtype) for _ in range(3))
    got, ref = [], []
    for out, cast in ((got, lambda t: t), (ref, lambda t: t.double())):
        g, u = (cast(t).detach().requires_grad_(True) for t in (gate, up))
        fn = SiluMulFunction.apply if out is got else (
            lambda a, b: torch.nn.functional.silu(a) * b)
        y = fn(g, u)
        y.backward(cast(dy))
        out += [y.detach(), g.grad, u.grad]
    for name, a, r in zip(("y", "dgate", "dup"), got, ref):
        assert a.dtype == dtype
        assert_close(a, r, dtype, what=name)


def _grads(model, batch, names):
    train_step(model, batch, AdapterOptimizer(model, names, lr=0.0))
    return [p.grad.clone() for n in names for p in lora_parameters(model, n)]


@pytest.mark.parametrize("block,every", [("layer", 1), ("mlp", 1), ("attn", 2)])
def test_lean_and_checkpointed_mixed_step_matches(block, every):
    names = ["a", "b"]
    batch = random_batch(["b", "a", None, "a"])
    model, _ = tiny_llama()
    add(model, names)
    plain = copy.deepcopy(model)
    for m in (model, plain):
        lorart.train.freeze_all_but_adapters(m, names)
        m.train()
    expected = _grads(plain, batch, names)
    lean = lean_activations(model)
    ckpt = checkpoint_layers(model, block, every=every)
    assert len(ckpt) == (2 if every == 1 else 1)
    for g, e in zip(_grads(model, batch, names), expected):
        assert_close(g, e, torch.float32)
    ckpt.remove()
    lean.remove()
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_recomputation_keeps_per_row_adapters_after_the_forward_returned():
    """HF Trainer style: model(..., adapter_names=...) returns (the hook clears the per-row
    ids), then backward recomputes the checkpointed layers: same grads as without."""
    names = ["a", "b"]
    batch = random_batch(["b", "a", "a"])
    model, _ = tiny_llama()
    add(model, names)
    ckpt_model = copy.deepcopy(model)
    grads = []
    for m, use in ((model, False), (ckpt_model, True)):
        lorart.train.freeze_all_but_adapters(m, names)
        m.train()
        if use:
            checkpoint_layers(m)
        out = m(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                labels=batch.labels, adapter_names=batch.adapter_names)
        out.loss.backward()
        grads.append([p.grad for n in names for p in lora_parameters(m, n)])
    for g1, g0 in zip(*grads):
        assert_close(g1, g0, torch.float32)


def test_bf16_step_saves_no_float32_activations():
    """With lean activations and a bf16 compute dtype, autograd keeps no float32 tensor
    as large as an activation [B·T, H] (the fp32 LoRA weights are far smaller)."""
    names = ["a"]
    batch = random_batch(["a"] * 4, t=16)
    model, _ = tiny_llama()
    add(model, names)
    lorart.train.freeze_all_but_adapters(model, names)
    prepare_for_training(model, "bfloat16")
    model.train()
    big_fp32 = []
    rows = batch.input_ids.numel()

    def pack(t):
        if t.dtype == torch.float32 and t.numel() >= rows * 64:
            big_fp32.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        losses, _ = response_losses(model, batch)
    assert losses.dtype == torch.float32
    assert big_fp32 == []
    losses.mean().backward()
    assert all(p.grad is not None and p.dtype == torch.float32
               for p in lora_parameters(model, "a"))


def test_prepare_casts_only_frozen_weights():
    model, _ = tiny_llama(quantize=None)
    add(model, ["a"])
    lorart.train.freeze_all_but_adapters(model, ["a"])
    handle = prepare_for_training(model, "bfloat16", gradient_checkpointing="mlp")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in lora_parameters(model, "a"))
    handle.remove()
    assert not any("forward" in m.__dict__ for m in model.modules())


def test_prepare_makes_a_packed_embedding_output_the_compute_dtype():
    """GGUF models embed through a packed ``QuantizedEmbedding`` (no float parameter to
    cast): without setting its output dtype the whole bf16 step ran float32 activations
    (3x slower, 2026-12-03)."""
    from lorart.embedding import QuantizedEmbedding

    model, _ = tiny_llama(quantize="int4")
    table = model.model.embed_tokens.weight.detach()
    model.model.embed_tokens = QuantizedEmbedding(lorart.quantize(table, 32, "int8"))
    add(model, ["a"])
    lorart.train.freeze_all_but_adapters(model, ["a"])
    prepare_for_training(model, "bfloat16")
    ids = torch.randint(0, table.shape[0], (2, 5))
    assert model.model.embed_tokens(ids).dtype == torch.bfloat16
    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
    assert hidden.dtype == torch.bfloat16


def test_new_config_fields_are_checked():
    with pytest.raises(ValueError, match="compute_dtype"):
        TrainConfig(data={"a": "x"}, compute_dtype="fp8")
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        TrainConfig(data={"a": "x"}, gradient_checkpointing="everything")
    with pytest.raises(ValueError, match="checkpoint_every"):
        TrainConfig(data={"a": "x"}, checkpoint_every=0)
    model, _ = tiny_llama()
    with pytest.raises(ValueError, match="block"):
        checkpoint_layers(model, "norm")
    with pytest.raises(ValueError, match="out of range"):
        checkpoint_layers(model, layers=[5])


def test_step_loss_is_the_mean_of_the_adapters_losses():
    names = ["a", "b"]
    batch = random_batch(["a", "b", "b"])
    model, _ = tiny_llama()
    add(model, names)
    lorart.train.freeze_all_but_adapters(model, names)
    res = train_step(model, batch, AdapterOptimizer(model, names, lr=1e-3))
    assert res.loss == pytest.approx(sum(res.adapter_losses.values()) / 2)


@pytest.mark.parametrize("num_items", [None, 13])
def test_hf_forward_fused_loss_matches_transformers_loss(num_items):
    """prepare_for_hf_trainer's forward: same loss and LoRA grads as the model's own
    (unfused) loss, mixed adapters, with and without the Trainer's num_items_in_batch."""
    from lorart.train import prepare_for_hf_trainer, restore_hf_model

    names = ["a", "b"]
    batch = random_batch(["b", "a", "a"])
    model, _ = tiny_llama()
    add(model, names)
    prepare_for_hf_trainer(model, names)
    kw = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    got = []
    for fused in (True, False):
        if not fused:
            restore_hf_model(model)
            assert "forward" not in model.__dict__
        model.zero_grad()
        out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                    labels=batch.labels, adapter_names=batch.adapter_names, **kw)
        assert (out.logits is None) == fused
        out.loss.backward()
        got.append((out.loss.detach(), [p.grad.clone() for n in names
                                        for p in lora_parameters(model, n)]))
    assert_close(got[0][0], got[1][0], torch.float32)
    for g0, g1 in zip(got[0][1], got[1][1]):
        assert_close(g0, g1, torch.float32)


def test_recomputed_outputs_give_identical_grads_and_are_not_kept(monkeypatch):
    """recompute_cheap_outputs: the norm / SiLU·mul outputs saved by the next linear
    layers become recipes; the gradients are bit-identical to keeping them."""
    from lorart.train import memory

    names = ["a"]
    batch = random_batch(["a"] * 3, t=12)
    model, _ = tiny_llama()
    add(model, names)
    lorart.train.freeze_all_but_adapters(model, names)
    prepare_for_training(model, "bfloat16")
    model.train()
    packed = []
    pack = memory._pack
    monkeypatch.setattr(memory, "_pack", lambda t: packed.append(pack(t)) or packed[-1])
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        with memory.recompute_cheap_outputs() if recompute else contextlib.nullcontext():
            losses, _ = response_losses(model, batch)
        losses.mean().backward()
        grads.append([p.grad.clone() for p in lora_parameters(model, "a")])
    # 2 layers x (q_proj and v_proj save the norm's output, down_proj the SiLU·mul output:
    # the layers with LoRA, which save their input for dA)
    assert sum(isinstance(p, memory._Recipe) for p in packed) >= 2 * 3
    for g0, g1 in zip(*grads):
        assert torch.equal(g0, g1)
