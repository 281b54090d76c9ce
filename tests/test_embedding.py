"""QuantizedEmbedding / TiedQuantizedLinear against the dequantized table."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close

import lorart
from lorart.embedding import QuantizedEmbedding, TiedQuantizedLinear
from lorart.quant import QuantizedWeight


@pytest.mark.parametrize("scheme,group", [("int8", 32), ("int8", 16), ("asym", 32), ("nf4", 64)])
def test_lookup_equals_dequantized_rows(scheme, group):
    qw = lorart.quantize(torch.randn(50, 128), group, scheme)
    emb = QuantizedEmbedding(qw)
    ids = torch.tensor([[3, 49, 0], [3, 3, 17]])
    out = emb(ids)
    assert out.shape == (2, 3, 128) and out.dtype == torch.float32
    assert torch.equal(out, qw.dequantize()[ids])  # same arithmetic: bit-exact
    empty = emb(torch.zeros(1, 0, dtype=torch.long))  # as nn.Embedding: no rows, no error
    assert empty.shape == (1, 0, 128) and qw.rows(torch.zeros(0, dtype=torch.long)).dequantize(
    ).shape == (0, 128)


def test_tied_output_layer_is_the_same_matrix():
    qw = lorart.quantize(torch.randn(40, 64), 32, "int8")
    emb = QuantizedEmbedding(qw)
    head = TiedQuantizedLinear(emb)
    assert head.base.qweight is emb.qweight
    x = torch.randn(2, 3, 64)
    assert_close(head(x), x @ qw.dequantize().T)
    assert dict(head.named_buffers()) == {}  # held once, by the embedding


def test_bad_ids_and_no_float_weight():
    emb = QuantizedEmbedding(lorart.quantize(torch.randn(8, 32), 32, "int8"))
    with pytest.raises(IndexError, match=r"\[0, 8\)"):
        emb(torch.tensor([8]))
    with pytest.raises(TypeError, match="int32/int64"):
        emb(torch.tensor([1.0]))
    with pytest.raises(AttributeError, match="packed"):
        emb.weight  # noqa: B018
    with pytest.raises(TypeError, match="QuantizedWeight"):
        QuantizedEmbedding(torch.randn(8, 32))


def test_float_cast_keeps_the_packed_scales():
    qw = lorart.quantize(torch.randn(8, 32), 16, "int8")
    qw = QuantizedWeight(qw.qweight, qw.scales, torch.randn_like(qw.scales), 16, "int8")
    emb = QuantizedEmbedding(qw).to(torch.bfloat16)
    assert emb.scales.dtype == torch.float16 and emb.offsets.dtype == torch.float16
    assert torch.equal(emb.scales, qw.scales)
    out = emb(torch.tensor([1, 2]))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, qw.dequantize()[[1, 2]].to(torch.bfloat16))


def test_from_gguf_float_embedding_option(tmp_path):
    from test_gguf_architectures import TYPES, _hf_model, write_gguf

    from lorart.models import from_gguf

    path = tmp_path / "t.gguf"
    write_gguf(path, _hf_model("llama", tied=True), "llama", TYPES)
    packed, _ = from_gguf(path, tokenizer=False)
    dense, _ = from_gguf(path, tokenizer=False, quantized_embedding=False)
    assert isinstance(dense.model.embed_tokens, torch.nn.Embedding)
    assert dense.lm_head.weight is dense.model.embed_tokens.weight
    assert torch.equal(dense.model.embed_tokens.weight, packed.model.embed_tokens.base.dequantize())
    ids = torch.arange(8).reshape(1, 8)
    with torch.no_grad():
        assert_close(packed(ids).logits, dense(ids).logits)
