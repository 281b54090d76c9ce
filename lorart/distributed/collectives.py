"""The four collectives of a tensor-parallel layer, as autograd functions, plus a counter.

Megatron's pair (Shoeybi et al. 2019, §3) and the two LoRA collectives of S-LoRA:

    copy_to_group(x)      forward: identity          backward: all-reduce (sum)
        at a column-parallel layer's input: x is replicated, every rank's dx is a part
    reduce_from_group(y)  forward: all-reduce (sum)  backward: identity
        at a row-parallel layer's output: the partial sums become the output, whose
        gradient is the same on every rank
    all_reduce_sum(v)     forward: all-reduce (sum)  backward: all-reduce (sum)
        the partial ``x·Aᵀ`` of a row-parallel LoRA: every rank uses the full sum with its
        own B rows, so each rank's gradient of it is a part of the whole
    gather_last_dim(u)    forward: all-gather along the last dim (rank-major)
                          backward: all-reduce (sum), then this rank's slice
        the ``x·A_pᵀ`` of a column-parallel LoRA (A split by rank)

With one process (``world == 1``) each is the identity. ``count_bytes()`` records what
every collective sends (per rank, ring algorithms: an all-reduce of n bytes sends
2·(P−1)/P·n, an all-gather of n bytes in total sends (P−1)/P·n) — the accounting
``lorart.distributed.accounting`` predicts and the tests check against.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

import torch
import torch.distributed as dist

_COUNTER: ContextVar[list | None] = ContextVar("lorart_tp_comm", default=None)


def world_and_rank(group) -> tuple[int, int]:
    """``(world size, rank)`` of ``group`` (``None``: the default group)."""
    return dist.get_world_size(group), dist.get_rank(group)


@contextlib.contextmanager
def count_bytes():
    """``with count_bytes() as log:`` appends ``(op, tensor bytes, bytes sent per rank)``
    for every forward collective run inside the block (backward ones are not counted)."""
    log: list = []
    token = _COUNTER.set(log)
    try:
        yield log
    finally:
        _COUNTER.reset(token)


def bytes_sent(op: str, nbytes: int, world: int) -> float:
    """Bytes one rank sends for a collective over ``world`` ranks (ring algorithms):
    ``all_reduce`` of an ``nbytes`` tensor: 2·(P−1)/P·n; ``all_gather`` of an ``nbytes``
    piece a rank: (P−1)·n (its piece to every other rank)."""
    if op == "all_reduce":
        return 2 * (world - 1) * nbytes / world
    if op == "all_gather":
        return (world - 1) * nbytes
    raise ValueError(f"op must be 'all_reduce' or 'all_gather', got {op!r}")


def _record(op: str, t: torch.Tensor, world: int) -> None:
    log = _COUNTER.get()
    if log is not None:
        n = t.numel() * t.element_size()
        log.append((op, n, bytes_sent(op, n, world)))


def _all_reduce(t: torch.Tensor, group) -> torch.Tensor:
    out = t.contiguous().clone()
    dist.all_reduce(out, group=group)
    return out


class _CopyToGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromGroup(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _GatherLastDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world, rank):
        ctx.group, ctx.rank, ctx.width = group, rank, x.shape[-1]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        full = _all_reduce(grad, ctx.group)
        lo = ctx.rank * ctx.width
        return full[..., lo:lo + ctx.width].contiguous(), None, None, None


def copy_to_group(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """Identity forward, all-reduce of the gradient (see module doc)."""
    return x if world == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """Sum over the group forward, identity backward (see module doc)."""
    if world == 1:
        return x
    _record("all_reduce", x, world)
    return _ReduceFromGroup.apply(x, group)


def all_reduce_sum(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """Sum over the group, forward and backward (see module doc)."""
    if world == 1:
        return x
    _record("all_reduce", x, world)
    return _AllReduceSum.apply(x, group)


def gather_last_dim(x: torch.Tensor, group, world: int, rank: int) -> torch.Tensor:
    """``[..., w] -> [..., world·w]``, rank ``q``'s part at columns ``q·w:(q+1)·w``."""
    if world == 1:
        return x
    _record("all_gather", x, world)
    return _GatherLastDim.apply(x, group, world, rank)
