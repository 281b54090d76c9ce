"""``ShardedLoRALinear``: one rank's part of a tensor-parallel ``LoRALinear``.

A ``LoRALinear`` whose base weight and adapters hold only this rank's slice
(``lorart.distributed.shard``), whose forward runs the collectives, and which keeps the
*full* layer's ``in_features``/``out_features`` and adapter ranks, so the model-level API
(``lorart.set_adapter``, ``adapter_names=``, ``lorart.route``, ``lorart.load_adapter``,
``generate``) sees the same layer as on one process. ``tp_group`` marks it sharded.

What one forward communicates, per row of x (``P`` ranks, ``r`` the row's adapter rank; in
a mixed batch every row sends as many values as the layer's widest adapter, its own packed
first — ``_RowColumns`` — as vLLM pads to ``max_lora_rank``):

column-parallel (q, k, v, gate, up), ``x`` replicated, output split by rows of W::

    y_p  = x W_pᵀ + bias_p                          no communication (W_p [N/P, K])
    u_p  = x A_pᵀ                                   A_p [r/P, K]: A split by rank
    u    = all_gather(u_p)                          r values: the only collective
    y_p += c · u B_pᵀ                               B_p [N/P, r]: B split by output rows

row-parallel (o, down), ``x_p`` split by columns (the heads / intermediate of this rank)::

    v    = all_reduce(x_p A_pᵀ)                     A_p [r, K/P]: A split by input; r values
    z_p  = c · v B_pᵀ                               B_p [N/P, r]: B split by output rows
    y    = all_reduce(x_p W_pᵀ + pad_p(z_p)) + bias the base's own all-reduce of N values

The second all-reduce is the base layer's and carries the LoRA output for free: rank p adds
``z_p`` into its output columns ``p·N/P:(p+1)·N/P`` (zero elsewhere), so the sum over ranks
is ``x Wᵀ + c · v Bᵀ`` without an all-gather of ``z``. Only the rank-sized ``u``/``v`` are
LoRA traffic. (Replicating B on row layers would remove the ``v`` all-reduce at P× the
expand work; that is vLLM's default, counted in ``accounting`` for comparison.)

Gradients: ``copy_to_group`` on a column layer's input sums the ranks' ``dx`` parts, the
all-gather's backward sums each rank's part of ``du`` (see ``collectives``), so A/B
gradients are this rank's slice of the single-process gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .. import routing
from ..adapters import AdapterBatch
from ..layers import LoRALinear
from ..ops import check_shape, lora_linear
from ..routing import BASE_ADAPTER, Route
from . import shard
from .collectives import all_reduce_sum, copy_to_group, gather_last_dim, reduce_from_group


class ShardedLoRALinear(LoRALinear):
    """This rank's part of a column- or row-parallel ``LoRALinear`` (see module doc).

    ``in_features``/``out_features`` are the full layer's; ``local_in``/``local_out`` this
    rank's. ``lora_A[name]``/``lora_B[name]`` are this rank's slices (of the adapter
    zero-padded to ``shard.padded_rank``); ``lora_rank[name]`` is its real rank ``r``.
    """

    def __init__(self, kind: str, in_features: int, out_features: int, base, bias, registry,
                 group, world: int, rank: int) -> None:
        local_out, local_in = base.shape
        super().__init__(local_in, local_out, base, bias, registry)
        self.in_features, self.out_features = in_features, out_features
        self.local_in, self.local_out = local_in, local_out
        self.kind, self.tp_world, self.tp_rank = kind, world, rank
        self.__dict__["tp_group"] = group  # a ProcessGroup (or None: the default group)
        self.lora_rank: dict[str, int] = {}

    @classmethod
    def from_layer(cls, layer: LoRALinear, kind: str, group, world: int,
                   rank: int) -> ShardedLoRALinear:
        """Shard ``layer`` (dense or quantized base, with its adapters) for this rank."""
        base = shard.shard_base(layer.base, kind, world, rank)
        bias = shard.shard_bias(layer.bias, kind, world, rank)
        if bias is not None:
            bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
        new = cls(kind, layer.in_features, layer.out_features, base, bias, layer.registry,
                  group, world, rank)
        for name in layer.adapter_names:
            a, b = layer.lora_A[name], layer.lora_B[name]
            new.add_adapter_shard(name, a.shape[0], layer.lora_alpha[name],
                                  layer.use_rslora[name], *new.shard_adapter(a, b),
                                  requires_grad=a.requires_grad)
        new.active_adapter, new.disabled = layer.active_adapter, layer.disabled
        return new

    # ------------------------------------------------------------------ adapters
    def adapter_index(self, r: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
        """This rank's ``(A index, B index)`` of a rank-``r`` adapter padded to
        ``shard.padded_rank`` (so r need not divide by the group size)."""
        return shard.adapter_slices(self.kind, shard.padded_rank(self.kind, r, self.tp_world),
                                    self.out_features, self.in_features, self.tp_world,
                                    self.tp_rank)

    def shard_adapter(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor,
                                                                       torch.Tensor]:
        """This rank's ``(A_p, B_p)`` of a full ``A [r, K]``, ``B [N, r]`` (padded first)."""
        r = a.shape[0]
        a, b = shard.pad_adapter(a.detach(), b.detach(),
                                 shard.padded_rank(self.kind, r, self.tp_world))
        a_idx, b_idx = self.adapter_index(r)
        return a[a_idx].contiguous(), b[b_idx].contiguous()

    def scaling(self, name: str) -> float:
        r = self.lora_rank[name]
        return self.lora_alpha[name] / (math.sqrt(r) if self.use_rslora[name] else r)

    def add_adapter(self, name: str, r: int, lora_alpha: float | None = None,
                    use_rslora: bool = False, init_lora_weights: bool = True,
                    lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> None:
        """``LoRALinear.add_adapter`` with FULL ``A [r, K]``/``B [N, r]``; keeps this
        rank's slice. Fresh weights are drawn on group rank 0 and broadcast, so every rank
        slices the same adapter."""
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        full = _full_adapter(self.in_features, self.out_features, name, r, lora_alpha,
                             init_lora_weights, lora_a, lora_b,
                             dtype or self._adapter_dtype(), self._device())
        if lora_a is None or lora_b is None:
            self._broadcast(full)
        self.add_adapter_shard(name, r, lora_alpha, use_rslora, *self.shard_adapter(*full))

    def add_adapter_shard(self, name: str, r: int, lora_alpha: float | None,
                          use_rslora: bool, a: torch.Tensor, b: torch.Tensor,
                          requires_grad: bool = True) -> None:
        """Add adapter ``name`` (full rank ``r``) from this rank's slices ``a``, ``b``."""
        if not isinstance(name, str) or not name or name == BASE_ADAPTER or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without '.', not "
                             f"{BASE_ADAPTER!r}; got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        a_idx, b_idx = self.adapter_index(r)
        check_shape(a, "lora_a (this rank's slice)", "r, in_features",
                    tuple(s.stop - s.start for s in a_idx))
        check_shape(b, "lora_b (this rank's slice)", "out_features, r",
                    tuple(s.stop - s.start for s in b_idx))
        dtype, device = self._adapter_dtype(), self._device()  # as LoRALinear.add_adapter
        self.lora_A[name] = nn.Parameter(a.detach().to(device, dtype, copy=True),
                                         requires_grad=requires_grad)
        self.lora_B[name] = nn.Parameter(b.detach().to(device, dtype, copy=True),
                                         requires_grad=requires_grad)
        self.lora_alpha[name] = float(r if lora_alpha is None else lora_alpha)
        self.use_rslora[name] = bool(use_rslora)
        self.lora_rank[name] = r
        self.registry.register(name)
        if self.active_adapter is None:
            self.active_adapter = name
        self._stack_cache = None

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        del self.lora_rank[name]

    def _adapter_dtype(self) -> torch.dtype:
        return torch.float32 if self.is_quantized else self.weight.dtype

    def _device(self) -> torch.device:
        return self.qweight.device if self.is_quantized else self.weight.device

    def _broadcast(self, tensors) -> None:
        if self.tp_world > 1:
            src = dist.get_global_rank(self.tp_group, 0) if self.tp_group is not None else 0
            for t in tensors:
                dist.broadcast(t, src=src, group=self.tp_group)

    def adapter_stack(self, dtype, device):
        raise NotImplementedError("a tensor-parallel layer packs its adapter slices per "
                                  "forward (forward_adapters); it has no AdapterStack")

    def merge(self, *args, **kwargs) -> None:
        raise NotImplementedError("merging an adapter into a tensor-parallel layer is not "
                                  "supported; merge before lorart.distributed.tensor_parallel")

    unmerge = merge

    def to_original(self) -> nn.Module:
        raise ValueError("a tensor-parallel layer holds a slice of the weight; it cannot be "
                         "turned back into the original module")

    # ------------------------------------------------------------------ forward
    def _plan(self, x: torch.Tensor, adapter_ids):
        """``(names, ids)``: the adapters the rows may use, in order, and per-row indices
        into them (``[M]`` int, -1 = base; ``None`` = every row uses ``names[0]``)."""
        if self.disabled or not self.lora_A:
            return [], None
        if adapter_ids is not None and not isinstance(adapter_ids, Route):
            adapter_ids = Route.from_ids(self.registry, adapter_ids)
        route = adapter_ids if adapter_ids is not None else routing.current(self.registry)
        if route is not None:
            pa = self.lora_A._parameters
            present = tuple(i for i, n in enumerate(self.registry.names) if n in pa)
            m = x.numel() // x.shape[-1] if x.shape[-1] else 0
            batch = route.batch_for(m, present, x.device)
            if batch is None:
                return [], None
            return [self.registry.names[i] for i in present], batch.ids
        name = self.active_adapter
        if name is None or name not in self.lora_A:
            return [], None
        return [name], None

    def forward(self, x: torch.Tensor,
                adapter_ids: torch.Tensor | Sequence[int] | AdapterBatch | None = None,
                ) -> torch.Tensor:
        """``y [..., out]`` for ``x [..., in]``: column layers take the full ``x`` and give
        this rank's output columns; row layers take this rank's input columns and give the
        full, summed output (see module doc)."""
        names, ids = self._plan(x, adapter_ids)
        adapters = [(self.lora_A[n], self.lora_B[n], self.scaling(n), self.lora_rank[n])
                    for n in names]
        return self.forward_adapters(x, adapters, ids)

    def forward_adapters(self, x: torch.Tensor, adapters: list, ids: torch.Tensor | None,
                         ) -> torch.Tensor:
        """The layer with explicit adapters ``[(A_p, B_p, scale, full rank), ...]`` (this
        rank's slices) and per-row indices ``ids [M]`` into them (-1: base; ``None``: all
        rows use ``adapters[0]``). The serving runner calls this with its resident slots."""
        base, bias = self._dense_base(x), self._bias(x)
        group, world = self.tp_group, self.tp_world
        if self.kind == shard.COLUMN:
            x = copy_to_group(x, group, world)
            y = lora_linear(x, base, None, None, bias=bias)
            if adapters:
                rows = _RowColumns(adapters, ids, x.device)
                u = rows.pack(_shrink(x, adapters, ids))                    # [M, w]
                u = gather_last_dim(u, group, world, self.tp_rank)          # [M, P·w]
                u = rows.unpack(u, world)                                   # [M, P·C]
                y = y + (u @ _column_b(adapters, world).to(u.dtype).T).view_as(y)
            return y
        y = lora_linear(x, base, None, None)                                # partial [.., N]
        if adapters:
            rows = _RowColumns(adapters, ids, x.device)
            v = all_reduce_sum(rows.pack(_shrink(x, adapters, ids)), group, world)
            v = rows.unpack(v, 1)                                           # [M, R]
            b = torch.cat([b for _, b, _, _ in adapters], 1).to(v.dtype)    # [N/P, R]
            lo, hi = shard.bounds(self.out_features, world, self.tp_rank)
            z = F.pad(v @ b.T, (lo, self.out_features - hi))                # [M, N], 0 off p
            y = y + z.view_as(y)
        y = reduce_from_group(y, group, world)
        return y if bias is None else y + bias

    def extra_repr(self) -> str:
        return (f"{self.kind}-parallel {self.tp_rank}/{self.tp_world}, " + super().extra_repr()
                + f", local=[{self.local_out}, {self.local_in}]")


def _shrink(x: torch.Tensor, adapters: list, ids: torch.Tensor | None) -> torch.Tensor:
    """``[M, C]`` (C: the A slices' rows, summed): ``scale_s · x_i A_sᵀ`` in adapter s's
    columns for the rows using s, zero in every other adapter's columns (so the expand adds
    only a row's own adapter).
    Scaling here, before any collective, keeps the expand one plain matmul."""
    x2 = x.reshape(-1, x.shape[-1])
    a = torch.cat([a for a, *_ in adapters], 0).to(x2.dtype)                # [C, K]
    u = x2 @ a.T                                                             # [M, C]
    widths = torch.tensor([a.shape[0] for a, *_ in adapters], device=x.device)
    col_adapter = torch.repeat_interleave(torch.arange(len(adapters), device=x.device), widths)
    scales = torch.tensor([s for _, _, s, _ in adapters], dtype=u.dtype, device=x.device)
    if ids is None:
        weight = scales[col_adapter].expand(u.shape[0], -1)
    else:
        own = ids.to(x.device, torch.int64)[:, None] == col_adapter[None, :]   # [M, C]
        weight = own.to(u.dtype) * scales[col_adapter]
    return u * weight


class _RowColumns:
    """Each row's own adapter columns, packed for the collective and put back after.

    ``_shrink`` gives ``[M, C]`` with a column for every adapter of the layer, zero outside
    a row's own adapter. Sending that would cost C values a row; ``pack`` keeps only row i's
    own ``w_{a(i)}`` columns, left-aligned in ``[M, w]`` (``w``: the widest adapter; base rows
    are all zero), so a collective carries ``w`` values a row — the rank, not the sum of
    ranks. ``unpack`` scatters ``copies`` such blocks (one per rank, after an all-gather)
    back to ``[M, copies·C]``. With one adapter (or all rows on one) nothing moves.
    """

    def __init__(self, adapters: list, ids: torch.Tensor | None, device) -> None:
        widths = [a.shape[0] for a, *_ in adapters]
        self.total = sum(widths)
        self.index = None
        if ids is None or len(adapters) == 1:
            return
        w = torch.tensor(widths, device=device)
        offsets = torch.cumsum(w, 0) - w
        own = ids.to(device, torch.int64)
        base = own < 0
        own = own.clamp(min=0)
        row_width = torch.where(base, 0, w[own])                            # [M]
        j = torch.arange(max(widths), device=device)                        # [w]
        self.valid = j[None, :] < row_width[:, None]                        # [M, w]
        self.index = torch.where(self.valid, offsets[own][:, None] + j[None, :], self.total)

    def pack(self, u: torch.Tensor) -> torch.Tensor:
        if self.index is None:
            return u
        padded = torch.cat([u, u.new_zeros(u.shape[0], 1)], 1)              # column C: zero
        return padded.gather(1, self.index)

    def unpack(self, packed: torch.Tensor, copies: int) -> torch.Tensor:
        if self.index is None:
            return packed
        m, dump = packed.shape[0], copies * self.total
        index = torch.cat([torch.where(self.valid, self.index + q * self.total, dump)
                           for q in range(copies)], 1)                      # [M, copies·w]
        out = packed.new_zeros(m, dump + 1).scatter(1, index, packed)
        return out[:, :dump]


def _column_b(adapters: list, world: int) -> torch.Tensor:
    """B columns ``[N/P, P·C]`` in the order of the all-gathered ``u``: rank q's chunk of
    every adapter, rank by rank (q, adapter, j) — so the expand is one matmul."""
    parts = []
    for q in range(world):
        for a, b, _, _ in adapters:
            c = a.shape[0]
            parts.append(b[:, q * c:(q + 1) * c])
    return torch.cat(parts, 1)


def _full_adapter(in_features: int, out_features: int, name, r, lora_alpha,
                  init_lora_weights, lora_a, lora_b, dtype,
                  device) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-size ``(A, B)`` as ``LoRALinear.add_adapter`` makes them (same checks, same
    init), built by a throwaway layer whose base is a stride-0 view (no memory)."""
    base = torch.zeros((), dtype=dtype).expand(out_features, in_features)
    layer = LoRALinear(in_features, out_features, base)
    layer.add_adapter(name, r, lora_alpha, False, init_lora_weights, lora_a, lora_b, dtype)
    a, b = layer.lora_A[name].detach(), layer.lora_B[name].detach()
    return a.to(device), b.to(device)
