"""The serving engine across ranks: rank 0 schedules, every rank runs its shard of a step.

    torchrun --nproc-per-node 3 -m lorart serve --tensor-parallel [serve flags]

(SmolLM2-135M has 9 heads and 3 KV heads, so it splits 3 ways, not 2.) Every rank loads
the model and calls ``tensor_parallel``; rank 0 builds a ``TensorParallelEngine`` and serves
HTTP as ``lorart serve`` does, the other ranks build the same engine (same flags, so the
same KV-cache size; checked) and call ``follow()``. In code:

    engine = TensorParallelEngine(model, tokenizer, **kw)   # on every rank
    if rank == 0: engine.start(); ... submit ...; engine.shutdown()
    else:         engine.follow()                           # returns at rank 0's shutdown

What crosses ranks per step (one ``broadcast_object_list`` from rank 0): the resident-slot
writes since the last step (the full A/B of each newly resident adapter; each rank keeps its
slice) and the ``StepBatch`` (token ids, positions, KV slots, sequence chunks, per-token
adapter segment ids, rows to sample). Then every rank runs the same packed forward on its
slice of every projection (``ShardedLoRALinear.forward_adapters``) over its own KV cache,
which holds only its KV heads. The output layer is replicated, so every rank has the logits;
only rank 0 samples. The scheduler, adapter pool, KV block allocator and request state live
on rank 0 alone; the followers' copies are never used.

Adapters are served through the engine's pool (``add_adapter``, ``--adapter``,
``--adapter-dir``), any rank (``shard.padded_rank``). Adapters loaded into the sharded
model itself are not imported (they hold only this rank's slice).
"""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist

from ..serve.engine import Engine
from ..serve.resident import ResidentSlots
from ..serve.runner import ModelRunner, StepBatch
from . import shard
from .layers import ShardedLoRALinear
from .model import tp_info

_STOP = "stop"


def _info_or_error(model):
    info = tp_info(model)
    if info is None:
        raise ValueError("the model is not tensor-parallel; call "
                         "lorart.distributed.tensor_parallel(model) on every rank first")
    return info


def init_from_env() -> int:
    """Join the process group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
    ...) with gloo (the served model lives on the CPU); returns this process's rank.

    The collective timeout is long: a follower waits in a broadcast for as long as the
    server is idle. A rank that exits makes torchrun stop the others."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    return dist.get_rank()


class MirroredSlots(ResidentSlots):
    """``ResidentSlots`` that also records every write and clear, so rank 0 can send them
    to the other ranks with the next step."""

    def __init__(self, *args, **kwargs) -> None:
        self.pending: list[tuple] = []
        super().__init__(*args, **kwargs)

    def write(self, slot, weights) -> None:
        super().write(slot, weights)
        self.pending.append(("write", slot, {p: weights.layers.get(p) for p in self._a}))

    def clear(self, slot) -> None:
        super().clear(slot)
        self.pending.append(("clear", slot, None))


class TensorParallelRunner(ModelRunner):
    """``ModelRunner`` over a ``tensor_parallel`` model: this rank's heads, its KV cache
    slice, its slice of every resident adapter; rank 0 broadcasts each step."""

    def __init__(self, model, kv, slots) -> None:
        super().__init__(model, kv, slots)
        self.info = _info_or_error(model)
        self.num_heads, self.num_kv_heads = self.info.num_heads, self.info.num_kv_heads
        n_slots = slots.num_slots if slots is not None else 0
        # path -> [per slot: (A_p, B_p, scale, padded rank) or None]
        self.local = {p: [None] * n_slots for paths in self.proj_paths for p in paths.values()}

    @staticmethod
    def kv_shape(model) -> tuple[int, int, int]:
        layers, _, head_dim = ModelRunner.kv_shape(model)
        return layers, _info_or_error(model).num_kv_heads, head_dim

    # ------------------------------------------------------------------ slots
    def _apply(self, pending: list[tuple]) -> None:
        modules = dict(self.model.named_modules())
        for op, slot, layers in pending:
            for path, per_slot in self.local.items():
                entry = layers.get(path) if op == "write" else None
                per_slot[slot] = None if entry is None else _slice(modules[path], *entry)

    # ------------------------------------------------------------------ forward
    def forward(self, batch: StepBatch) -> torch.Tensor:
        """Rank 0: send the step, then run it (logits ``[R, V]``); see module doc."""
        pending = self.slots.pending if self.slots is not None else []
        self._broadcast([pending, batch])
        self._apply(pending)
        pending.clear()
        return self._run(batch)

    def _run(self, batch: StepBatch) -> torch.Tensor:
        ids = batch.adapters.ids.to(torch.int64) if batch.adapters is not None else None
        self._slot_ids = None if ids is None else torch.div(ids, 2, rounding_mode="floor")
        return super().forward(batch)

    def follow(self) -> int:
        """Ranks > 0: run rank 0's steps until it stops; returns the steps run."""
        steps = 0
        while True:
            message = [None, None]
            self._broadcast(message)
            pending, batch = message
            if pending == _STOP:
                return steps
            self._apply(pending)
            self._run(batch)
            steps += 1

    def stop_followers(self) -> None:
        self._broadcast([_STOP, None])

    def _broadcast(self, message: list) -> None:
        group = self.info.group
        src = dist.get_global_rank(group, 0) if group is not None else 0
        dist.broadcast_object_list(message, src=src, group=group)

    def _linear(self, layer_idx, name, x, adapters):
        module = self.proj[layer_idx][name]
        if not isinstance(module, ShardedLoRALinear):
            return super()._linear(layer_idx, name, x, adapters)
        if adapters is None or self.slots is None:
            return module.forward_adapters(x, [], None)
        entries = self.local[self.proj_paths[layer_idx][name]]
        ranks = {e[0].shape[0] for e in entries if e is not None}
        if not ranks:
            return module.forward_adapters(x, [], None)
        # one entry per slot (an empty slot: rank 0), ids are slots: the engine's segment
        # ids are 2·slot (its odd segments are the slots' spare rows, never used)
        empty = _empty(module, x.dtype)
        return module.forward_adapters(x, [e if e is not None else empty for e in entries],
                                       self._slot_ids)


