"""Training lorart adapters with the Hugging Face ``transformers.Trainer``.

    model, tok = lorart.from_gguf()                  # or lorart.patch(hf_model, quantize="int4")
    lorart.add_adapter(model, "pirate", r=8, target_modules=["q_proj", "v_proj"])
    prepare_for_hf_trainer(model, ["pirate"])        # only LoRA params train
    ds = hf_dataset(load_examples("pirate.jsonl", tok, 256, adapter="pirate"))
    trainer = transformers.Trainer(
        model=model, args=TrainingArguments(..., remove_unused_columns=False,
                                            save_strategy="no"),
        train_dataset=ds, data_collator=HFCollator(tok.pad_token_id))
    trainer.train()
    lorart.save_adapter(model, "out/pirate", "pirate")

The model's loss (``labels=`` in ``forward``) is the mean over all response tokens of
the batch (over ``num_items_in_batch`` when the Trainer passes it, as transformers
does). ``prepare_for_hf_trainer`` makes it the fused output layer + cross-entropy
(``lorart.losses``: no ``[tokens, vocab]`` logits; the output then has ``logits=None``
when ``labels`` are given) and installs the lean RMSNorm/SwiGLU activations of
``lorart.train.memory``; ``restore_hf_model`` undoes both. For selective activation
checkpointing call ``lorart.train.checkpoint_layers(model, ...)`` instead of the
Trainer's ``gradient_checkpointing=True`` (which checkpoints every layer); it keeps
mixed-batch adapters through the recomputation. With several adapters, the collator passes
``adapter_names`` (one per row), which ``lorart.patch``'s forward hook consumes, so
mixed batches train every adapter; the Trainer's single optimizer then sees every
adapter's parameters (use ``lorart.train.LoRATrainer`` for per-adapter groups and a
per-adapter mean). ``save_strategy="no"``: the Trainer's full-model save does not
know the packed 4-bit buffers; :class:`SaveAdaptersCallback` writes PEFT adapters at
each Trainer save instead.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ..losses import linear_cross_entropy
from ..patch import set_adapter
from .checkpoint import save_peft_adapter
from .data import IGNORE_INDEX, Example, collate
from .engine import freeze_all_but_adapters, fusable_head, split_decoder
from .memory import Handle, lean_activations, recompute_cheap_outputs


def prepare_for_hf_trainer(model: nn.Module, adapter_names: Sequence[str],
                           fused_loss: bool = True, lean: bool = True) -> int:
    """Make ``transformers.Trainer`` train only the LoRA weights of ``adapter_names``.

    Freezes every other parameter (the Trainer's optimizer takes parameters with
    ``requires_grad``), makes the first adapter active for rows without per-row names,
    and turns off the KV cache. ``fused_loss``/``lean``: see the module doc. Returns
    the number of trainable parameters.
    """
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    n = freeze_all_but_adapters(model, adapter_names)
    set_adapter(model, adapter_names[0])
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    if lean:
        lean_activations(model)
    if fused_loss and "forward" not in model.__dict__:
        model.forward = _fused_loss_forward(model)
    return n


def restore_hf_model(model: nn.Module) -> None:
    """Undo :func:`prepare_for_hf_trainer`'s forward changes (not the freezing)."""
    Handle(list(model.modules())).remove()


def _fused_loss_forward(model: nn.Module):
    """``model.forward`` computing ``loss`` with the fused output layer + cross-entropy
    when ``labels`` are given (transformers' causal-LM loss: labels shifted by one,
    summed over response tokens, divided by ``num_items_in_batch`` or their count)."""
    original = model.forward  # the class's forward, bound

    def forward(input_ids=None, attention_mask=None, labels=None, num_items_in_batch=None,
                **kwargs):
        decoder, head = split_decoder(model)
        if labels is None or not fusable_head(head) or kwargs.get("return_dict") is False:
            if num_items_in_batch is not None:
                kwargs["num_items_in_batch"] = num_items_in_batch
            return original(input_ids=input_ids, attention_mask=attention_mask,
                            labels=labels, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        kwargs.pop("use_cache", None)
        kwargs.pop("logits_to_keep", None)
        with recompute_cheap_outputs():
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask,
                             use_cache=False, **kwargs).last_hidden_state  # [B, T, H]
        targets = labels[:, 1:].to(hidden.device)
        total = linear_cross_entropy(hidden[:, :-1], head, targets, reduction="sum")
        count = num_items_in_batch
        if count is None:
            count = (targets != IGNORE_INDEX).sum()
        if isinstance(count, torch.Tensor):
            count = count.to(total.device)
        return CausalLMOutputWithPast(loss=total / count, logits=None)

    return forward


def hf_dataset(examples: Sequence[Example]) -> list[dict]:
    """Examples as the list of dicts a ``Trainer`` indexes (a list is a valid Dataset)."""
    return [{"input_ids": e.input_ids, "labels": e.labels, "adapter": e.adapter}
            for e in examples]


class HFCollator:
    """Pads rows of :func:`hf_dataset` into ``input_ids``/``labels``/``attention_mask``
    ``[B, T]``; adds ``adapter_names`` when ``per_row_adapters`` (mixed batches)."""

    def __init__(self, pad_token_id: int, per_row_adapters: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.per_row_adapters = per_row_adapters

    def __call__(self, rows: list[dict]) -> dict:
        batch = collate([Example(r["input_ids"], r["labels"], r.get("adapter")) for r in rows],
                        self.pad_token_id)
        out = {"input_ids": batch.input_ids, "labels": batch.labels,
               "attention_mask": batch.attention_mask}
        if self.per_row_adapters:
            out["adapter_names"] = ["__base__" if n is None else n for n in batch.adapter_names]
        return out


def SaveAdaptersCallback(adapter_names: Sequence[str], dtype: str = "float32"):  # noqa: N802
    """A ``transformers.TrainerCallback`` writing each adapter in PEFT format to
    ``<output_dir>/checkpoint-<step>/<name>/`` whenever the Trainer saves."""
    from transformers import TrainerCallback

    class _SaveAdapters(TrainerCallback):
        def on_save(self, args, state, control, model=None, **kwargs):
            root = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            for name in adapter_names:
                save_peft_adapter(model, root / name, name, dtype)
            return control

    return _SaveAdapters()
