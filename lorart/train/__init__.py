"""Training LoRA adapters on a frozen 4-bit base: data, engine, checkpoints, HF Trainer.

    lorart.train.data        JSONL prompt/response -> chat-templated ids, loss on the response
    lorart.train.engine      one step for many adapters at once (per-adapter loss and AdamW group)
    lorart.train.trainer     TrainConfig, LoRATrainer (loop, tqdm, checkpoints), train()
    lorart.train.memory      lean RMSNorm/SwiGLU activations, selective checkpointing
    lorart.train.checkpoint  resumable checkpoints; PEFT adapter files
    lorart.train.hf          transformers.Trainer integration

The command line is ``lorart train`` (``lorart/commands/train.py``).
"""

from __future__ import annotations

from .checkpoint import latest_checkpoint, load_checkpoint, save_peft_adapter
from .data import IGNORE_INDEX, Batch, Example, collate, encode, load_examples, read_jsonl
from .engine import (
    AdapterOptimizer,
    StepResult,
    adapter_loss,
    adapter_rows,
    freeze_all_but_adapters,
    lora_parameters,
    response_losses,
    train_step,
)
from .hf import (
    HFCollator,
    SaveAdaptersCallback,
    hf_dataset,
    prepare_for_hf_trainer,
    restore_hf_model,
)
from .memory import checkpoint_layers, lean_activations, recompute_cheap_outputs
from .trainer import (
    LoRATrainer,
    TrainConfig,
    cast_frozen,
    load_base,
    prepare_for_training,
    resolve_compute_dtype,
    train,
)

__all__ = [
    "IGNORE_INDEX",
    "AdapterOptimizer",
    "Batch",
    "Example",
    "HFCollator",
    "LoRATrainer",
    "SaveAdaptersCallback",
    "StepResult",
    "TrainConfig",
    "adapter_loss",
    "adapter_rows",
    "cast_frozen",
    "checkpoint_layers",
    "collate",
    "encode",
    "freeze_all_but_adapters",
    "hf_dataset",
    "latest_checkpoint",
    "lean_activations",
    "load_base",
    "load_checkpoint",
    "load_examples",
    "lora_parameters",
    "prepare_for_hf_trainer",
    "prepare_for_training",
    "read_jsonl",
    "recompute_cheap_outputs",
    "resolve_compute_dtype",
    "response_losses",
    "restore_hf_model",
    "save_peft_adapter",
    "train",
    "train_step",
]