def _slice(layer: ShardedLoRALinear, a: torch.Tensor, b: torch.Tensor, scale: float):
    """This rank's ``(A_p, B_p, scale, r)`` of a full adapter."""
    return *layer.shard_adapter(a, b), scale, a.shape[0]


def _empty(layer: ShardedLoRALinear, dtype):
    """A rank-0 adapter slice (an empty slot): ``A_p [0, K or K/P]``, ``B_p [N/P, 0]``."""
    a_cols = layer.local_in if layer.kind == shard.ROW else layer.in_features
    b_rows = layer.out_features // layer.tp_world
    return torch.zeros(0, a_cols, dtype=dtype), torch.zeros(b_rows, 0, dtype=dtype), 0.0, 0


class TensorParallelEngine(Engine):
    """``Engine`` over a ``tensor_parallel`` model (see module doc): build it on every rank
    with the same arguments; use it on rank 0, call ``follow()`` on the others."""

    runner_class = TensorParallelRunner
    slots_class = MirroredSlots

    def __init__(self, model, tokenizer=None, **kwargs) -> None:
        info = _info_or_error(model)
        super().__init__(model, tokenizer, **kwargs)
        self.info = info
        blocks = torch.tensor([self.memory_plan["kv_blocks"]] * 2, dtype=torch.int64)
        blocks[1] *= -1
        dist.all_reduce(blocks, op=dist.ReduceOp.MAX, group=info.group)
        if int(blocks[0]) != -int(blocks[1]):
            raise ValueError(f"ranks planned different KV caches ({-int(blocks[1])} to "
                             f"{int(blocks[0])} blocks): build the engine with the same "
                             f"arguments on every rank")

    @classmethod
    def from_gguf(cls, path=None, group=None, **kwargs) -> TensorParallelEngine:
        """``lorart.from_gguf(path)``, sharded over ``group`` (every rank calls this)."""
        import lorart

        from .model import tensor_parallel

        model, tokenizer = lorart.from_gguf(path)
        tensor_parallel(model, group)
        return cls(model, tokenizer, **kwargs)

    def _import_model_adapters(self, modules, shapes) -> None:
        if any(modules[p].adapter_names for p in shapes):
            raise ValueError("TensorParallelEngine serves adapters through its pool "
                             "(add_adapter / add_adapter_dir); the sharded model already "
                             "holds adapters, which it cannot import (each rank has a slice)")

    def follow(self) -> int:
        """Ranks > 0: run rank 0's steps until its ``shutdown``; returns the steps run."""
        if self.info.rank == 0:
            raise RuntimeError("follow() is for ranks > 0; rank 0 runs the engine")
        return self.runner.follow()

    def shutdown(self, timeout: float = 10.0) -> None:
        super().shutdown(timeout)
        if self.info.rank == 0 and not getattr(self, "_followers_stopped", False):
            self._followers_stopped = True
            self.runner.stop_followers()
