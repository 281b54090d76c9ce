"""Fused output layer + cross-entropy: the loss of a causal LM without its logits.

    losses = linear_cross_entropy(hidden, weight, targets)          # [N], 0 where ignored
    loss   = linear_cross_entropy(hidden, head, targets, reduction="mean")

For ``hidden [N, H]``, an output weight ``W [V, H]`` (dense, or a 4-bit
``QuantizedWeight`` run through lorart's op surface), optional ``bias [V]`` and
``targets [N]``:

    z_i    = hidden_i Wᵀ + bias                                    (never stored whole)
    loss_i = logsumexp(z_i) − (1 − ε)·z_i[t_i] − ε·mean_v(z_i)       (ε = label_smoothing)
    loss_i = 0 where t_i == ignore_index

which is ``torch.nn.functional.cross_entropy(z, t, reduction="none",
label_smoothing=ε)``. Labelled rows are gathered first, then run in chunks of rows:
each chunk's logits ``[rows, V]`` are made, reduced to its losses and — when a
gradient will be needed — turned at once into the chunk's gradient
``∂loss_i/∂hidden_i = (softmax(z_i) − (1−ε)·onehot(t_i) − ε/V) W`` and dropped
(the Liger-Kernel / unsloth scheme). Rows are independent, so the backward only
scales those stored ``[N, H]`` rows by the incoming gradient of each row's loss:
any later weighting (a mean, per-adapter means in a mixed batch) stays exact. When
``W`` or ``bias`` itself needs a gradient (a trained, possibly tied, output layer),
the backward recomputes each chunk's logits once more for ``dW = Σ_i g_i dz_iᵀ h_i``.

Peak extra memory is one chunk of logits in float32 plus its gradient in the compute
dtype (``chunk_rows × V``); for SmolLM2 (V = 49152) at 2,048 labelled tokens the
unfused float32 logits and their gradient alone are ~800 MB.

Numerics match the unfused path in the same dtype: logits in the compute dtype
(fp32 accumulation inside the GEMM), softmax and loss in float32, the logits'
gradient rounded to the compute dtype before the GEMM back to ``hidden``. One rounding
more than the unfused path: ``∂loss_i/∂hidden_i`` is kept in the compute dtype and
scaled by the incoming gradient in the backward (≤ 1 ulp of bf16 more error).
"""

from __future__ import annotations

import torch
from torch import nn

from . import routing
from .ops import lora_linear
from .quant import QuantizedWeight

IGNORE_INDEX = -100
_REDUCTIONS = ("none", "mean", "sum")

# Logit elements per chunk (float32 logits + their compute-dtype gradient live at once).
# 1,024 bf16 rows x 49152 vocab x 576 (SmolLM2's head), forward + backward, 1 thread on a
# saturated shared 2-core machine (load ~17, 2026-12-02), best of 3: 42 rows 9.98 s,
# 85 rows 7.74 s, 170 rows 8.53 s, 340 rows 9.64 s: flat within the noise from ~85 to 170
# rows; 8M elements (170 rows here, ~50 MB transient) keeps each GEMM large.
DEFAULT_CHUNK_ELEMENTS = 1 << 23


