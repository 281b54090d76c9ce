"""Small models and random PEFT adapters for the engine's tests and benchmarks."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .runner import PROJECTIONS as _PROJ


def tiny_llama(seed: int = 0, vocab: int = 96, hidden: int = 64, layers: int = 2,
               heads: int = 4, kv_heads: int = 2, intermediate: int = 96,
               max_positions: int = 512, quantize: str | None = None):
    """A random ``LlamaForCausalLM`` (fp32, eval mode) patched by ``lorart.patch``.

    ``initializer_range`` 0.2 (not 0.02) makes next-token logits well separated, so
    greedy decoding is not decided by float rounding ties.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorart

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads,
                      intermediate_size=intermediate, max_position_embeddings=max_positions,
                      initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    lorart.patch(model, "all-linear", quantize=quantize, group_size=32)
    return model


def projection_paths(model) -> list[str]:
    return [f"model.layers.{i}.{p}" for i in range(len(model.model.layers)) for p in _PROJ]


def random_adapter(model, rank: int, seed: int, alpha: float | None = None,
                   targets: tuple[str, ...] | None = None, std: float = 0.1,
                   use_rslora: bool = False) -> tuple[dict[str, torch.Tensor], dict]:
    """``(tensors, config)`` of a random PEFT LoRA adapter for ``model``'s projections
    (``targets``: suffixes such as ``"q_proj"``; default all seven)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    names = sorted({p.rsplit(".", 1)[1] for p in _PROJ} if targets is None else set(targets))
    for path in projection_paths(model):
        if path.rsplit(".", 1)[1] not in names:
            continue
        layer = model.get_submodule(path)
        n, k = layer.out_features, layer.in_features
        key = f"base_model.model.{path}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(rank, k, generator=g) * std
        tensors[f"{key}.lora_B.weight"] = torch.randn(n, rank, generator=g) * std
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": float(alpha or 2 * rank),
              "target_modules": names, "bias": "none", "use_rslora": use_rslora,
              "task_type": "CAUSAL_LM"}
    return tensors, config


def write_peft_dir(path: str | Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` under ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(path / "adapter_model.safetensors"))
    return path
