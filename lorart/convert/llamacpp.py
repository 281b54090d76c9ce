"""Export a lorart (PEFT-shaped) LoRA adapter to llama.cpp's GGUF LoRA format.

llama.cpp (``--lora FILE``, ``llama_adapter_lora_init``) reads a GGUF file with

    general.type          = "adapter"
    general.architecture  = the base model's architecture ("llama")
    adapter.type          = "lora"
    adapter.lora.alpha    = alpha   (llama.cpp scales each layer by alpha / r)
    blk.N.<attn_q|attn_k|attn_v|attn_output|ffn_gate|ffn_up|ffn_down>.weight.lora_a  [r, in]
    blk.N.<...>.weight.lora_b                                                         [out, r]

(shapes in torch order; ``gguf`` writes them as ``ne = [in, r]`` and ``[r, out]``).
llama.cpp's base q/k weights have the two rotary halves of each head interleaved
(its converter permutes them); the delta ``B A`` must be too, so the rows of
``lora_b`` for ``attn_q``/``attn_k`` get the same permutation (the inverse of
:func:`lorart.convert.gguf.gguf_row_permutation`, which undoes it for loading).

One file holds one ``alpha`` but each layer of a lorart adapter has its own scale
(``lora_alpha / r``, ``/ sqrt(r)`` for rsLoRA, per-module patterns). The file's
alpha is the first layer's ``scale · r``; a layer whose scale differs gets the ratio
folded into its ``lora_b``, so every exported delta equals lorart's ``scale · B A``
(for plain PEFT adapters the ratio is exactly 1 and ``lora_b`` is written as is).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .gguf import gguf_row_permutation

# transformers module path (after "model.layers.N.") -> GGUF tensor name (after "blk.N.")
HF_TO_GGUF = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_LAYER_PATH = re.compile(r"(?:.*\.)?layers\.(\d+)\.(.+)")


def llamacpp_row_order(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order taking transformers' q/k rows to llama.cpp's: ``W_gguf = W_hf[order]``."""
    perm = gguf_row_permutation(n_rows, n_head)  # W_hf = W_gguf[perm]
    order = torch.empty_like(perm)
    order[perm] = torch.arange(n_rows)
    return order


def gguf_lora_name(module_path: str) -> str:
    """``"model.layers.3.self_attn.q_proj"`` -> ``"blk.3.attn_q.weight"``."""
    m = _LAYER_PATH.fullmatch(module_path)
    if m is None or m.group(2) not in HF_TO_GGUF:
        raise ValueError(f"module {module_path!r} has no llama.cpp tensor name; llama.cpp LoRA "
                         f"covers {sorted(HF_TO_GGUF)} inside model.layers.N")
    return f"blk.{m.group(1)}.{HF_TO_GGUF[m.group(2)]}.weight"


def llamacpp_lora_tensors(model: nn.Module, adapter_name: str
                          ) -> tuple[float, dict[str, np.ndarray]]:
    """``(alpha, {gguf name: float32 array})`` for adapter ``adapter_name`` of ``model``.

    ``model`` is a Llama-family transformers model whose linear layers are lorart
    ``LoRALinear`` (``lorart.from_gguf``, ``lorart.patch`` + ``load_adapter``).
    """
    from ..patch import lora_layers

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "num_attention_heads"):
        raise ValueError("model must be a transformers Llama-family model with a config "
                         "(num_attention_heads, num_key_value_heads)")
    n_head = config.num_attention_heads
    n_head_kv = getattr(config, "num_key_value_heads", None) or n_head
    alpha = None
    tensors: dict[str, np.ndarray] = {}
    for path, layer in lora_layers(model):
        if adapter_name not in layer.lora_A:
            continue
        if adapter_name in layer.merged:
            raise ValueError(f"adapter {adapter_name!r} is merged into {path!r}; unmerge it "
                             f"before exporting")
        name = gguf_lora_name(path)
        a = layer.lora_A[adapter_name].detach().float().cpu()
        b = layer.lora_B[adapter_name].detach().float().cpu()
        if layer.fan_in_fan_out:
            raise ValueError(f"{path!r} wraps a Conv1D; llama.cpp LoRA is for Llama layers")
        rank, scale = a.shape[0], layer.scaling(adapter_name)
        if alpha is None:
            alpha = scale * rank
        if not np.isclose(scale * rank, alpha, rtol=1e-6, atol=0.0):
            b = b * (scale * rank / alpha)  # llama.cpp applies alpha / r; keep scale · B A
        kind = name.split(".")[2]
        if kind in ("attn_q", "attn_k"):
            heads = n_head if kind == "attn_q" else n_head_kv
            b = b[llamacpp_row_order(b.shape[0], heads)]
        tensors[name + ".lora_a"] = a.contiguous().numpy()
        tensors[name + ".lora_b"] = b.contiguous().numpy()
    if alpha is None:
        raise ValueError(f"model has no adapter named {adapter_name!r} in a llama.cpp-mappable "
                         f"layer")
    return float(alpha), tensors


def export_llamacpp_lora(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default",
                         architecture: str = "llama") -> Path:
    """Write adapter ``adapter_name`` of ``model`` as a llama.cpp GGUF LoRA file (float32).

    Use it with llama.cpp's ``--lora path`` (or ``llama_cpp.Llama(lora_path=path)``) over
    the same base GGUF. Returns the path written.
    """
    import gguf

    alpha, tensors = llamacpp_lora_tensors(model, adapter_name)
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_name(f"lorart adapter {adapter_name}")
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
