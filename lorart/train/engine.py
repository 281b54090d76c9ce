"""The training engine: many LoRA adapters on one frozen (4-bit) base, one step at a time.

One batch may hold rows of several adapters (``Batch.adapter_names``, one name per
sequence, ``None`` = base only). A step runs ONE forward/backward for the whole
batch through the op surface's multi-adapter path (``adapter_names=`` of a patched
model), and the loss is

    loss = Σ_s  mean over the response tokens of rows of adapter s  of  CE(logits, label)

Each adapter's parameters only touch its own rows, so ∂loss/∂θ_s is exactly the
gradient of adapter s's own mean loss: a mixed step equals S separate single-adapter
steps on the same rows (``tests/test_train.py`` checks it). Base-only rows are left
out of the loss. The optimizer is one AdamW with one param group per adapter, and
gradient clipping is per group, so nothing couples adapters: each has its own
moments, learning rate and clip.

Logits are computed only at positions that carry a label (the output layer is the
largest matmul of a small model: SmolLM2's 576×49152), by running the decoder and
the output layer separately.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..patch import patch_state, route, set_adapter
from .data import IGNORE_INDEX, Batch


@dataclass
class StepResult:
    """What one optimizer step did: ``loss`` (the summed per-adapter means, a float),
    ``adapter_losses`` ``{name: mean response-token loss}``, ``tokens`` (non-pad tokens)."""

    loss: float
    adapter_losses: dict[str, float] = field(default_factory=dict)
    tokens: int = 0


def lora_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The ``lora_A``/``lora_B`` parameters of adapter ``name``, in module order."""
    from ..patch import lora_layers

    params = []
    for _, layer in lora_layers(model):
        if name in layer.lora_A:
            params += [layer.lora_A[name], layer.lora_B[name]]
    if not params:
        raise ValueError(f"model has no adapter named {name!r}")
    return params


def freeze_all_but_adapters(model: nn.Module, names: Sequence[str]) -> int:
    """``requires_grad`` True only on the LoRA parameters of ``names``; returns their count."""
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for name in names:
        for p in lora_parameters(model, name):
            p.requires_grad_(True)
            n += p.numel()
    return n


@contextlib.contextmanager
def adapter_rows(model: nn.Module, names: Sequence[str | None]):
    """Per-sequence adapters for every forward inside the block.

    The same as ``model(..., adapter_names=names)`` (``lorart.patch``'s hook), but it
    also covers calls to sub-modules (the decoder alone), which the top-level hook
    does not see. ``None`` in ``names`` means base only.
    """
    if patch_state(model) is None:
        raise ValueError("model is not patched by lorart (call lorart.patch first)")
    with route(model, adapter_names=names):  # per call (a ContextVar), thread-safe
        yield


def split_decoder(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """``(decoder, output_layer)`` of a transformers causal LM (or a PEFT wrapper of one)."""
    inner = model
    if hasattr(inner, "get_base_model"):  # peft.PeftModel
        inner = inner.get_base_model()
    decoder = inner.get_decoder() if hasattr(inner, "get_decoder") else None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if decoder is None or head is None:
        raise TypeError(f"{type(inner).__name__} is not a causal LM with get_decoder() and "
                        f"get_output_embeddings()")
    return decoder, head


def response_losses(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy on labelled positions only.

    Returns ``(losses [P], rows [P])``: the loss of each of the P labelled tokens (label
    at t+1 predicted from position t) and the batch row it belongs to.
    """
    decoder, head = split_decoder(model)
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     use_cache=False).last_hidden_state  # [B, T, H]
    targets = batch.labels[:, 1:]
    pos = (targets != IGNORE_INDEX).nonzero(as_tuple=True)  # (rows [P], t [P])
    logits = head(hidden[:, :-1][pos])  # [P, V]
    losses = nn.functional.cross_entropy(logits.float(), targets[pos], reduction="none")
    return losses, pos[0]


def adapter_loss(losses: torch.Tensor, rows: torch.Tensor, names: Sequence[str | None],
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """``Σ_s mean(losses of rows of adapter s)`` and the per-adapter means (see module doc)."""
    total = losses.new_zeros(())
    per = {}
    for name in dict.fromkeys(n for n in names if n is not None):
        sel = torch.tensor([n == name for n in names], dtype=torch.bool)[rows]
        if bool(sel.any()):
            mean = losses[sel].mean()
            total = total + mean
            per[name] = float(mean.detach())
    return total, per


class AdapterOptimizer:
    """AdamW with one param group per adapter (own moments, lr and gradient clip)."""

    def __init__(self, model: nn.Module, names: Sequence[str], lr: float,
                 weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
        self.names = list(names)
        groups = [{"params": lora_parameters(model, n), "adapter": n} for n in self.names]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay,
                                           betas=betas, eps=eps)

    def clip(self, max_norm: float | None) -> dict[str, float]:
        """Clip each adapter's gradient norm separately; returns the norms before clipping."""
        norms = {}
        for g in self.optimizer.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            if max_norm:
                norms[g["adapter"]] = float(nn.utils.clip_grad_norm_(params, max_norm))
            else:
                norms[g["adapter"]] = float(torch.linalg.vector_norm(
                    torch.stack([p.grad.norm() for p in params])))
        return norms

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the base lr at step ``s``: linear warmup, then constant/linear/cosine."""
    if schedule not in ("constant", "linear", "cosine"):
        raise ValueError(f"lr_schedule must be 'constant', 'linear' or 'cosine', got "
                         f"{schedule!r}")

    def f(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        frac = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - frac if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * frac))

    return f


def train_step(model: nn.Module, batch: Batch, optimizer: AdapterOptimizer,
               max_grad_norm: float | None = 1.0, scheduler=None) -> StepResult:
    """One forward/backward/update of every adapter present in ``batch``.

    A batch whose rows all use one adapter runs the single-adapter path
    (``set_adapter``), a mixed batch the per-row multi-adapter path.
    """
    names = batch.adapter_names
    present = [n for n in dict.fromkeys(names) if n is not None]
    if not present:
        raise ValueError("batch has no row with an adapter; nothing to train")
    optimizer.zero_grad()
    if len(present) == 1 and all(n == present[0] for n in names):
        set_adapter(model, present[0])
        ctx = contextlib.nullcontext()
    else:
        ctx = adapter_rows(model, names)
    with ctx:  # backward inside: activation checkpointing re-runs forwards during it
        losses, rows = response_losses(model, batch)
        loss, per = adapter_loss(losses, rows, names)
        loss.backward()
    optimizer.clip(max_grad_norm)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return StepResult(float(loss.detach()), per, batch.num_tokens)


def rng_state() -> dict:
    """Every RNG a step may draw from: python, torch CPU, and CUDA when present.

    (numpy is not used by training; leaving it out keeps checkpoints loadable with
    ``torch.load(weights_only=True)``.)
    """
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
