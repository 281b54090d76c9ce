"""Export to llama.cpp's GGUF LoRA format, read back with ``gguf``: metadata, names,
shapes, values, the q/k row permutation (checked against the base GGUF file's own q/k
rows) and alpha, for every adapter shipped in lorart/data/adapters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lorart
from lorart.convert.llamacpp import (
    export_llamacpp_lora,
    gguf_lora_name,
    llamacpp_lora_tensors,
    llamacpp_row_order,
)

gguf = pytest.importorskip("gguf")
try:
    from lorart.models import default_gguf_path

    default_gguf_path()
except FileNotFoundError as exc:
    pytest.skip(str(exc), allow_module_level=True)

ADAPTERS = Path(lorart.__file__).parent / "data" / "adapters"
SHIPPED = sorted(p.name for p in ADAPTERS.iterdir() if (p / "adapter_config.json").exists())
_SHORT = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
          "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


@pytest.fixture(scope="module")
def model():
    m, _ = lorart.from_gguf(tokenizer=False)
    for name in SHIPPED:
        lorart.load_adapter(m, ADAPTERS / name, name)
    return m


@pytest.fixture(scope="module")
def base_reader():
    return gguf.GGUFReader(str(default_gguf_path()))


def _read(path: Path):
    reader = gguf.GGUFReader(str(path))
    fields = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    return fields, tensors


def _array(t) -> np.ndarray:
    """A read-back F32 tensor in torch order ([rows, ne0])."""
    assert t.tensor_type == gguf.GGMLQuantizationType.F32
    return np.asarray(t.data).reshape([int(s) for s in reversed(t.shape)])


def test_shipped_adapters_exist():
    assert {"pirate", "uppercase", "json"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_export_reads_back(model, name, tmp_path):
    config = json.loads((ADAPTERS / name / "adapter_config.json").read_text())
    path = export_llamacpp_lora(model, tmp_path / f"{name}.gguf", name)
    fields, tensors = _read(path)
    assert fields["general.type"] == "adapter"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.type"] == "lora"
    assert fields["adapter.lora.alpha"] == pytest.approx(config["lora_alpha"])

    kinds = sorted(_SHORT[t] for t in config["target_modules"])
    expected = {f"blk.{i}.{k}.weight.lora_{ab}" for i in range(30) for k in kinds
                for ab in "ab"}
    assert set(tensors) == expected

    heads = {"attn_q": 9, "attn_k": 3}
    for i in range(30):
        for module, kind in _SHORT.items():
            if kind not in kinds:
                continue
            parent = "mlp" if kind.startswith("ffn") else "self_attn"
            layer = model.get_submodule(f"model.layers.{i}.{parent}.{module}")
            a_hf = layer.lora_A[name].detach().numpy()
            b_hf = layer.lora_B[name].detach().numpy()
            prefix = f"blk.{i}.{kind}.weight"
            ta, tb = tensors[prefix + ".lora_a"], tensors[prefix + ".lora_b"]
            r = config["r"]
            # ggml order: lora_a ne = [in, r], lora_b ne = [r, out] (llama.cpp's shape check)
            assert [int(s) for s in ta.shape] == [layer.in_features, r]
            assert [int(s) for s in tb.shape] == [r, layer.out_features]
            np.testing.assert_array_equal(_array(ta), a_hf)
            b = _array(tb)
            if kind in heads:  # rows interleaved like llama.cpp's base q/k
                order = llamacpp_row_order(b_hf.shape[0], heads[kind]).numpy()
                np.testing.assert_array_equal(b, b_hf[order])
                assert not np.array_equal(b, b_hf)
            else:
                np.testing.assert_array_equal(b, b_hf)


@pytest.mark.parametrize("kind,heads", [("attn_q", 9), ("attn_k", 3)])
def test_row_order_is_the_base_files_own(model, base_reader, kind, heads):
    """The permutation written into lora_b maps lorart's (transformers') q/k rows to the
    rows of the same weight in the base GGUF file, dequantized independently."""
    from gguf.quants import dequantize

    module = {"attn_q": "q_proj", "attn_k": "k_proj"}[kind]
    for i in (0, 17):
        t = next(t for t in base_reader.tensors if t.name == f"blk.{i}.{kind}.weight")
        w_file = dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
        layer = model.get_submodule(f"model.layers.{i}.self_attn.{module}")
        w_ours = layer.base.dequantize(torch.float32).numpy()
        order = llamacpp_row_order(w_ours.shape[0], heads).numpy()
        np.testing.assert_array_equal(w_file, w_ours[order])


def test_delta_is_lorart_delta_for_mixed_scales(tmp_path):
    """Layers whose scale differs from the file's alpha / r carry the ratio in lora_b,
    so every exported ``alpha / r · B A`` equals lorart's ``scale · B A``."""
    m, _ = lorart.from_gguf(tokenizer=False)
    lorart.add_adapter(m, "mix", r=4, lora_alpha=8.0, init_lora_weights=False,
                       target_modules=["q_proj", "v_proj"])
    m.model.layers[3].self_attn.v_proj.lora_alpha["mix"] = 3.0
    m.model.layers[5].self_attn.q_proj.use_rslora["mix"] = True
    alpha, tensors = llamacpp_lora_tensors(m, "mix")
    assert alpha == pytest.approx(8.0)
    for i, module, kind, heads in ((3, "v_proj", "attn_v", None), (5, "q_proj", "attn_q", 9),
                                   (7, "v_proj", "attn_v", None)):
        layer = m.get_submodule(f"model.layers.{i}.self_attn.{module}")
        a = torch.from_numpy(tensors[f"blk.{i}.{kind}.weight.lora_a"])
        b = torch.from_numpy(tensors[f"blk.{i}.{kind}.weight.lora_b"])
        delta_file = alpha / a.shape[0] * (b @ a)
        delta = layer.delta_weight("mix")
        if heads:
            delta = delta[llamacpp_row_order(delta.shape[0], heads)]
        torch.testing.assert_close(delta_file, delta, rtol=1e-5, atol=1e-7)


def test_errors(model, tmp_path):
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        export_llamacpp_lora(model, tmp_path / "x.gguf", "nope")
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(ValueError, match="no llama.cpp tensor name"):
        gguf_lora_name("model.layers.0.self_attn.rotary")
    with pytest.raises(ValueError, match="config"):
        llamacpp_lora_tensors(torch.nn.Linear(2, 2), "pirate")
    assert gguf_lora_name("model.layers.12.mlp.down_proj") == "blk.12.ffn_down.weight"
