"""The op surface: validate every argument once, pick a backend, own autograd.

    lora_linear(x, base, lora_a, lora_b, scale, bias)
        y = x Wᵀ + bias + scale · (x Aᵀ) Bᵀ
    multi_lora_linear(x, base, stack, adapter_ids, bias)
        y[i] = x[i] Wᵀ + bias + c_s · (x[i] A_sᵀ) B_sᵀ,  s = adapter_ids[i]; s = -1: base only

``x [..., K]``; ``W [N, K]`` dense or a ``QuantizedWeight``; ``A [r, K]``, ``B [N, r]``
(PEFT's shapes). Leading dims of x are flattened to rows ``M`` and restored on the
output ``[..., N]``. Every backend trains the same way: the base is frozen (a dense
W that requires grad still gets ``dW = dYᵀ X``, computed in torch), gradients for
x, A, B and bias come from the backend's backward kernels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .adapters import AdapterBatch, AdapterStack
from .backend import LoRAArgs, select_backend
from .backend.base import Backend
from .quant import QuantizedWeight

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# --------------------------------------------------------------------------- checks
def _check_x(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor [..., K], got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension [..., K], got a scalar")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be float32, bfloat16, float16 or float64, got {x.dtype}")


def _check_base(base, x: torch.Tensor) -> tuple[int, int]:
    """Returns ``(N, K)`` of the base after checking it fits x."""
    k = x.shape[-1]
    if isinstance(base, QuantizedWeight):
        if base.device != x.device:
            raise ValueError(f"base is on {base.device} but x is on {x.device}")
    elif isinstance(base, torch.Tensor):
        if base.dim() != 2:
            raise ValueError(f"base must be a weight [N, K], got shape {tuple(base.shape)}")
        if base.dtype != x.dtype:
            raise TypeError(f"base weight dtype {base.dtype} does not match x dtype {x.dtype}")
        if base.device != x.device:
            raise ValueError(f"base is on {base.device} but x is on {x.device}")
    else:
        raise TypeError(f"base must be a tensor [N, K] or a QuantizedWeight, got "
                        f"{type(base).__name__}")
    n, base_k = base.shape
    if base_k != k:
        raise ValueError(f"x has K={k} features but base has in_features={base_k}")
    return n, k


def check_shape(t: torch.Tensor, name: str, dims: str, shape: tuple[int, ...]) -> None:
    """``ValueError`` saying which shape was expected, in words and numbers, e.g.
    ``lora_a must be [r, in_features] = [8, 512]; got [512, 8] — transposed?``."""
    got = tuple(t.shape)
    if got != tuple(shape):
        hint = " — transposed?" if len(got) == 2 and got == tuple(shape)[::-1] else ""
        raise ValueError(f"{name} must be [{dims}] = {list(shape)}; got {list(got)}{hint}")


def _check_like_x(t: torch.Tensor, name: str, dims: str, shape: tuple[int, ...],
                  x: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor [{dims}], got {type(t).__name__}")
    check_shape(t, name, dims, shape)
    if t.dtype != x.dtype:
        raise TypeError(f"{name} dtype {t.dtype} does not match x dtype {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def _as_batch(adapter_ids, num_adapters: int, m: int, device) -> AdapterBatch:
    if isinstance(adapter_ids, AdapterBatch):
        if adapter_ids.num_adapters != num_adapters:
            raise ValueError(f"adapter_ids were validated for {adapter_ids.num_adapters} "
                             f"adapters but the stack has {num_adapters}")
        batch = adapter_ids
        if batch.device != device:
            raise ValueError(f"adapter_ids are on {batch.device} but x is on {device}")
    elif isinstance(adapter_ids, torch.Tensor | Sequence) and not isinstance(adapter_ids, str):
        if isinstance(adapter_ids, torch.Tensor) and adapter_ids.device != device:
            raise ValueError(f"adapter_ids are on {adapter_ids.device} but x is on {device}")
        batch = AdapterBatch(adapter_ids, num_adapters, device)
    else:
        raise TypeError(f"adapter_ids must be an int tensor [M], a list of ints or an "
                        f"AdapterBatch, got {type(adapter_ids).__name__}")
    if len(batch) != m:
        raise ValueError(f"adapter_ids must have one id per row of x (M={m}), got {len(batch)}")
    return batch


# --------------------------------------------------------------------------- autograd
class _FusedLoRALinear(torch.autograd.Function):
    """Forward and backward through one backend; the base weight is never saved dequantized."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, base, lora, batch, backend):
        y = backend.forward(x, base, bias, lora, batch)
        ctx.save_for_backward(x)
        ctx.base, ctx.lora, ctx.batch, ctx.backend = base, lora, batch, backend
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        need_dx, need_dw, need_dbias, need_da, need_db = ctx.needs_input_grad[:5]
        dy = dy.contiguous()
        dx = da = db = dw = dbias = None
        if need_dx or need_da or need_db:
            dx, da, db = ctx.backend.backward(dy, x, ctx.base, ctx.lora, ctx.batch,
                                              need_dx, need_da or need_db)
        if need_dw:
            dw = (dy.float().T @ x.float()).to(x.dtype)
        if need_dbias:
            dbias = dy.float().sum(0).to(dy.dtype)
        return (dx if need_dx else None, dw, dbias, da if need_da else None,
                db if need_db else None, None, None, None, None)


