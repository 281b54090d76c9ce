"""``load_adapter`` for a tensor-parallel model: each rank reads only its slice of the file.

The PEFT directory is checked as ``lorart.load_adapter`` checks it (the same
``AdapterConfig`` and key parsing), but tensors are read with safetensors'
``safe_open(...).get_slice`` using this rank's slice of every A and B
(``shard.adapter_slices``), so a rank reads ``1/P`` of the file. Shapes come from the
file's header; the finite-value check covers the slice this rank read. Before anything
changes, the ranks agree (one all-reduce of a flag): if any rank found a problem, every
rank raises and no rank's model changes.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch import nn

from ..layers import BASE_ADAPTER
from ..patch import freeze_base
from ..peft_format import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    AdapterConfig,
    config_and_weights,
    lora_pairs,
    targeted,
)
from . import shard
from .layers import ShardedLoRALinear
from .model import tp_info


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> None:
    """Load a PEFT LoRA adapter directory into a ``tensor_parallel`` model as ``name``,
    reading only this rank's slices. Call it on every rank of the group. Raises
    ``ValueError``/``FileNotFoundError`` on every rank, model unchanged, when any rank
    finds the adapter unusable."""
    info = tp_info(model)
    if info is None:
        raise ValueError("model is not tensor-parallel; use lorart.load_adapter")
    plan, error = None, None
    try:
        plan = _read_plan(model, path, name)
    except (ValueError, FileNotFoundError, TypeError) as exc:
        error = exc
    failed = torch.tensor([0 if error is None else 1 << info.rank], dtype=torch.int64)
    if info.world > 1:
        dist.all_reduce(failed, group=info.group)
    if error is not None:
        raise error
    if int(failed):
        ranks = [r for r in range(info.world) if int(failed) >> r & 1]
        raise ValueError(f"{path}: adapter {name!r} failed to load on rank(s) {ranks} (see "
                         f"their error); nothing was changed")
    added = []
    try:
        for layer, r, a, b, alpha, rslora in plan:
            layer.add_adapter_shard(name, r, alpha, rslora, a, b)
            added.append(layer)
    except Exception:
        for layer in added:
            layer.delete_adapter(name)
        raise
    freeze_base(model)


def _read_plan(model: nn.Module, path, name: str) -> list:
    """Everything checked and this rank's slices read: ``[(layer, r, A_p, B_p, alpha,
    use_rslora)]``. Raises on any problem; changes nothing."""
    from safetensors import SafetensorError, safe_open

    if not isinstance(name, str) or not name or "." in name or name == BASE_ADAPTER:
        raise ValueError(f"name must be a non-empty adapter name without '.', got {name!r}")
    where = str(path)
    raw, weights = config_and_weights(path)
    cfg = AdapterConfig(raw, f"{where}/{CONFIG_NAME}")
    modules = dict(model.named_modules())
    plan = []
    try:
        with safe_open(str(weights), framework="pt") as f:
            by_module = lora_pairs({k: k for k in f.keys()}, where)
            if not by_module:
                raise ValueError(f"{where}: {WEIGHTS_NAME} holds no LoRA weights")
            _check_targets(model, cfg, by_module, where)
            for mod_path, keys in sorted(by_module.items()):
                layer = modules.get(mod_path)
                if not isinstance(layer, ShardedLoRALinear):
                    raise ValueError(f"{where}: adapter targets {mod_path!r}, which is not a "
                                     f"tensor-parallel projection of this model")
                if name in layer.lora_A:
                    raise ValueError(f"adapter {name!r} already exists in {mod_path!r}")
                for kind in ("lora_A", "lora_B"):
                    if kind not in keys:
                        raise ValueError(f"{where}: missing {kind} for module {mod_path!r}")
                r = cfg.rank(mod_path)
                a, b = _read_slices(f, keys, layer, mod_path, r, where)
                plan.append((layer, r, a, b, cfg.alpha(mod_path), cfg.use_rslora))
    except SafetensorError as exc:
        raise ValueError(f"{weights}: not a readable safetensors file ({exc})") from exc
    return plan


def _read_slices(f, keys: dict, layer: ShardedLoRALinear, mod_path: str, r: int,
                 where: str):
    """This rank's ``(A_p, B_p)`` read from the file: the rows/columns it owns of the
    adapter zero-padded to ``shard.padded_rank`` (the padding is not in the file)."""
    out_f, in_f = layer.out_features, layer.in_features
    (a_rows, a_cols), (b_rows, _) = layer.adapter_index(r)
    tensors = []
    for kind, shape in (("lora_A", (r, in_f)), ("lora_B", (out_f, r))):
        part = f.get_slice(keys[kind])
        if tuple(part.get_shape()) != shape:
            raise ValueError(f"{where}: {mod_path}.{kind}.weight has shape "
                             f"{list(part.get_shape())}, expected {list(shape)} (r={r}, layer "
                             f"[{out_f}, {in_f}])")
        if kind == "lora_A":  # rows past r are padding: zeros
            stop = min(a_rows.stop, r)
            t = part[a_rows.start:stop, a_cols] if stop > a_rows.start else \
                torch.zeros(0, a_cols.stop - a_cols.start)
            t = torch.cat([t, t.new_zeros(a_rows.stop - a_rows.start - t.shape[0], t.shape[1])])
        else:
            t = part[b_rows, 0:r]
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {mod_path}.{kind}.weight must be finite floats")
        tensors.append(t)
    a, b = tensors
    return a, torch.cat([b, b.new_zeros(b.shape[0], shard.padded_rank(layer.kind, r,
                                                                       layer.tp_world) - r)], 1)


def _check_targets(model, cfg: AdapterConfig, by_module: dict, where: str) -> None:
    selected = targeted(model, cfg, where)
    if selected is None:
        return
    extra, missing = sorted(set(by_module) - selected), sorted(selected - set(by_module))
    if extra or missing:
        raise ValueError(f"{where}: weights for {extra[:3]} not selected by target_modules, "
                         f"or none for {missing[:3]} selected by target_modules="
                         f"{cfg.target_modules!r}")


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 base_model_name_or_path: str | None = None) -> None:
    """Write adapter ``name`` of a ``tensor_parallel`` model as ONE full PEFT directory,
    exactly as ``lorart.save_adapter`` writes it for the unsharded model. Call it on every
    rank (the slices are gathered); group rank 0 writes the files.

    Rank 0 builds a stand-in module tree with the model's paths: each sharded layer
    becomes a full-size ``LoRALinear`` over a stride-0 base (no memory) holding the
    gathered adapter, every other linear layer is the model's own, and
    ``lorart.save_adapter`` writes it (same config rules, same keys). The model is not
    touched.
    """
    from ..layers import LoRALinear, is_linear_like
    from ..peft_io import save_adapter as save_full

    info = tp_info(model)
    if info is None:
        raise ValueError("model is not tensor-parallel; use lorart.save_adapter")
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, ShardedLoRALinear)]
    if not any(name in m.lora_A for _, m in layers):
        raise ValueError(f"model has no adapter named {name!r}")
    gathered = {p: _gather_adapter(m, name, info) for p, m in layers if name in m.lora_A}
    if info.rank != 0:
        return
    stand_in = type(type(model).__name__, (nn.Module,), {})()  # its class name: task_type
    stand_in.config = getattr(model, "config", None)
    for mod_path, module in model.named_modules():
        if isinstance(module, ShardedLoRALinear):
            full = LoRALinear(module.in_features, module.out_features,
                              torch.zeros(()).expand(module.out_features, module.in_features))
            if mod_path in gathered:
                a, b = gathered[mod_path]
                full.add_adapter(name, a.shape[0], module.lora_alpha[name],
                                 module.use_rslora[name], lora_a=a, lora_b=b)
            module = full
        elif not (is_linear_like(module) or isinstance(module, LoRALinear)):
            continue
        _set_path(stand_in, mod_path, module)
    save_full(stand_in, path, name, base_model_name_or_path)


def _gather_adapter(layer: ShardedLoRALinear, name: str, info) -> tuple[torch.Tensor,
                                                                         torch.Tensor]:
    """The full ``(A [r, K], B [N, r])`` of ``layer``'s adapter from every rank's slice."""
    mine = (layer.lora_A[name].detach().cpu(), layer.lora_B[name].detach().cpu())
    parts = [mine] * info.world
    if info.world > 1:
        dist.all_gather_object(parts, mine, group=info.group)
    a = torch.cat([p[0] for p in parts], 0 if layer.kind == shard.COLUMN else 1)
    b = torch.cat([p[1] for p in parts], 0)
    r = layer.lora_rank[name]
    return a[:r], b[:, :r]  # drop the zero padding (shard.padded_rank)


def _set_path(root: nn.Module, path: str, module: nn.Module) -> None:
    *parents, last = path.split(".")
    node = root
    for part in parents:
        if not hasattr(node, part):
            node.add_module(part, nn.Module())
        node = getattr(node, part)
    node.add_module(last, module)
