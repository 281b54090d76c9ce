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

The model's own loss (``labels=`` in ``forward``) is used: the mean over all
response tokens of the batch. With several adapters, the collator passes
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

from torch import nn

from ..patch import set_adapter
from .checkpoint import save_peft_adapter
from .data import Example, collate
from .engine import freeze_all_but_adapters


def prepare_for_hf_trainer(model: nn.Module, adapter_names: Sequence[str]) -> int:
    """Make ``transformers.Trainer`` train only the LoRA weights of ``adapter_names``.

    Freezes every other parameter (the Trainer's optimizer takes parameters with
    ``requires_grad``), makes the first adapter active for rows without per-row names,
    and turns off the KV cache. Returns the number of trainable parameters.
    """
    if isinstance(adapter_names, str):
        adapter_names = [adapter_names]
    n = freeze_all_but_adapters(model, adapter_names)
    set_adapter(model, adapter_names[0])
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return n


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