def _run(x2, base, bias, lora: LoRAArgs | None, batch: AdapterBatch | None) -> torch.Tensor:
    backend: Backend = select_backend(x2, base, lora)
    weight = base if isinstance(base, torch.Tensor) else None
    a = None if lora is None else lora.a
    b = None if lora is None else lora.b
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x2, weight, bias, a, b))
    if not needs_grad:  # inference: skip autograd bookkeeping entirely
        return backend.forward(x2, base, bias, lora, batch)
    return _FusedLoRALinear.apply(x2, weight, bias, a, b, base, lora, batch, backend)


def _rows(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(-1, k).contiguous()


def _contiguous_base(base):
    return base.contiguous() if isinstance(base, torch.Tensor) else base


# --------------------------------------------------------------------------- public ops
def lora_linear(
    x: torch.Tensor,
    base: torch.Tensor | QuantizedWeight,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float = 1.0,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y [..., N] = x Wᵀ + bias + scale · (x Aᵀ) Bᵀ`` for one adapter.

    Args:
        x: ``[..., K]`` float32, bfloat16 or float16 (float64 on the torch backend).
        base: dense ``W [N, K]`` in x's dtype, or a ``QuantizedWeight`` of shape [N, K].
        lora_a: ``A [r, K]`` (PEFT ``lora_A.weight``), x's dtype; ``None`` = base only.
        lora_b: ``B [N, r]`` (PEFT ``lora_B.weight``), x's dtype.
        scale: the LoRA scale, ``lora_alpha / r`` (``/ sqrt(r)`` for rsLoRA).
        bias: ``[N]`` in x's dtype, or ``None``.
    """
    _check_x(x)
    n, k = _check_base(base, x)
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a and lora_b must both be given or both be None")
    lora = None
    if lora_a is not None:
        for name, t in (("lora_a", lora_a), ("lora_b", lora_b)):
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"{name} must be a 2-D tensor, got "
                                 f"{tuple(getattr(t, 'shape', ()))}")
        # The rank is A's first dim, unless A is given transposed ([K, r]): say so then.
        transposed = lora_a.shape[1] != k and lora_a.shape[0] == k
        r = lora_a.shape[1] if transposed else lora_a.shape[0]
        _check_like_x(lora_a, "lora_a", "r, K", (r, k), x)
        _check_like_x(lora_b, "lora_b", "N, r", (n, r), x)
        if not isinstance(scale, int | float) or isinstance(scale, bool):
            raise TypeError(f"scale must be a Python number, got {type(scale).__name__}")
        lora = LoRAArgs(lora_a.contiguous(), lora_b.contiguous(), [0, r], [float(scale)])
    if bias is not None:
        _check_like_x(bias, "bias", "N", (n,), x)
        bias = bias.contiguous()
    lead = x.shape[:-1]
    y = _run(_rows(x, k), _contiguous_base(base), bias, lora, None)
    return y.reshape(*lead, n)


def multi_lora_linear(
    x: torch.Tensor,
    base: torch.Tensor | QuantizedWeight,
    stack: AdapterStack,
    adapter_ids: torch.Tensor | Sequence[int] | AdapterBatch,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[i] = x[i] Wᵀ + bias + c_s · (x[i] A_sᵀ) B_sᵀ`` with ``s = adapter_ids[i]``.

    Args:
        x: ``[..., K]``; its leading dims flatten to ``M`` rows.
        base: dense ``W [N, K]`` or a ``QuantizedWeight``.
        stack: an ``AdapterStack`` of ``S`` adapters for this layer (ragged ranks).
        adapter_ids: ``[M]`` ints in ``-1..S-1`` (``-1`` = base only), or an
            ``AdapterBatch`` validated once and shared by every layer of a model.
        bias: ``[N]`` or ``None``.
    """
    _check_x(x)
    n, k = _check_base(base, x)
    if not isinstance(stack, AdapterStack):
        raise TypeError(f"stack must be an AdapterStack, got {type(stack).__name__}")
    if stack.in_features != k or stack.out_features != n:
        raise ValueError(f"stack holds adapters for a [{stack.out_features}, "
                         f"{stack.in_features}] layer, but base is [{n}, {k}]")
    if stack.dtype != x.dtype:
        raise TypeError(f"stack dtype {stack.dtype} does not match x dtype {x.dtype}")
    if stack.device != x.device:
        raise ValueError(f"stack is on {stack.device} but x is on {x.device}")
    if bias is not None:
        _check_like_x(bias, "bias", "N", (n,), x)
        bias = bias.contiguous()
    lead = x.shape[:-1]
    x2 = _rows(x, k)
    batch = _as_batch(adapter_ids, stack.num_adapters, x2.shape[0], x.device)
    y = _run(x2, _contiguous_base(base), bias, stack.lora_args(), batch)
    return y.reshape(*lead, n)
