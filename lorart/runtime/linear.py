"""``DecodeLinear``: one or more linear layers bound once to lorart's fused CPU kernel.

A decode step calls ~200 small linear layers; through the op surface each call
re-validates its arguments and re-derives the kernel arguments (~16 us of Python for a
25 us 576x576 4-bit GEMV, measured 2026-12-02 on the shared 2-core machine). Here
everything the kernel needs is derived once, when the runner is built:

    y [M, N] = x [M, K] Wᵀ + bias + (x Aᵀ) Bᵀ            (the adapter's scale folded into B)

Several layers reading the same input (q/k/v, gate/up) are concatenated along N into
one base (rows of packed codes and scales move as they are, so it stays exact) and one
adapter pair: ``A = [A_q; A_k; A_v]`` ``[R, K]``, ``B`` block-diagonal ``[N, R]``, each
block ``scale_i · B_i``. One kernel launch then serves the group.

On CPU the call goes straight to ``lorart._C.cpu_forward`` with the cached pointers;
elsewhere (GPU), and for bases that kernel does not take (the 8-bit layout), it goes
through the op surface (``lora_linear``), so the runner works wherever the op surface does.

Memory: the concatenated packed base is not a second copy. Its layers are given views
of it in place of their own buffers (same values, so nothing they compute changes), and
a group whose layers already are adjacent views of one storage is concatenated as a view:
the decoder, the serving runner and a rebuilt decoder all share the layers' one copy
(SmolLM2: 43 MB of q/k/v + gate/up held once). Groups that need ``relayout`` (mixed GGUF
K-quant layouts) and dense groups keep a concatenated copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..layers import LoRALinear, tensor_version
from ..ops import lora_linear
from ..packed import KeepsPackedLayout
from ..quant import QuantizedWeight

# Schemes of lorart._C.cpu_forward (4-bit); others (the 8-bit layout) take the op surface.
_FUSED_4BIT = ("asym", "sym", "nf4")


def _base_of(module: nn.Module) -> torch.Tensor | QuantizedWeight:
    """The base weight ``[N, K]`` of a ``LoRALinear`` or an ``nn.Linear``."""
    if isinstance(module, nn.Linear):
        return module.weight.detach()
    base = getattr(module, "base", None)  # LoRALinear, QuantizedLinear, TiedQuantizedLinear
    if isinstance(base, torch.Tensor | QuantizedWeight):
        return base
    raise TypeError(f"expected a LoRALinear, nn.Linear or quantized linear module, got "
                    f"{type(module).__name__}")


def _concat_bases(bases: Sequence[torch.Tensor | QuantizedWeight]
                  ) -> torch.Tensor | QuantizedWeight:
    """One base ``[sum N, K]`` for a group of layers sharing their input. Quantized bases
    in different layouts (GGUF K-quant files mix them: Q4_K_M's q/k are Q4_K, v is Q6_K)
    are first brought exactly to one layout that holds them all (``relayout``)."""
    if len(bases) == 1:
        return bases[0]
    if all(isinstance(b, QuantizedWeight) for b in bases):
        bases = common_layout(bases)
        first = bases[0]
        parts = [[b.qweight for b in bases], [b.scales for b in bases]]
        if first.offsets is not None:
            parts.append([b.offsets for b in bases])
        whole = [_rows_view(p) for p in parts]
        if any(w is None for w in whole):
            whole = [torch.cat(p) for p in parts]
        return QuantizedWeight(whole[0], whole[1], whole[2] if len(whole) == 3 else None,
                               first.group_size, first.scheme)
    if all(isinstance(b, torch.Tensor) for b in bases):
        return torch.cat(list(bases))
    raise ValueError("cannot concatenate dense and quantized bases; bind the layers separately")


def _rows_view(parts: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``torch.cat(parts)`` as a view, when ``parts`` are contiguous row blocks lying one
    after another in one storage (layers that already share a group's base); else None."""
    first = parts[0]
    offset = first.storage_offset()
    for p in parts:
        if (not p.is_contiguous() or p.dtype != first.dtype or p.shape[1:] != first.shape[1:]
                or p.device != first.device or p.storage_offset() != offset
                or p.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
        offset += p.numel()
    shape = (sum(p.shape[0] for p in parts), *first.shape[1:])
    return first.as_strided(shape, first.stride(), first.storage_offset())


def _share_base(modules: Sequence[nn.Module], whole: QuantizedWeight) -> None:
    """Give each packed layer of a group views of the group's concatenated base ``whole``
    in place of its own buffers (values equal), so the packed codes are held once. Only
    when every layer holds exactly its rows of ``whole`` in the same layout."""
    if len(modules) < 2 or not all(isinstance(m, KeepsPackedLayout)
                                   and isinstance(getattr(m, "qweight", None), torch.Tensor)
                                   for m in modules):
        return
    row = 0
    views = []
    for m in modules:
        n = m.qweight.shape[0]
        mine = [whole.qweight[row:row + n], whole.scales[row:row + n],
                None if whole.offsets is None else whole.offsets[row:row + n]]
        if (m.group_size != whole.group_size or m.scheme != whole.scheme
                or (m.offsets is None) != (whole.offsets is None)
                or any(t is not None and (t.dtype != o.dtype or t.shape != o.shape)
                       for t, o in zip(mine, (m.qweight, m.scales, m.offsets)))):
            return
        views.append(mine)
        row += n
    for m, (q, sc, off) in zip(modules, views):
        if m.qweight.data_ptr() != q.data_ptr():  # not yet a view of it
            m.share_packed(q, sc, off)


def common_layout(bases: Sequence[QuantizedWeight]) -> list[QuantizedWeight]:
    """``bases`` in one packed layout, each exactly equal to its original: their own
    scheme if they share it (else ``int8``), the smallest group, float32 scales if any has
    them, offsets if any has them. ``ValueError`` when no exact common layout exists
    (NF4 beside another scheme)."""
    schemes = {b.scheme for b in bases}
    scheme = schemes.pop() if len(schemes) == 1 else "int8"
    group = min(b.group_size for b in bases)
    if scheme != "int8":
        group = max(group, 32)  # 4-bit groups start at 32 (all are, so min is >= 32)
    scale_dtype = (torch.float32 if any(b.scales.dtype == torch.float32 for b in bases)
                   else torch.float16)
    offsets = any(b.offsets is not None for b in bases)
    return [b.relayout(scheme, group, scale_dtype, offsets) for b in bases]


def _adapter_pair(modules: Sequence[nn.Module], adapter: str | None, dtype, device
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A [R, K], B [N_total, R])`` of ``adapter`` over the group, scales folded into B."""
    if adapter is None:
        return None
    parts = []
    for m in modules:
        if isinstance(m, LoRALinear) and adapter in m.lora_A and adapter not in m.merged:
            parts.append((m.lora_A[adapter].detach(), m.lora_B[adapter].detach(),
                          m.scaling(adapter)))
        else:
            parts.append(None)
    return _pair_of_parts(modules, parts, dtype, device)


def _pair_of_parts(modules: Sequence[nn.Module], parts: Sequence[tuple | None], dtype, device
                   ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(A [R, K], B [N_total, R])`` from one ``(A [r, K], B [N, r], scale)`` or None per
    layer of the group: A stacked, B block-diagonal with each block's scale folded in."""
    if all(p is None for p in parts):
        return None
    k = parts[next(i for i, p in enumerate(parts) if p is not None)][0].shape[1]
    rank = sum(p[0].shape[0] for p in parts if p is not None)
    n_total = sum(m.out_features for m in modules)
    a = torch.zeros(rank, k, dtype=dtype, device=device)
    b = torch.zeros(n_total, rank, dtype=dtype, device=device)
    row = col = 0
    for m, p in zip(modules, parts):
        if p is not None:
            a_i, b_i, scale = p
            r = a_i.shape[0]
            a[col:col + r] = a_i.to(dtype)
            b[row:row + m.out_features, col:col + r] = b_i.to(torch.float32).mul(scale).to(dtype)
            col += r
        row += m.out_features
    return a, b


class DecodeLinear:
    """``y = x Wᵀ + bias + (x Aᵀ) Bᵀ`` for a group of layers sharing their input.

    Args:
        modules: ``LoRALinear`` / ``nn.Linear`` layers with the same ``in_features``;
            their outputs are concatenated in this order (``split`` gives the sizes).
        dtype: activation dtype (float32 for the GGUF models).

    The base is bound once; :meth:`bind` gives the callable for one adapter (cached per
    adapter name, immutable, so concurrent calls with different adapters can share it).
    """

    def __init__(self, modules: Sequence[nn.Module], dtype: torch.dtype = torch.float32) -> None:
        modules = list(modules)
        in_f = {m.in_features for m in modules}
        if len(in_f) != 1:
            raise ValueError(f"layers of one group must share in_features, got {sorted(in_f)}")
        for m in modules:
            if isinstance(m, LoRALinear) and m.fan_in_fan_out:
                raise ValueError("Conv1D-based layers are not supported by the decode runner")
        self.modules = modules
        self.in_features = in_f.pop()
        self.split = [m.out_features for m in modules]
        self.out_features = sum(self.split)
        bases = []
        for m in modules:
            base = _base_of(m)
            if isinstance(base, torch.Tensor) and base.dtype != dtype:
                base = base.to(dtype)
            bases.append(base)
        # Normal tensors even when built under inference_mode (generate usually is): the
        # layers hold views of this base afterwards, and must stay usable for training.
        with torch.inference_mode(False), torch.no_grad():
            self.base = _concat_bases(bases)
            if isinstance(self.base, QuantizedWeight):
                _share_base(modules, self.base)
        self.device = (self.base.device if isinstance(self.base, torch.Tensor)
                       else self.base.qweight.device)
        self.dtype = dtype
        biases = [getattr(m, "bias", None) for m in modules]
        self.bias = None if all(b is None for b in biases) else torch.cat(
            [torch.zeros(n, dtype=dtype, device=self.device) if b is None
             else b.detach().to(dtype) for b, n in zip(biases, self.split)])
        self._bound: dict[str | None, BoundLinear] = {}
        self._bound_parts: tuple[object, BoundLinear] | None = None

    def _adapter_key(self, adapter: str | None) -> tuple:
        """Identity and version of the adapter's parameters: a new key means rebind."""
        key = [adapter]
        for m in self.modules:
            if isinstance(m, LoRALinear) and adapter in m.lora_A:
                a, b = m.lora_A[adapter], m.lora_B[adapter]
                if a.is_inference() or b.is_inference():  # no version counter: rebind
                    key.append(object())
                key += [id(a), tensor_version(a), id(b), tensor_version(b), m.scaling(adapter),
                        adapter in m.merged]
        return tuple(key)

    def bind(self, adapter: str | None) -> BoundLinear:
        """The layer group with ``adapter`` fused in (``None``: base only)."""
        key = self._adapter_key(adapter)
        bound = self._bound.get(adapter)
        if bound is None or bound.key != key:
            pair = _adapter_pair(self.modules, adapter, self.dtype, self.device)
            if pair is None and adapter is not None:
                bound = BoundLinear(self, None, None)  # the adapter skips this group
            else:
                bound = BoundLinear(self, *(pair if pair is not None else (None, None)))
            bound.key = key
            self._bound[adapter] = bound
        return bound

    def bind_parts(self, key: object, parts: Sequence[tuple | None]) -> BoundLinear:
        """The layer group with an adapter given as tensors: one ``(A [r, K], B [N, r],
        scale)`` or None per layer (the serving engine's ``AdapterWeights``). One binding
        is kept, for the last ``key`` (the object those tensors belong to)."""
        cached = self._bound_parts
        if cached is not None and cached[0] is key:
            return cached[1]
        if len(parts) != len(self.modules):
            raise ValueError(f"parts must have one entry per layer ({len(self.modules)}), "
                             f"got {len(parts)}")
        pair = _pair_of_parts(self.modules, parts, self.dtype, self.device)
        bound = BoundLinear(self, *(pair if pair is not None else (None, None)))
        self._bound_parts = (key, bound)
        return bound


class BoundLinear:
    """One ``DecodeLinear`` with one adapter (or none); call it on ``x [M, K]``."""

    def __init__(self, group: DecodeLinear, lora_a: torch.Tensor | None,
                 lora_b: torch.Tensor | None) -> None:
        self.base, self.bias, self.dtype = group.base, group.bias, group.dtype
        self.in_features, self.out_features = group.in_features, group.out_features
        self.device = group.device
        self.lora_a, self.lora_b = lora_a, lora_b
        self.key: tuple = ()
        # The C++ kernel's view of the base (None: off CPU, or no C++ kernel takes it).
        self.kernel_args = self._kernel_args() if self.device.type == "cpu" else None
        self._cpu_args = self._bind_cpu()

    def _kernel_args(self) -> dict | None:
        try:
            from ..backend import cpu as cpu_backend
        except ImportError:  # no compiled backend
            return None
        base = self.base
        if isinstance(base, QuantizedWeight) and base.scheme not in (*_FUSED_4BIT, "int8"):
            return None
        return cpu_backend.kernel_weight_args(base, self.dtype)

    def _adapter_args(self) -> dict:
        """The adapter's keyword arguments of the C++ kernels (scale folded into B)."""
        from ..backend.base import buffer

        rank = 0 if self.lora_b is None else self.lora_b.shape[1]
        return dict(a=buffer(self.lora_a), b=buffer(self.lora_b), total_rank=rank,
                    rank_offsets=[0, rank] if rank else [0], lora_scales=[1.0] if rank else [])

    def _bind_cpu(self) -> tuple | None:
        """``(cpu_forward, fixed keyword arguments)`` for the eager 4-bit/dense call
        (None: the op surface serves the call, e.g. the 8-bit layout)."""
        args = self.kernel_args
        if args is None or args["int8"]:
            return None
        from .._C import cpu_forward
        from ..backend import cpu as cpu_backend

        weight = {k: v for k, v in args.items() if k != "int8"}
        fixed = dict(dtype=cpu_backend.dtype_code(self.dtype), ldx=self.in_features, **weight,
                     **self._adapter_args(), adapter_ids=(0, 0), ldy=self.out_features,
                     decode_max_rows=cpu_backend.DECODE_MAX_ROWS)
        return cpu_forward, fixed

    def add_to_plan(self, plan, keep: list) -> int | None:
        """Register this group in a ``lorart._C.DecodePlan``; its index there, or None when
        the plan's kernels cannot run it (the caller then keeps the Python step). Every
        tensor the plan points into is appended to ``keep``, which must live as long as
        the plan (sessions on other threads may rebuild this object's caches meanwhile)."""
        from ..backend.base import buffer

        args = self.kernel_args
        if args is None or self.dtype != torch.float32:
            return None
        weight = {k: v for k, v in args.items() if k != "int8"}
        if args["int8"]:
            index = plan.add_int8_linear(**weight, bias=buffer(self.bias))
        else:
            index = plan.add_linear(**weight, bias=buffer(self.bias), a=(0, 0), b=(0, 0),
                                    total_rank=0, rank_offsets=[0], lora_scales=[])
        keep.append(self)  # holds base, bias (and the kernel arguments' tensors)
        if self.lora_b is not None:
            a, bt, lo, hi = self._plan_lora()
            keep += [a, bt]
            plan.set_lora(index=index, a=buffer(a), bt=buffer(bt), rank=bt.shape[0], lo=lo,
                          hi=hi)
        return index

    def _plan_lora(self) -> tuple:
        """``(A [R, K], Bᵀ [R, N], lo, hi)`` float32 for ``DecodePlan.set_lora``: each rank's
        nonzero columns ``[lo_r, hi_r)`` (q/k/v's B is block-diagonal). Built once."""
        cached = self.__dict__.get("_plan_lora_args")
        if cached is None:
            bt = self.lora_b.t().to(torch.float32).contiguous()
            a = self.lora_a.to(torch.float32).contiguous()
            nonzero = bt != 0
            cols = torch.arange(self.out_features)
            lo = torch.where(nonzero, cols, self.out_features).amin(1)
            hi = torch.where(nonzero, cols + 1, 0).amax(1)
            lo = torch.minimum(lo, hi)  # an all-zero column: the empty range [hi, hi)
            cached = self._plan_lora_args = (a, bt, lo.tolist(), hi.tolist())
        return cached

    def __call__(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``y [M, N]`` for ``x [M, K]``; ``residual [M, N]``, when given, is added."""
        if self._cpu_args is None or x.dtype != self.dtype or x.device != self.device:
            y = lora_linear(x, self.base, self.lora_a, self.lora_b, 1.0, self.bias)
            return y if residual is None else y.add_(residual)
        cpu_forward, fixed = self._cpu_args
        x = x.contiguous()
        m, n = x.shape[0], self.out_features
        bias = self.bias
        if residual is not None and m == 1 and bias is None and residual.is_contiguous():
            bias, residual = residual, None  # one row: the residual is a bias vector
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
        cpu_forward(m=m, x=(x.data_ptr(), x.numel()),
                    bias=(0, 0) if bias is None else (bias.data_ptr(), n),
                    y=(y.data_ptr(), m * n), **fixed)
        return y if residual is None else y.add_(residual)
