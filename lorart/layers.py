"""``LoRALinear``: a drop-in ``nn.Linear`` (or GPT-2 ``Conv1D``) with many named adapters.

One layer holds a base weight ``W [N, K]`` (dense, or a 4-bit ``QuantizedWeight``),
the original bias, and any number of adapters ``name -> (A [r, K], B [N, r], scale)``
with PEFT's shapes and init. A forward is always ONE op-surface call:

    no adapter / disabled      lora_linear(x, W, None, None, bias=bias)
    one active adapter         lora_linear(x, W, A, B, scale, bias)
    per-row adapters           multi_lora_linear(x, W, stack, adapter_batch, bias)

``stack`` is an ``AdapterStack`` packing every adapter of the layer (ragged ranks).
It is cached and rebuilt only when adapters change (added, removed, or written in
place: the cache key holds each parameter's version counter). When A/B need grads
the stack is rebuilt with ``torch.cat`` on every forward, so gradients reach each
adapter's own parameters.

Adapter *indices* are shared by every layer of a model through an
``AdapterRegistry`` (name -> global index), so one id vector serves all layers even
when adapters target different modules. Which ids a forward uses travels with the call
(``lorart.routing``: a ContextVar route, or ``adapter_ids=`` given to ``forward``); the
route maps global ids to a layer's own stack once per forward, shared by its layers.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from . import routing
from .adapters import AdapterBatch, AdapterStack
from .ops import check_shape, lora_linear, multi_lora_linear
from .packed import KeepsPackedLayout
from .quant import QuantizedWeight, quantize
from .routing import BASE_ADAPTER, Route


class AdapterRegistry:
    """Adapter names of one model in a fixed order: ``name -> global index``."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def register(self, name: str) -> int:
        if name not in self.names:
            self.names.append(name)
        return self.names.index(name)

    def index(self, name: str) -> int:
        """Global index of ``name``; ``-1`` for ``"__base__"``/``None``."""
        if name is None or name == BASE_ADAPTER:
            return -1
        if name not in self.names:
            raise ValueError(f"adapter_names: unknown adapter {name!r}; loaded adapters are "
                             f"{self.names} (use {BASE_ADAPTER!r} for no adapter)")
        return self.names.index(name)


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (weight ``[in, out]``), detected without importing transformers."""
    return (type(module).__name__ == "Conv1D" and hasattr(module, "nf")
            and isinstance(getattr(module, "weight", None), torch.Tensor))


def is_linear_like(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Linear`` or a GPT-2 ``Conv1D`` that can be patched."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


class BaseLinear(nn.Linear):
    """An ``nn.Linear`` (no adapters) whose inference forward runs lorart's kernels.

    For dense layers lorart leaves outside LoRA, like a model's tied output layer: at
    decode, lorart's fp32 kernel ran SmolLM2's 49152x576 output layer in 5.95 ms vs 11.7 ms
    for torch at 16 rows (2-core AVX-512, 2026-11-29). With gradients needed it is a plain
    ``nn.Linear`` (torch's own backward), so training keeps torch's GEMMs. The weight and
    bias are the wrapped layer's own Parameters (a tied weight stays tied).
    """

    @classmethod
    def wrap(cls, linear: nn.Linear) -> BaseLinear:
        """A ``BaseLinear`` sharing ``linear``'s weight ``[N, K]`` and bias ``[N]``."""
        with torch.device("meta"):
            new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y [..., N] = x [..., K] Wᵀ + bias``."""
        if torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad):
            return super().forward(x)
        weight, bias = self.weight, self.bias
        if weight.dtype != x.dtype:
            return super().forward(x)
        return lora_linear(x, weight, None, None, bias=bias)


def tensor_version(t: torch.Tensor) -> int:
    """``t._version`` (moves on every in-place write), or -1 for an inference tensor (made
    under ``torch.inference_mode``, e.g. a model loaded there), which has no counter.
    Caches keyed on it must not trust -1: the adapter caches rebuild for such tensors;
    a decoder's base signature accepts it (frozen base weights; only its copied dense or
    relaid-out groups could miss an in-place write made under inference mode)."""
    return -1 if t.is_inference() else t._version


class LoRALinear(KeepsPackedLayout):
    """A linear layer ``y = x Wᵀ + bias`` plus named LoRA adapters (see module doc).

    Build it with :meth:`from_linear`. ``weight`` (dense base, ``[N, K]``) is the
    original module's parameter (shared storage, a transposed view for ``Conv1D``);
    a quantized base lives in buffers ``qweight``/``scales``/``offsets``.
    Adapter parameters: ``lora_A[name] [r, K]``, ``lora_B[name] [N, r]``.
    """

    fan_in_fan_out = False  # True when wrapping a Conv1D (its weight is [in, out])

    def __init__(self, in_features: int, out_features: int,
                 base: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None,
                 registry: AdapterRegistry | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        if tuple(base.shape) != (out_features, in_features):
            raise ValueError(f"base must have shape [out_features, in_features]="
                             f"[{out_features}, {in_features}], got {list(base.shape)}")
        self.weight: nn.Parameter | None = None
        self._set_base(base)
        if bias is not None and not isinstance(bias, nn.Parameter):
            bias = nn.Parameter(bias, requires_grad=False)
        self.bias = bias
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        self.lora_alpha: dict[str, float] = {}
        self.use_rslora: dict[str, bool] = {}
        self.active_adapter: str | None = None
        self.disabled = False
        self.merged: list[str] = []
        self.__dict__["registry"] = registry or AdapterRegistry()  # shared, not a submodule
        self.__dict__["original"] = None  # the module this replaced (for unpatch)
        self._stack_cache: tuple | None = None
        self._qw_cache: QuantizedWeight | None = None

    # ------------------------------------------------------------------ building
    @classmethod
    def from_linear(cls, module: nn.Module, quantize_scheme: str | None = None,
                    group_size: int = 128, registry: AdapterRegistry | None = None,
                    scale_dtype: torch.dtype = torch.float16) -> LoRALinear:
        """Wrap an ``nn.Linear`` or ``Conv1D``; ``quantize_scheme`` in (None, "asym",
        "sym", "nf4", "int8") quantizes its weight (``scale_dtype`` scales) and frees the
        float copy."""
        if not is_linear_like(module):
            raise TypeError(f"module must be nn.Linear or transformers Conv1D, got "
                            f"{type(module).__name__}")
        conv = _is_conv1d(module)
        w = module.weight
        if conv:  # Conv1D stores [in, out]; a transposed view shares its storage
            base = nn.Parameter(w.detach().t(), requires_grad=w.requires_grad)
            in_f, out_f = w.shape
        else:
            base, (out_f, in_f) = w, w.shape
        if quantize_scheme is not None:
            if in_f % group_size != 0:
                raise ValueError(f"cannot quantize a layer with in_features={in_f}: not "
                                 f"divisible by group_size={group_size}")
            base = quantize(w.detach().t() if conv else w.detach(), group_size,
                            quantize_scheme, scale_dtype)
        layer = cls(in_f, out_f, base, module.bias, registry)
        layer.__dict__["original"] = module
        layer.fan_in_fan_out = conv
        if quantize_scheme is not None:  # free the float weight the original held
            module.weight = nn.Parameter(torch.empty(0, dtype=w.dtype), requires_grad=False)
        return layer

    def _set_base(self, base: torch.Tensor | QuantizedWeight) -> None:
        if isinstance(base, QuantizedWeight):
            self.weight = None
            self.register_buffer("qweight", base.qweight)
            self.register_buffer("scales", base.scales)
            self.register_buffer("offsets", base.offsets)
            self.group_size, self.scheme = base.group_size, base.scheme
            self._qw_cache = base
        elif isinstance(base, torch.Tensor):
            if not isinstance(base, nn.Parameter):
                base = nn.Parameter(base, requires_grad=False)
            for name in ("qweight", "scales", "offsets"):
                self._buffers.pop(name, None)
            self.weight = base
            self._qw_cache = None
        else:
            raise TypeError(f"base must be a tensor or QuantizedWeight, got {type(base).__name__}")

    @property
    def is_quantized(self) -> bool:
        return self.weight is None

    def _packed_changed(self) -> None:
        self._qw_cache = None  # held the old buffers (rebuilt by .base)

    @property
    def base(self) -> torch.Tensor | QuantizedWeight:
        """The base weight: dense ``[N, K]`` or a ``QuantizedWeight`` (rebuilt after .to())."""
        if not self.is_quantized:
            return self.weight
        qw = self._qw_cache
        if (qw is None or qw.qweight is not self.qweight or qw.scales is not self.scales
                or qw.offsets is not self.offsets):
            qw = QuantizedWeight(self.qweight, self.scales, self.offsets, self.group_size,
                                 self.scheme)
            self._qw_cache = qw
        return qw

    # ------------------------------------------------------------------ adapters
    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora_A.keys())

    def scaling(self, name: str) -> float:
        r = self.lora_A[name].shape[0]
        denom = math.sqrt(r) if self.use_rslora[name] else r
        return self.lora_alpha[name] / denom

    def add_adapter(self, name: str, r: int, lora_alpha: float | None = None,
                    use_rslora: bool = False, init_lora_weights: bool = True,
                    lora_a: torch.Tensor | None = None, lora_b: torch.Tensor | None = None,
                    dtype: torch.dtype | None = None) -> None:
        """Add adapter ``name`` of rank ``r`` (``A [r, K]``, ``B [N, r]``).

        ``init_lora_weights=True``: PEFT's init (A kaiming-uniform, B zeros, so the
        output is unchanged); ``False``: both random (for tests). ``lora_a``/``lora_b``
        give the weights instead. ``lora_alpha`` defaults to ``r`` (scale 1).
        """
        if not isinstance(name, str) or not name or name == BASE_ADAPTER or "." in name:
            raise ValueError(f"adapter name must be a non-empty string without '.', not "
                             f"{BASE_ADAPTER!r}; got {name!r}")
        if name in self.lora_A:
            raise ValueError(f"adapter {name!r} already exists in this layer")
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"r must be a positive int, got {r!r}")
        lora_alpha = float(r if lora_alpha is None else lora_alpha)
        if dtype is None:
            dtype = torch.float32 if self.is_quantized else self.weight.dtype
        device = self.qweight.device if self.is_quantized else self.weight.device
        for what, t, dims, shape in (
                ("lora_a", lora_a, "r, in_features", (r, self.in_features)),
                ("lora_b", lora_b, "out_features, r", (self.out_features, r))):
            if t is not None:
                check_shape(t, what, dims, shape)
        a = torch.empty(r, self.in_features, dtype=dtype, device=device)
        b = torch.empty(self.out_features, r, dtype=dtype, device=device)
        with torch.no_grad():
            if lora_a is not None:
                a.copy_(lora_a)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            if lora_b is not None:
                b.copy_(lora_b)
            elif init_lora_weights:
                b.zero_()
            else:
                nn.init.kaiming_uniform_(b, a=math.sqrt(5))
        self.lora_A[name] = nn.Parameter(a)
        self.lora_B[name] = nn.Parameter(b)
        self.lora_alpha[name] = lora_alpha
        self.use_rslora[name] = bool(use_rslora)
        self.registry.register(name)
        if self.active_adapter is None:
            self.active_adapter = name
        self._stack_cache = None

    def delete_adapter(self, name: str) -> None:
        self._check_adapter(name)
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is merged into the base; unmerge it first")
        del self.lora_A[name], self.lora_B[name]
        del self.lora_alpha[name], self.use_rslora[name]
        if self.active_adapter == name:
            self.active_adapter = None
        self._stack_cache = None

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the adapter used when no per-row ids are given (None: base)."""
        if name is not None and name != BASE_ADAPTER:
            self._check_adapter(name)
        self.active_adapter = None if name == BASE_ADAPTER else name

    def _check_adapter(self, name: str) -> None:
        if name not in self.lora_A:
            raise ValueError(f"unknown adapter {name!r}; this layer has {self.adapter_names}")

    # ------------------------------------------------------------------ packing
    def adapter_stack(self, dtype: torch.dtype, device) -> tuple[AdapterStack, tuple[int, ...]]:
        """All adapters of the layer packed into one ``AdapterStack`` (see module doc)."""
        # A and B straight from the ParameterDicts' storage: ``lora_A[name]`` goes through
        # nn.Module.__getattr__, which cost ~35% of a 16-adapter SmolLM2 decode step when
        # done for every adapter of every layer on every call.
        pa, pb = self.lora_A._parameters, self.lora_B._parameters
        present = tuple([i for i, n in enumerate(self.registry.names) if n in pa])
        names = [self.registry.names[i] for i in present]
        pairs = [(pa[n], pb[n]) for n in names]
        params = [p for pair in pairs for p in pair]
        # Traced by torch.compile: packed inside the graph (versions are not traceable).
        # Inference tensors (adapters made under inference_mode) have no version: no cache.
        fresh = torch.compiler.is_compiling() or any([p.is_inference() for p in params]) or (
            torch.is_grad_enabled() and any([p.requires_grad for p in params]))
        # The cache stays valid while the same parameter objects hold the same data
        # (``_version`` moves on every in-place write, e.g. an optimizer step) and the
        # scales (lora_alpha, use_rslora: plain dicts a user may edit) are unchanged.
        # Lists, not generators: this runs for every layer on every decode step.
        key = None if fresh else (
            present, dtype, str(device), [id(p) for p in params], [p._version for p in params],
            [self.lora_alpha[n] for n in names], [self.use_rslora[n] for n in names])
        if key is not None and self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1], present
        offsets = [0]
        for a_n, _ in pairs:
            offsets.append(offsets[-1] + a_n.shape[0])
        # torch.cat keeps autograd edges to every adapter's own A and B.
        a = torch.cat([a_n for a_n, _ in pairs], 0).to(device=device, dtype=dtype)
        b = torch.cat([b_n for _, b_n in pairs], 1).to(device=device, dtype=dtype)
        scales = [self.scaling(n) for n in names]
        stack = AdapterStack(a, b, torch.tensor(offsets, dtype=torch.int64),
                             torch.tensor(scales, dtype=torch.float32, device=device), offsets,
                             scales)
        if key is not None:
            self._stack_cache = (key, stack)
        return stack, present

    # ------------------------------------------------------------------ forward
    def _dense_base(self, x: torch.Tensor) -> torch.Tensor | QuantizedWeight:
        base = self.base
        if isinstance(base, torch.Tensor) and base.dtype != x.dtype:
            base = base.to(x.dtype)
        return base

    def _bias(self, x: torch.Tensor) -> torch.Tensor | None:
        b = self.bias
        return b if b is None or b.dtype == x.dtype else b.to(x.dtype)

    def forward(self, x: torch.Tensor,
                adapter_ids: torch.Tensor | Sequence[int] | AdapterBatch | None = None,
                ) -> torch.Tensor:
        """``y [..., N]`` for ``x [..., K]``.

        ``adapter_ids``: optional per-row ids ``[M]`` (M = rows of x) in the registry's
        global index space (``-1`` = base), an ``AdapterBatch`` over them, or a
        ``routing.Route``. Without it, the route of the call in progress
        (``adapter_names=``, ``lorart.route``) is used, else the active adapter.
        """
        base, bias = self._dense_base(x), self._bias(x)
        if adapter_ids is not None and not isinstance(adapter_ids, Route):
            adapter_ids = Route.from_ids(self.registry, adapter_ids)
        route = adapter_ids if adapter_ids is not None else routing.current(self.registry)
        if self.disabled or not self.lora_A:
            if self.merged and self.disabled:
                raise RuntimeError(f"adapters {self.merged} are merged into the base weight; "
                                   f"unmerge them before disabling adapters")
            return lora_linear(x, base, None, None, bias=bias)
        if route is not None:
            if self.merged:
                raise RuntimeError(f"per-row adapters need an unmerged base; adapters "
                                   f"{self.merged} are merged (call unmerge first)")
            stack, present = self.adapter_stack(x.dtype, x.device)
            m = x.numel() // x.shape[-1] if x.shape[-1] else 0
            batch = route.batch_for(m, present, x.device)
            if batch is None:
                return lora_linear(x, base, None, None, bias=bias)
            return multi_lora_linear(x, base, stack, batch, bias)
        name = self.active_adapter
        if name is None or name in self.merged or name not in self.lora_A:
            return lora_linear(x, base, None, None, bias=bias)
        a, b = self.lora_A[name], self.lora_B[name]
        if a.dtype != x.dtype:
            a, b = a.to(x.dtype), b.to(x.dtype)
        return lora_linear(x, base, a, b, self.scaling(name), bias)

    # ------------------------------------------------------------------ merging
    def delta_weight(self, name: str) -> torch.Tensor:
        """``scale · B A`` as a float32 ``[N, K]`` tensor."""
        self._check_adapter(name)
        a, b = self.lora_A[name].detach().float(), self.lora_B[name].detach().float()
        return self.scaling(name) * (b @ a)

    def merge(self, name: str | None = None, requantize: bool = False) -> None:
        """Add adapter ``name`` (default: the active one) into the base weight.

        A dense base merges exactly (up to float rounding). A quantized base must be
        re-quantized, which is lossy: that needs ``requantize=True`` and warns.
        """
        name = name or self.active_adapter
        if name is None:
            raise ValueError("no adapter to merge: name is None and no adapter is active")
        self._check_adapter(name)
        if name in self.merged:
            raise ValueError(f"adapter {name!r} is already merged")
        self._apply_delta(self.delta_weight(name), requantize, "merge")
        self.merged.append(name)

    def unmerge(self, name: str | None = None, requantize: bool = False) -> None:
        """Subtract a merged adapter from the base again (see :meth:`merge`)."""
        name = name or (self.merged[-1] if self.merged else None)
        if name is None or name not in self.merged:
            raise ValueError(f"adapter {name!r} is not merged (merged: {self.merged})")
        self._apply_delta(-self.delta_weight(name), requantize, "unmerge")
        self.merged.remove(name)

    def _apply_delta(self, delta: torch.Tensor, requantize: bool, what: str) -> None:
        if not self.is_quantized:
            with torch.no_grad():
                self.weight.add_(delta.to(self.weight.dtype))
            return
        if not requantize:
            raise ValueError(f"cannot {what} into a quantized base without re-quantizing it; "
                             f"pass requantize=True to accept the rounding error")
        warnings.warn(f"LoRALinear.{what}: re-quantizing the 4-bit base is lossy; the result "
                      f"differs from base + adapter by the 4-bit rounding error", stacklevel=3)
        qw = self.base
        dense = qw.dequantize(torch.float32) + delta
        self._set_base(quantize(dense, qw.group_size, qw.scheme, qw.scales.dtype))

    # ------------------------------------------------------------------ misc
    def to_original(self) -> nn.Module:
        """The module this layer replaced, with the current base weight written back.

        Merged adapters are unmerged first (dense). A quantized base comes back as a
        dequantized float weight (the float original was freed when quantizing).
        """
        original = self.original
        if original is None:
            raise ValueError("this LoRALinear was not created from a module")
        for name in list(reversed(self.merged)):
            self.unmerge(name, requantize=True)
        if self.is_quantized:
            w = self.base.dequantize(torch.float32)
            dtype = original.weight.dtype
            w = (w.t() if self.fan_in_fan_out else w).to(dtype).contiguous()
            original.weight = nn.Parameter(w, requires_grad=False)
        else:
            w = self.weight.data.t() if self.fan_in_fan_out else self.weight.data
            if original.weight.data.data_ptr() != w.data_ptr() or original.weight.shape != w.shape:
                original.weight.data = w.contiguous() if self.fan_in_fan_out else w
        return original

    def weight_nbytes(self) -> int:
        """Bytes of the base weight (packed codes + scales for a quantized base)."""
        if self.is_quantized:
            return self.base.nbytes()
        return self.weight.numel() * self.weight.element_size()

    def extra_repr(self) -> str:
        base = repr(self.base) if self.is_quantized else f"dense {self.weight.dtype}"
        ranks = {n: self.lora_A[n].shape[0] for n in self.lora_A}
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, base={base}, adapters={ranks}, "
                f"active={self.active_adapter!r}")
