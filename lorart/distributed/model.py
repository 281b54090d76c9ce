"""``tensor_parallel(model, group)``: shard a Llama-family model over a process group.

Megatron layout per decoder layer: q/k/v/gate/up column-parallel, o/down row-parallel
(``shard.LLAMA_SPLITS``), so attention heads and KV heads split evenly (rank p runs heads
``p·H/P .. (p+1)·H/P − 1`` and the KV heads they read) and each rank runs ``I/P`` of the MLP.
transformers' attention infers the head count from the projection's width, so the
attention modules themselves are untouched. Each projection becomes a
``ShardedLoRALinear`` (its adapters sliced S-LoRA's way, see ``layers``).

Replicated, not sharded: the embedding, the norms, the rotary embedding and the output
layer (``lm_head``, dense or lorart's quantized/tied one). Every rank thus computes the full
logits with no extra collective; this costs ``V·H`` weights per rank (SmolLM2: 28 M of 135 M
values; Llama-2-7B: 131 M of 6.7 B). Sharding them by vocabulary is not done.

Every check runs before anything changes: heads and KV heads divisible by the group size,
every projection's split divisible, no quantization group split, nothing merged, not
sharded twice. (Adapter ranks need not divide: ``shard.padded_rank``.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn

from ..layers import LoRALinear, is_linear_like
from ..patch import ensure_patch_state, get_submodule_parent
from . import shard
from .collectives import world_and_rank
from .layers import ShardedLoRALinear

_ATTR = "_lorart_tensor_parallel"


@dataclass
class TensorParallelInfo:
    """What ``tensor_parallel`` did to a model: the group and this rank's place in it."""

    group: object
    world: int
    rank: int
    num_heads: int          # this rank's attention heads
    num_kv_heads: int       # this rank's KV heads


def tp_info(model: nn.Module) -> TensorParallelInfo | None:
    """The model's ``TensorParallelInfo``, ``None`` when it is not sharded."""
    return model.__dict__.get(_ATTR)


def projection_paths(model: nn.Module) -> list[tuple[str, str]]:
    """``(module path, "column"|"row")`` of every projection ``tensor_parallel`` splits."""
    return [(f"model.layers.{i}.{suffix}", kind)
            for i in range(len(model.model.layers)) for suffix, kind in shard.LLAMA_SPLITS.items()]


def tensor_parallel(model: nn.Module, group=None) -> nn.Module:
    """Shard ``model`` (a Llama-family ``*ForCausalLM``, lorart-patched or not, dense or
    quantized) over ``group`` (``None``: the default process group), in place.

    Call it on every rank of the group with the same model and adapters (each rank keeps its
    slice). Afterwards ``model(...)``, ``generate``, ``adapter_names=``, ``lorart.route``,
    ``lorart.set_adapter``/``add_adapter``/``load_adapter`` and training work as on one
    process; ``lorart.distributed.load_adapter`` reads only this rank's slice of a file.
    Raises ``ValueError`` (model unchanged) when the model cannot be split this way.
    Returns ``model``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("tensor_parallel needs torch.distributed initialized "
                           "(dist.init_process_group, e.g. under torchrun)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if tp_info(model) is not None:
        raise ValueError("tensor_parallel: this model is already sharded")
    world, rank = world_and_rank(group)
    heads, kv_heads = _check_model(model, world)
    modules = dict(model.named_modules())
    plan = [(p, kind, modules[p]) for p, kind in projection_paths(model)]
    for path, kind, module in plan:
        _check_projection(path, kind, module, world)

    registry = ensure_patch_state(model).registry  # from here on the model changes
    for path, kind, module in plan:
        if not isinstance(module, LoRALinear):
            module = LoRALinear.from_linear(module, registry=registry)
        parent, attr = get_submodule_parent(model, path)
        setattr(parent, attr, ShardedLoRALinear.from_layer(module, kind, group, world, rank))
    model.__dict__[_ATTR] = TensorParallelInfo(group, world, rank, heads // world,
                                               kv_heads // world)
    _drop_fast_generate(model)
    return model


def _drop_fast_generate(model: nn.Module) -> None:
    """``from_gguf`` routes batch-1 greedy ``generate`` through ``lorart.runtime``'s lean
    decoder, which reads whole weights and runs no collectives: put back the ``generate`` it
    wraps (transformers' loop, through the sharded layers)."""
    from ..runtime import FastGenerate

    current = model.__dict__.get("generate")
    if isinstance(current, FastGenerate):
        model.__dict__["generate"] = current.fallback


def _check_model(model: nn.Module, world: int) -> tuple[int, int]:
    inner = getattr(model, "model", None)
    cfg = getattr(model, "config", None)
    if inner is None or not hasattr(inner, "layers") or cfg is None:
        raise ValueError(f"tensor_parallel supports Llama-family *ForCausalLM models "
                         f"(model.model.layers, model.config); got {type(model).__name__}")
    heads = cfg.num_attention_heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    for what, n in (("num_attention_heads", heads), ("num_key_value_heads", kv_heads)):
        if n % world:
            raise ValueError(f"tensor_parallel: {what}={n} is not divisible by the group's "
                             f"{world} ranks (each rank runs whole heads)")
    for i, layer in enumerate(inner.layers):
        for extra in ("q_norm", "k_norm"):
            if hasattr(layer.self_attn, extra):
                raise ValueError(f"tensor_parallel: layer {i} has self_attn.{extra} (e.g. "
                                 f"Qwen3), which is not supported")
    return heads, kv_heads


def _check_projection(path: str, kind: str, module: nn.Module, world: int) -> None:
    if isinstance(module, ShardedLoRALinear):
        raise ValueError(f"tensor_parallel: {path} is already sharded")
    if isinstance(module, LoRALinear):
        if module.fan_in_fan_out:
            raise ValueError(f"tensor_parallel: {path} wraps a Conv1D; only nn.Linear "
                             f"projections (Llama family) are supported")
        if module.merged:
            raise ValueError(f"tensor_parallel: {path} has merged adapters {module.merged}; "
                             f"unmerge them first")
        shard.check_layer(path, kind, module.out_features, module.in_features, module.base,
                          world)
    elif isinstance(module, nn.Linear) and is_linear_like(module):
        shard.check_layer(path, kind, module.out_features, module.in_features, module.weight,
                          world)
    else:
        raise ValueError(f"tensor_parallel: {path} is a {type(module).__name__}; expected "
                         f"nn.Linear or lorart's LoRALinear")