def head_weight(head: nn.Module) -> tuple[torch.Tensor | QuantizedWeight, torch.Tensor | None]:
    """``(W [V, H] or QuantizedWeight, bias [V] or None)`` of an output layer module.

    Accepts ``nn.Linear`` (incl. lorart's ``BaseLinear``), a ``LoRALinear`` with no
    adapter in use, and the packed output layers of GGUF models (``TiedQuantizedLinear``,
    ``QuantizedLinear``: 4- or 8-bit, no bias). A head that applies LoRA itself is refused
    (``TypeError``): its logits are not ``hidden Wᵀ + bias``.
    """
    from .embedding import QuantizedLinear, TiedQuantizedLinear
    from .layers import LoRALinear

    if isinstance(head, TiedQuantizedLinear | QuantizedLinear):
        return head.base, None

    if isinstance(head, LoRALinear):
        in_use = (not head.disabled and head.lora_A
                  and (routing.current(head.registry) is not None
                       or head.active_adapter is not None))
        if in_use:
            raise TypeError("the output layer has LoRA adapters in use; the fused loss only "
                            "covers a plain (dense or 4-bit) output layer")
        return head.base, head.bias
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    raise TypeError(f"head must be an nn.Linear, a LoRALinear or a packed output layer, got "
                    f"{type(head).__name__}")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor | QuantizedWeight | nn.Module,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = IGNORE_INDEX,
    label_smoothing: float = 0.0,
    reduction: str = "none",
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``hidden Wᵀ + bias`` against ``targets`` without the logits.

    Args:
        hidden: ``[..., H]`` float32 / bfloat16 / float16 (the last hidden state).
        weight: ``W [V, H]`` in hidden's dtype, a ``QuantizedWeight [V, H]``, or an output
            layer module (see :func:`head_weight`; then ``bias`` comes from it).
        targets: ``[...]`` int64 class ids in ``0..V-1`` or ``ignore_index``.
        bias: ``[V]`` in hidden's dtype, or ``None``.
        label_smoothing: ε in ``[0, 1)``, as in ``torch.nn.functional.cross_entropy``.
        reduction: ``"none"`` (losses ``[...]``, float32, 0 where ignored), ``"mean"``
            (over the non-ignored rows) or ``"sum"``.
        chunk_rows: rows of logits made at once (default: ``DEFAULT_CHUNK_ELEMENTS // V``).

    Returns float32 losses (float64 for float64 inputs); gradients reach ``hidden``
    and, when they require it, ``weight`` and ``bias``.
    """
    if isinstance(weight, nn.Module):
        if bias is not None:
            raise ValueError("give bias only with a weight tensor; a module brings its own")
        weight, bias = head_weight(weight)
    _check(hidden, weight, targets, bias, label_smoothing, reduction, chunk_rows)
    v, h = weight.shape
    lead = targets.shape
    hidden2, targets1 = hidden.reshape(-1, h), targets.reshape(-1).long()
    keep = (targets1 != ignore_index).nonzero().squeeze(1)
    labelled = targets1[keep]
    if keep.numel() and (int(labelled.max()) >= v or int(labelled.min()) < 0):
        raise ValueError(f"targets must be in [0, {v}) or ignore_index={ignore_index}")
    chunk = chunk_rows or max(1, DEFAULT_CHUNK_ELEMENTS // v)
    dense = weight if isinstance(weight, torch.Tensor) else None
    per_row = _LinearCrossEntropy.apply(hidden2.index_select(0, keep), dense, bias,
                                        labelled, weight, float(label_smoothing), chunk)
    losses = per_row.new_zeros(targets1.shape).index_put((keep,), per_row)
    if reduction == "none":
        return losses.reshape(lead)
    if reduction == "sum":
        return per_row.sum()
    return per_row.sum() / keep.numel()  # nan when nothing is labelled, as in torch


def _check(hidden, weight, targets, bias, label_smoothing, reduction, chunk_rows) -> None:
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point():
        raise TypeError("hidden must be a float tensor [..., H]")
    if not isinstance(weight, torch.Tensor | QuantizedWeight):
        raise TypeError(f"weight must be a tensor [V, H], a QuantizedWeight or an output "
                        f"layer module, got {type(weight).__name__}")
    if len(weight.shape) != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must be [V, H={hidden.shape[-1]}], got {list(weight.shape)}")
    if isinstance(weight, torch.Tensor) and weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match hidden dtype {hidden.dtype}")
    if bias is not None and (tuple(bias.shape) != (weight.shape[0],) or bias.dtype != hidden.dtype):
        raise ValueError(f"bias must be [V={weight.shape[0]}] in {hidden.dtype}, got "
                         f"{list(bias.shape)} {bias.dtype}")
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise TypeError("targets must be an int64 tensor of class ids")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets must have hidden's leading shape {list(hidden.shape[:-1])}, "
                         f"got {list(targets.shape)}")
    if not (isinstance(label_smoothing, int | float) and 0.0 <= label_smoothing < 1.0):
        raise ValueError(f"label_smoothing must be a number in [0, 1), got {label_smoothing!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows <= 0):
        raise ValueError(f"chunk_rows must be a positive int, got {chunk_rows!r}")


# --------------------------------------------------------------------------- the chunks
def _logits(h: torch.Tensor, weight, bias) -> torch.Tensor:
    """``z [rows, V] = h Wᵀ + bias`` in h's dtype: torch's GEMM for a dense W, the op
    surface (lorart's kernels) for a 4-bit one."""
    if isinstance(weight, QuantizedWeight):
        return lora_linear(h, weight, None, None, bias=None if bias is None else bias.detach())
    return nn.functional.linear(h, weight.detach(), None if bias is None else bias.detach())


def _input_grad(dz: torch.Tensor, h: torch.Tensor, weight) -> torch.Tensor:
    """``dz [rows, V] W [V, H]`` in dz's dtype (the op surface's backward for a 4-bit W)."""
    if isinstance(weight, QuantizedWeight):
        with torch.enable_grad():
            x = h.detach().requires_grad_(True)
            (dh,) = torch.autograd.grad(lora_linear(x, weight, None, None), x, dz)
        return dh
    return dz @ weight.detach()


def _chunk_loss_and_dlogits(z: torch.Tensor, t: torch.Tensor, eps: float, need_grad: bool,
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row float32 losses of logits ``z [rows, V]`` and ``∂loss/∂z`` in z's dtype."""
    z32 = z.to(_loss_dtype(z.dtype))
    lse = torch.logsumexp(z32, dim=1)
    loss = lse - (1.0 - eps) * z32.gather(1, t[:, None]).squeeze(1)
    if eps:
        loss = loss - eps * z32.mean(1)
    if not need_grad:
        return loss, None
    # softmax in place over the float32 logits (a fresh tensor unless z was float32)
    p = z32.sub_(lse[:, None]).exp_() if z32 is not z else (z32 - lse[:, None]).exp_()
    p.scatter_add_(1, t[:, None], p.new_full((len(t), 1), -(1.0 - eps)))
    if eps:
        p.sub_(eps / z.shape[1])
    return loss, p.to(z.dtype)


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # float32, or float64 for float64


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row losses ``[P]`` of labelled rows; gradients computed chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, dense_weight, bias, targets, weight, eps, chunk):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        p = hidden.shape[0]
        losses = torch.empty(p, dtype=_loss_dtype(hidden.dtype), device=hidden.device)
        dh = torch.empty_like(hidden) if need_h else None
        for r0 in range(0, p, chunk):
            h, t = hidden[r0:r0 + chunk], targets[r0:r0 + chunk]
            z = _logits(h, weight, bias)
            losses[r0:r0 + chunk], dz = _chunk_loss_and_dlogits(z, t, eps, need_h)
            del z
            if need_h:
                dh[r0:r0 + chunk] = _input_grad(dz, h, weight)
        ctx.weight, ctx.eps, ctx.chunk = weight, eps, chunk
        ctx.save_for_backward(dh, hidden if (need_w or need_b) else None, bias, targets)
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        dh, hidden, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        g = grad_losses.to(_loss_dtype(grad_losses.dtype))
        grad_h = (dh.to(g.dtype) * g[:, None]).to(dh.dtype) if need_h else None
        grad_w = grad_b = None
        if need_w or need_b:  # a trained output layer: one more pass for dW and dbias
            weight, chunk = ctx.weight, ctx.chunk
            grad_w = torch.zeros(weight.shape, dtype=g.dtype, device=g.device)
            grad_b = torch.zeros(weight.shape[0], dtype=g.dtype, device=g.device)
            for r0 in range(0, hidden.shape[0], chunk):
                h, t = hidden[r0:r0 + chunk], targets[r0:r0 + chunk]
                _, dz = _chunk_loss_and_dlogits(_logits(h, weight, bias), t, ctx.eps, True)
                dz = (dz.to(g.dtype) * g[r0:r0 + chunk, None]).to(dz.dtype)
                grad_w.add_(dz.T @ h)
                grad_b.add_(dz.sum(0, dtype=g.dtype))
            grad_w = grad_w.to(weight.dtype) if need_w else None
            grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None


__all__ = ["DEFAULT_CHUNK_ELEMENTS", "IGNORE_INDEX", "head_weight", "linear_cross_entropy"]
