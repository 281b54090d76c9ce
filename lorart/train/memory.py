"""Activation memory of a training step: lean norms and MLPs, selective checkpointing.

    handle = lean_activations(model)            # RMSNorm + SwiGLU save only bf16 inputs
    handle = checkpoint_layers(model, "mlp", every=2)
    handle.remove()                              # both undo exactly

What autograd keeps per decoder layer for a bf16 model, and what these change:

- transformers' ``LlamaRMSNorm`` upcasts to float32 and autograd saves that float32
  copy plus the bf16 product: 6 bytes per activation per norm, two norms a layer.
  :class:`RMSNormFunction` saves the bf16 input and one float32 ``rstd`` per row
  and recomputes the rest in the backward (same arithmetic as transformers' forward).
- ``LlamaMLP``'s ``act(gate(x)) * up(x)`` saves gate, act(gate) and up (3 × 1536 per
  token in SmolLM2); :class:`SiluMulFunction` saves gate and up and recomputes SiLU.
- Inside :func:`recompute_cheap_outputs` the *outputs* of those two (which the next
  linear layers save as their inputs) are not kept either: they are recomputed from
  the tensors the two functions keep anyway when the backward needs them.
- Checkpointing: :func:`checkpoint_layers` re-runs chosen blocks (whole decoder layers,
  or only their MLP or attention) in the backward, for any subset of layers. The
  per-row adapters of the forward (``adapter_names=``) are captured at forward time
  and restored around the recomputation, so a mixed-adapter batch recomputes with the
  same adapters even when the backward runs outside the forward's context (the HF
  Trainer path).

Everything is installed per *instance* (an instance ``forward`` attribute) and
undone by ``handle.remove()``; no class of transformers is modified. Attention is
transformers' SDPA (``config._attn_implementation == "sdpa"``, the default), which
saves no ``[T, T]`` probabilities.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .. import routing

# RMSNorms computing weight * (x / rms(x)).to(x.dtype) in float32, like LlamaRMSNorm
# (Gemma's 1 + weight variant is NOT this and is left alone).
_LLAMA_STYLE_NORMS = {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"}
_SWIGLU_MLPS = {"LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP"}
BLOCKS = ("layer", "mlp", "attn")


class Handle:
    """Undo for instance ``forward`` overrides (like torch's ``RemovableHandle``)."""

    def __init__(self, modules: list[nn.Module]) -> None:
        self.modules = modules

    def remove(self) -> None:
        for m in self.modules:
            m.__dict__.pop("forward", None)
        self.modules = []

    def __len__(self) -> int:
        return len(self.modules)


# --------------------------------------------------------------------------- RMSNorm
class RMSNormFunction(torch.autograd.Function):
    """``y [M, H] = weight * (x · rstd).to(x.dtype)``, ``rstd = 1/sqrt(mean(x²) + eps)``
    in float32; saves ``x`` (its own dtype) and ``rstd [M]`` only."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        x32 = x.float()
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (x32 * rstd).to(x.dtype)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        n = x.float() * rstd  # normalized x, float32
        dn = dy.float() * weight.float()
        dx = rstd * (dn - n * (dn * n).mean(-1, keepdim=True))
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy.float() * n.to(x.dtype).float()).reshape(-1, x.shape[-1]).sum(0)
            dw = dw.to(weight.dtype)
        return dx.to(x.dtype), dw, None


def _norm_forward(norm: nn.Module):
    def forward(hidden_states: torch.Tensor) -> torch.Tensor:
        y = RMSNormFunction.apply(hidden_states, norm.weight, norm.variance_epsilon)
        _register(y, RMSNormFunction.apply, hidden_states, norm.weight, norm.variance_epsilon)
        return y

    return forward


# --------------------------------------------------------------------------- SwiGLU
class SiluMulFunction(torch.autograd.Function):
    """``silu(gate) * up`` saving only ``gate`` and ``up`` (SiLU recomputed in backward)."""

    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return nn.functional.silu(gate) * up

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        g32 = gate.float()
        sig = torch.sigmoid(g32)
        silu = g32 * sig
        d_up = (dy.float() * silu).to(up.dtype)
        d_gate = (dy.float() * up.float() * sig * (1 + g32 * (1 - sig))).to(gate.dtype)
        return d_gate, d_up


def _mlp_forward(mlp: nn.Module):
    def forward(x: torch.Tensor) -> torch.Tensor:
        gate, up = mlp.gate_proj(x), mlp.up_proj(x)
        h = SiluMulFunction.apply(gate, up)
        _register(h, SiluMulFunction.apply, gate, up)
        return mlp.down_proj(h)

    return forward


# --------------------------------------------------------------------------- recompute
# Inside ``recompute_cheap_outputs()``, a tensor that autograd saves and that is (a view
# of) a registered RMSNorm or SiLU·mul output is stored as a recipe over the inputs those
# functions keep anyway, and recomputed (bit for bit, same ops) when the backward needs
# it: the next layers' saved copies of these outputs (q/k/v and gate/up inputs, the
# down projection's input) cost no memory. Entries are keyed by storage, weakly.
_RECOMPUTE: list[dict] = []


def _register(y: torch.Tensor, fn, *inputs) -> None:
    if _RECOMPUTE and torch.is_grad_enabled():
        inputs = tuple(t.detach() if isinstance(t, torch.Tensor) else t for t in inputs)
        _RECOMPUTE[-1][y.untyped_storage().data_ptr()] = [weakref.ref(y), fn, inputs, None]


class _Recipe:
    __slots__ = ("entry", "shape", "stride", "offset")

    def __init__(self, entry, t: torch.Tensor) -> None:
        self.entry, self.shape, self.stride, self.offset = (
            entry, t.shape, t.stride(), t.storage_offset())

    def materialize(self) -> torch.Tensor:
        _, fn, inputs, cached = self.entry
        if cached is None:  # q, k and v (gate and up) share one recomputation
            with torch.no_grad():
                cached = self.entry[3] = fn(*inputs)
        return cached.as_strided(self.shape, self.stride, self.offset)


def _pack(t: torch.Tensor):
    entry = _RECOMPUTE[-1].get(t.untyped_storage().data_ptr()) if _RECOMPUTE else None
    if entry is None:
        return t
    y = entry[0]()
    if y is None or y.dtype != t.dtype:
        return t
    return _Recipe(entry, t)


def _unpack(packed):
    return packed.materialize() if isinstance(packed, _Recipe) else packed


@contextlib.contextmanager
def recompute_cheap_outputs():
    """Forwards inside the block store lean RMSNorm / SwiGLU outputs as recipes (see
    above). Wrap the forward only; the backward may run after the block."""
    _RECOMPUTE.append({})
    try:
        with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
            yield
    finally:
        _RECOMPUTE.pop()


def _is_silu(act: nn.Module) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


def lean_activations(model: nn.Module) -> Handle:
    """Install :class:`RMSNormFunction` on Llama-style RMSNorms and
    :class:`SiluMulFunction` on SwiGLU MLPs of ``model`` (see module doc)."""
    touched = []
    for m in model.modules():
        name = type(m).__name__
        if "forward" in m.__dict__:
            continue  # already overridden (by us or someone else): leave it
        if name in _LLAMA_STYLE_NORMS and hasattr(m, "variance_epsilon"):
            m.forward = _norm_forward(m)
            touched.append(m)
        elif name in _SWIGLU_MLPS and _is_silu(getattr(m, "act_fn", None)):
            m.forward = _mlp_forward(m)
            touched.append(m)
    return Handle(touched)


# --------------------------------------------------------------------------- checkpoints
def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a transformers causal LM (or a PEFT wrapper of one)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else inner
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(f"{type(inner).__name__} has no decoder .layers ModuleList")
    return layers


def _registry(model: nn.Module):
    from ..patch import patch_state

    state = patch_state(model)
    return None if state is None else state.registry


def _checkpointed_forward(module: nn.Module, registry):
    inner = module.forward  # the class's forward, bound (no override installed yet)

    def forward(*args, **kwargs):
        if not (module.training and torch.is_grad_enabled()):
            return inner(*args, **kwargs)
        rows = None if registry is None else routing.current(registry)
        # A KV cache would be written twice (forward and recomputation); training has no
        # use for it (transformers' own checkpointing drops it the same way).
        for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
            if kwargs.get(key) is not None:
                kwargs[key] = None
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False

        def run(*a, **k):
            if registry is None:
                return inner(*a, **k)
            with routing.using(rows):  # the forward's per-row adapters, recomputed too
                return inner(*a, **k)

        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    return forward


def checkpoint_layers(model: nn.Module, block: str = "layer",
                      layers: Sequence[int] | None = None, every: int = 1) -> Handle:
    """Activation checkpointing of ``block`` in the chosen decoder layers.

    Args:
        block: ``"layer"`` (the whole decoder layer: least memory), ``"mlp"`` (the MLP
            only: its 3 × intermediate activations are the largest of a layer) or
            ``"attn"`` (the attention block only).
        layers: indices of the layers to checkpoint (default: every ``every``-th,
            starting at 0).
        every: with ``layers=None``, checkpoint layers 0, every, 2·every, ...
    """
    if block not in BLOCKS:
        raise ValueError(f"block must be one of {BLOCKS}, got {block!r}")
    if not isinstance(every, int) or every <= 0:
        raise ValueError(f"every must be a positive int, got {every!r}")
    all_layers = decoder_layers(model)
    chosen = list(range(0, len(all_layers), every)) if layers is None else list(layers)
    bad = [i for i in chosen if not 0 <= i < len(all_layers)]
    if bad:
        raise ValueError(f"layers {bad} out of range for {len(all_layers)} decoder layers")
    registry = _registry(model)
    touched = []
    for i in chosen:
        layer = all_layers[i]
        target = {"layer": layer, "mlp": getattr(layer, "mlp", None),
                  "attn": getattr(layer, "self_attn", None)}[block]
        if target is None:
            raise TypeError(f"decoder layer {i} ({type(layer).__name__}) has no {block!r} block")
        if "forward" in target.__dict__ and block == "mlp":
            # lean_activations' MLP forward: checkpoint around it
            inner = target.__dict__.pop("forward")
            target.forward = _wrap_override(target, inner, registry)
        elif "forward" in target.__dict__:
            raise ValueError(f"layer {i}'s {block} already has an instance forward")
        else:
            target.forward = _checkpointed_forward(target, registry)
        touched.append(target)
    return _CheckpointHandle(touched)


def _wrap_override(module: nn.Module, inner, registry):
    module.forward = inner
    wrapped = _checkpointed_forward(module, registry)
    wrapped.__wrapped_override__ = inner
    return wrapped


class _CheckpointHandle(Handle):
    def remove(self) -> None:
        for m in self.modules:
            fwd = m.__dict__.pop("forward", None)
            inner = getattr(fwd, "__wrapped_override__", None)
            if inner is not None:  # put lean_activations' forward back
                m.forward = inner
        self.modules = []


__all__ = ["BLOCKS", "Handle", "RMSNormFunction", "SiluMulFunction", "checkpoint_layers",
           "decoder_layers", "lean_activations", "recompute_cheap_outputs"]
