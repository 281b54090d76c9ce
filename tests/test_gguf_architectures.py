"""Llama-family GGUF files written here (gguf.GGUFWriter, small random transformers models),
loaded by ``lorart.from_gguf`` and by transformers' own GGUF loader from the same file.

Every architecture (llama; Mistral, which llama.cpp writes as a llama file; qwen2 with
q/k/v biases) in every tensor type the
loader keeps packed (Q4_0 Q4_1 Q5_0 Q5_1 Q8_0 Q4_K Q5_K Q6_K), plus a mixed-type file per
architecture (like a real Q4_K_M file) and Llama 3 rope scaling (``rope_freqs``, which
transformers' GGUF loader ignores, so that one is compared with the source model).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close

import lorart
from lorart import LoRALinear
from lorart.embedding import QuantizedEmbedding, QuantizedLinear, TiedQuantizedLinear

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]
HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 512, 4, 2, 2, 300
_LINEAR = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
           "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
           "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def _hf_model(arch: str, tied: bool, rope_parameters=None):
    """A small random transformers model of ``arch`` (K = 256 or 512: every type's block)."""
    cls = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}[arch]
    kwargs = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=KV_HEADS, max_position_embeddings=512,
                  rms_norm_eps=1e-5, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    if rope_parameters is not None:
        kwargs["rope_parameters"] = rope_parameters
    torch.manual_seed(0)
    config = getattr(transformers, f"{cls}Config")(**kwargs)
    model = getattr(transformers, f"{cls}ForCausalLM")(config)
    with torch.no_grad():  # visible norms and biases (zero/one init would hide mistakes)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model.eval()


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row permutation (convert_hf_to_gguf.py ``LlamaModel.permute``)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _k_blocks(kind: str, n: int, k: int, rng) -> np.ndarray:
    """Random K-quant blocks with small super-scales (gguf's Python has no K quantizer)."""
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    values, size = gguf.constants.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n, k // values, size), dtype=np.uint8)
    if kind == "Q6_K":
        d = np.float16(1e-5) * (1 + rng.random((n, k // values)))
        raw[..., 208:210] = d.astype(np.float16)[..., None].view(np.uint8)
    else:
        for at, mag in ((0, 2e-4), (2, 1e-4)):
            d = (mag * (1 + rng.random((n, k // values)))).astype(np.float16)
            raw[..., at:at + 2] = d[..., None].view(np.uint8)
    return raw.reshape(n, -1)


def _encode(w: np.ndarray, kind: str, rng) -> tuple[np.ndarray, object]:
    """``(data, raw_dtype)`` of ``w`` stored as GGUF type ``kind`` (F32: as is)."""
    if kind == "F32":
        return w.astype(np.float32), None
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    if kind.endswith("_K"):
        return _k_blocks(kind, *w.shape, rng), qtype
    return gguf.quants.quantize(w.astype(np.float32), qtype), qtype


def write_gguf(path, model, arch: str, types, rope_freqs: np.ndarray | None = None) -> None:
    """``model``'s tensors into a GGUF file; 2-D weights in ``types`` (cycled per tensor)."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    rng = np.random.default_rng(1)
    kinds = iter(types * 100)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    permuted = arch == "llama"  # transformers un-permutes llama files only (mistral: not)

    def add(name, w, quantize=True):
        if quantize and w.ndim == 2:
            data, qtype = _encode(w, next(kinds), rng)
            writer.add_tensor(name, data, raw_dtype=qtype)  # qtype None: float32
        else:
            writer.add_tensor(name, w.astype(np.float32))

    add("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        add(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        add(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        for hf, gg in _LINEAR.items():
            for part in ("weight", "bias"):
                if p + hf + "." + part not in sd:
                    continue
                w = sd[p + hf + "." + part]
                if permuted and gg in ("attn_q", "attn_k"):
                    w = _permute(w, cfg.num_attention_heads if gg == "attn_q"
                                 else cfg.num_key_value_heads)
                add(f"blk.{i}.{gg}.{part}", w)
    add("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    if rope_freqs is not None:
        add("rope_freqs.weight", rope_freqs, quantize=False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _theirs(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval()


def _compare(path, arch: str, tied: bool, types) -> None:
    ours, _ = lorart.from_gguf(path, tokenizer=False)
    theirs = _theirs(path)
    assert type(ours).__name__ == type(theirs).__name__
    for i in range(LAYERS):
        for hf in _LINEAR:
            mine = ours.get_submodule(f"model.layers.{i}.{hf}")
            ref = theirs.get_submodule(f"model.layers.{i}.{hf}")
            assert isinstance(mine, LoRALinear) and mine.is_quantized
            assert torch.equal(mine.base.dequantize(), ref.weight), (i, hf)
            assert (mine.bias is None) == (ref.bias is None)
            if ref.bias is not None:
                assert torch.equal(mine.bias, ref.bias)
    emb = ours.model.embed_tokens
    assert isinstance(emb, QuantizedEmbedding)
    assert torch.equal(emb.base.dequantize(), theirs.model.embed_tokens.weight)
    assert isinstance(ours.lm_head, TiedQuantizedLinear if tied else QuantizedLinear)
    if not tied:
        assert torch.equal(ours.lm_head.base.dequantize(), theirs.lm_head.weight)
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        mine, ref = ours(ids).logits, theirs(ids).logits
    assert_close(mine, ref, factor=10)


@pytest.mark.parametrize("kind", TYPES)
def test_llama_every_type(tmp_path, kind):
    path = tmp_path / f"llama-{kind}.gguf"
    write_gguf(path, _hf_model("llama", tied=False), "llama", [kind])
    _compare(path, "llama", tied=False, types=[kind])


@pytest.mark.parametrize("source,arch,tied", [("llama", "llama", True),
                                              ("mistral", "llama", False),
                                              ("qwen2", "qwen2", True), ("qwen2", "qwen2", False)])
def test_architecture_mixed_types(tmp_path, source, arch, tied):
    """One file per architecture whose tensors cycle through every type (a Mistral model is
    written as a llama file, as llama.cpp's converter does)."""
    path = tmp_path / f"{source}.gguf"
    model = _hf_model(source, tied=tied)
    if source == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    write_gguf(path, model, arch, TYPES)
    _compare(path, arch, tied, TYPES)


def test_float_file_matches_the_source_model(tmp_path):
    """F32 tensors: lorart's load of the file reproduces the source model's logits."""
    model = _hf_model("qwen2", tied=False)
    path = tmp_path / "f32.gguf"
    write_gguf(path, model, "qwen2", ["F32"])
    ours, _ = lorart.from_gguf(path, tokenizer=False)
    ids = torch.arange(12).reshape(2, 6)
    with torch.no_grad():
        assert_close(ours(ids).logits, model(ids).logits, factor=10)


def test_llama3_rope_scaling(tmp_path):
    """Llama 3 rope scaling, stored the llama.cpp way (``rope_freqs``: default inv_freq /
    llama3 inv_freq): lorart's load matches the source model that has the llama3 rope."""
    rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    model = _hf_model("llama", tied=True, rope_parameters=rope)
    scaled = model.model.rotary_emb.inv_freq
    default = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    assert not torch.allclose(scaled, default)  # the scaling changes some frequencies
    path = tmp_path / "llama3.gguf"
    write_gguf(path, model, "llama", ["F32"], rope_freqs=(default / scaled).numpy())
    ours, _ = lorart.from_gguf(path, tokenizer=False)
    torch.testing.assert_close(ours.model.rotary_emb.inv_freq, scaled, rtol=1e-6, atol=0)
    ids = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(ours(ids).logits, model(ids).logits, factor=10)


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        lorart.from_gguf(path, tokenizer=False)
