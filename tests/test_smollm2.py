"""The real 4-bit model: lorart.from_gguf (SmolLM2-135M-Instruct Q4_1, exact 4-bit
LoRALinear layers, the Q8_0 tied embedding/output kept 8-bit) against transformers' own
GGUF loader (dequantized float32)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import lorart
from lorart import LoRALinear
from lorart.embedding import QuantizedEmbedding, TiedQuantizedLinear
from lorart.model_io import model_nbytes

pytest.importorskip("gguf")
try:  # the package's own __init__ needs `llm`; only its data file is used
    from lorart.models import default_gguf_path

    default_gguf_path()
except FileNotFoundError as exc:
    pytest.skip(str(exc), allow_module_level=True)
pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def ours():
    return lorart.from_gguf()


@pytest.fixture(scope="module")
def theirs():
    from transformers import AutoModelForCausalLM

    path = default_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval()


def _chat(tok, prompts):
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                     add_generation_prompt=True) for p in prompts]
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True)


def test_every_linear_is_4bit_and_no_float_copy(ours):
    model, _ = ours
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(layers) == 30 * 7
    assert all(lyr.is_quantized and lyr.scheme == "asym" and lyr.group_size == 32
               for lyr in layers)
    # the tied Q8_0 embedding stays 8-bit, and the output layer reads the same buffers
    emb = model.model.embed_tokens
    assert isinstance(emb, QuantizedEmbedding) and emb.scheme == "int8"
    assert isinstance(model.lm_head, TiedQuantizedLinear) and model.lm_head.embedding is emb
    # only norms are float: (2*30 + 1)*576
    assert sum(p.numel() for p in model.parameters()) == 61 * 576


def test_model_holds_about_its_gguf_bytes(ours):
    """Issue #14: whole model <= 1.1x the GGUF file (was 1.83x with a float embedding)."""
    model, _ = ours
    assert model_nbytes(model) <= 1.1 * default_gguf_path().stat().st_size


def test_weights_equal_transformers_exactly(ours, theirs):
    """Codes, scales and the q/k row un-permutation are exact: dequantized == float load."""
    model, _ = ours
    for i in (0, 17, 29):
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                     "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            path = f"model.layers.{i}.{name}"
            mine = model.get_submodule(path).base.dequantize()
            ref = theirs.get_submodule(path).weight.detach()
            assert torch.equal(mine, ref), path
    assert torch.equal(model.model.embed_tokens.base.dequantize(),
                       theirs.model.embed_tokens.weight)
    ids = torch.tensor([[0, 5, 49151], [7, 7, 1]])
    assert torch.equal(model.model.embed_tokens(ids), theirs.model.embed_tokens(ids))
    assert torch.equal(model.model.layers[5].input_layernorm.weight,
                       theirs.model.layers[5].input_layernorm.weight)


def test_next_token_logits_match(ours, theirs):
    model, tok = ours
    batch = _chat(tok, PROMPTS)
    with torch.no_grad():
        mine = model(**batch).logits[:, -1]
        ref = theirs(**batch).logits[:, -1]
    assert_close(mine, ref, factor=10)  # 30 layers of float32 with another op order
    assert torch.equal(mine.argmax(-1), ref.argmax(-1))


def test_greedy_text_matches(ours, theirs):
    model, tok = ours
    batch = _chat(tok, PROMPTS)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        mine = model.generate(**batch, **kw)
        ref = theirs.generate(**batch, **kw)
    assert tok.batch_decode(mine) == tok.batch_decode(ref)
    assert "Paris" in tok.decode(mine[0, batch["input_ids"].shape[1]:])


def test_adapters_on_the_4bit_model(ours, tmp_path):
    """A mixed batch on the real model: rows with different adapters differ, base rows don't."""
    model, tok = ours
    lorart.add_adapter(model, "x", r=8, lora_alpha=64, init_lora_weights=False)
    try:
        batch = _chat(tok, [PROMPTS[0]] * 2)
        with torch.no_grad():
            mixed = model(**batch, adapter_names=["x", "__base__"]).logits[:, -1]
            with lorart.disable_adapters(model):
                base = model(**batch).logits[:, -1]
        assert_close(mixed[1], base[1], factor=10)
        assert (mixed[0] - base[0]).abs().max() > 1e-2
        lorart.save_adapter(model, tmp_path / "x", "x")
        assert (tmp_path / "x" / "adapter_model.safetensors").exists()
    finally:
        lorart.delete_adapter(model, "x")
