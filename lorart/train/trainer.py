"""``LoRATrainer`` and ``train()``: fine-tune one or several LoRA adapters on a 4-bit base.

    from lorart.train import TrainConfig, train
    cfg = TrainConfig(data={"pirate": "pirate.jsonl"}, rank=8, steps=100,
                      output_dir="out")
    train(cfg)                        # SmolLM2-135M-Instruct Q4_1 via lorart.from_gguf()
    train(cfg, model=m, tokenizer=t)  # any lorart-patched causal LM

Several entries in ``data`` train several adapters in one run: every batch mixes
rows of all of them (see ``lorart.train.engine``). Adapters are written in PEFT
format to ``<output_dir>/<name>/``; checkpoints to ``<output_dir>/checkpoint-<step>/``.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..patch import add_adapter, lora_layers, patch, patch_state
from .checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    restore_adapters,
    save_checkpoint,
    save_peft_adapter,
)
from .data import Example, batch_order, collate, load_examples
from .engine import (
    AdapterOptimizer,
    StepResult,
    freeze_all_but_adapters,
    lr_lambda,
    rng_state,
    set_rng_state,
    train_step,
)
from .memory import BLOCKS, Handle, checkpoint_layers, lean_activations

DEFAULT_TARGETS = ("q_proj", "v_proj")
_COMPUTE_DTYPES = {"auto": None, "bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class TrainConfig:
    """Everything that defines a training run (saved in every checkpoint).

    ``data`` maps adapter name -> JSONL file of ``{"prompt", "response"}`` records.
    ``base`` is ``None`` for SmolLM2-135M-Instruct (4-bit GGUF via ``lorart.from_gguf``)
    or a transformers model name/path (loaded in float32, patched with 4-bit weights).
    ``lora_alpha`` defaults to ``2 * rank``.

    Memory and speed (see ``lorart.train.memory``; all on by default except checkpointing):
    ``compute_dtype``: ``"auto"`` (bfloat16 where the device has native bf16 GEMMs, else
    float32), ``"bfloat16"`` or ``"float32"``: the frozen float weights (embeddings,
    norms, dense bases, output layer) are cast to it, so activations and the backward run
    in it; the LoRA parameters and optimizer state stay float32 (QLoRA-style).
    ``lean_activations``: RMSNorm and SwiGLU that save no float32 copies.
    ``gradient_checkpointing``: ``False``, ``True`` (= ``"layer"``), ``"layer"``,
    ``"mlp"`` or ``"attn"``: that block of every ``checkpoint_every``-th decoder layer
    is recomputed in the backward (far less memory for up to one more forward).
    The loss is always the fused output layer + cross-entropy (``lorart.losses``).
    """

    data: dict[str, str] = field(default_factory=dict)
    output_dir: str = "lorart-out"
    base: str | None = None
    rank: int = 8
    lora_alpha: float | None = None
    target_modules: list[str] | str = field(default_factory=lambda: list(DEFAULT_TARGETS))
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    warmup_steps: int = 10
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    steps: int = 100
    batch_size: int = 8
    max_length: int = 256
    seed: int = 0
    save_every: int = 0
    save_dtype: str = "float32"
    system: str | None = None
    group_size: int | None = None
    gradient_checkpointing: bool | str = False
    checkpoint_every: int = 1
    compute_dtype: str = "auto"
    lean_activations: bool = True

    def __post_init__(self) -> None:
        for name, value in (("rank", self.rank), ("steps", self.steps),
                            ("batch_size", self.batch_size), ("max_length", self.max_length)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if self.save_every < 0 or self.warmup_steps < 0:
            raise ValueError("save_every and warmup_steps must be >= 0")
        lr_lambda(self.lr_schedule, 0, 1)  # validates the schedule name
        if self.compute_dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be one of {list(_COMPUTE_DTYPES)}, got "
                             f"{self.compute_dtype!r}")
        if self.gradient_checkpointing not in (False, True, *BLOCKS):
            raise ValueError(f"gradient_checkpointing must be a bool or one of {BLOCKS}, got "
                             f"{self.gradient_checkpointing!r}")
        if not isinstance(self.checkpoint_every, int) or self.checkpoint_every <= 0:
            raise ValueError(f"checkpoint_every must be a positive int, got "
                             f"{self.checkpoint_every!r}")

    @property
    def alpha(self) -> float:
        return float(2 * self.rank if self.lora_alpha is None else self.lora_alpha)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _group_size_for(model: nn.Module) -> int:
    """Largest 4-bit group size (128, 64, 32) dividing every linear layer's in_features."""
    ins = [m.in_features for m in model.modules() if isinstance(m, nn.Linear)]
    for g in (128, 64, 32):
        if all(k % g == 0 for k in ins):
            return g
    raise ValueError(f"no group size in (128, 64, 32) divides every in_features {set(ins)}")


def load_base(base: str | None = None, group_size: int | None = None):
    """``(model, tokenizer)`` with 4-bit base weights, ready for adapters.

    ``None``: SmolLM2-135M-Instruct from its Q4_1 GGUF (``lorart.from_gguf``). A name or
    path: ``AutoModelForCausalLM`` in float32, every linear layer but the output layer
    quantized (``lorart.patch(model, "all-linear", quantize="int4")``).
    """
    if base is None:
        import lorart

        model, tokenizer = lorart.from_gguf()
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        patch(model, "all-linear", quantize="int4",
              group_size=group_size or _group_size_for(model))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def enable_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (works with a frozen base whose
    inputs need no grad)."""
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise TypeError(f"{type(model).__name__} has no gradient_checkpointing_enable()")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model, "config", None) is not None:
        model.config.use_cache = False


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` runs bfloat16 GEMMs natively (CUDA with bf16; a CPU whose oneDNN
    has AVX512-BF16/AMX kernels), i.e. whether bf16 compute is the faster choice."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return False


def resolve_compute_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """``"auto"`` -> bfloat16 where :func:`native_bf16`, else float32; otherwise the named dtype."""
    if name not in _COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {list(_COMPUTE_DTYPES)}, got {name!r}")
    if name == "auto":
        return torch.bfloat16 if native_bf16(device) else torch.float32
    return _COMPUTE_DTYPES[name]


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> int:
    """Cast every frozen float parameter of ``model`` to ``dtype`` (trained ones, the LoRA
    weights, stay as they are); returns how many were cast. Packed 4/8-bit buffers and
    float32 buffers (rotary frequencies) are untouched; a packed embedding
    (``QuantizedEmbedding``, GGUF models) is set to output ``dtype``, since its output is
    what sets the activations' dtype for the whole model."""
    from ..embedding import QuantizedEmbedding

    n = 0
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)
            n += 1
    for m in model.modules():
        if isinstance(m, QuantizedEmbedding) and m.dtype != dtype:
            m.dtype = dtype
            n += 1
    return n


def prepare_for_training(model: nn.Module, compute_dtype: str = "auto", lean: bool = True,
                         gradient_checkpointing: bool | str = False,
                         checkpoint_every: int = 1) -> Handle:
    """Set up a model whose adapters are already trainable (and the rest frozen) for
    lorart's training step: frozen weights in the compute dtype, lean activations,
    optional selective checkpointing, no KV cache. Returns a handle whose ``remove()``
    undoes the module changes (not the dtype cast)."""
    device = next(model.parameters()).device
    cast_frozen(model, resolve_compute_dtype(compute_dtype, device))
    handles = []
    if lean:
        handles.append(lean_activations(model))
    if gradient_checkpointing:
        block = "layer" if gradient_checkpointing is True else gradient_checkpointing
        handles.append(checkpoint_layers(model, block, every=checkpoint_every))
    if getattr(model, "config", None) is not None and hasattr(model.config, "use_cache"):
        model.config.use_cache = False
    return _Handles(handles)


class _Handles(Handle):
    def __init__(self, handles: list[Handle]) -> None:
        super().__init__([m for h in handles for m in h.modules])
        self.handles = handles

    def remove(self) -> None:
        for h in reversed(self.handles):  # checkpoint wrappers before lean forwards
            h.remove()
        self.modules = []


class LoRATrainer:
    """A plain torch training loop over lorart adapters (see module doc).

    Args:
        model: a causal LM whose linear layers are (or will be) lorart ``LoRALinear``.
        tokenizer: its tokenizer, with a chat template.
        config: a :class:`TrainConfig`.
        examples: already tokenized examples (each with ``adapter`` set); default:
            ``config.data`` read and tokenized.
    """

    def __init__(self, model: nn.Module, tokenizer, config: TrainConfig,
                 examples: list[Example] | None = None) -> None:
        self.model, self.tokenizer, self.config = model, tokenizer, config
        if examples is None:
            if not config.data:
                raise ValueError("config.data is empty: give {adapter_name: jsonl_path}")
            examples = []
            for name, path in config.data.items():
                examples += load_examples(path, tokenizer, config.max_length, name,
                                          config.system)
        if not examples:
            raise ValueError("no training examples")
        self.examples = examples
        self.names = list(dict.fromkeys(e.adapter for e in examples if e.adapter is not None))
        if not self.names:
            raise ValueError("no example names an adapter (Example.adapter is None for all)")
        self._add_adapters()
        self.num_trainable = freeze_all_but_adapters(model, self.names)
        self.handle = prepare_for_training(model, config.compute_dtype, config.lean_activations,
                                           config.gradient_checkpointing,
                                           config.checkpoint_every)
        torch.manual_seed(config.seed)
        self.optimizer = AdapterOptimizer(model, self.names, config.lr, config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer.optimizer, lr_lambda(config.lr_schedule, config.warmup_steps,
                                                config.steps))
        self.step = 0
        self.history: list[StepResult] = []

    def _add_adapters(self) -> None:
        cfg, model = self.config, self.model
        if patch_state(model) is None and not any(True for _ in lora_layers(model)):
            patch(model, cfg.target_modules)
        existing = {n for _, layer in lora_layers(model) for n in layer.adapter_names}
        for name in self.names:
            if name not in existing:
                # Seeded per adapter so each adapter's init does not depend on the others.
                torch.manual_seed(cfg.seed + sum(map(ord, name)))
                add_adapter(model, name, r=cfg.rank, lora_alpha=cfg.alpha,
                            target_modules=cfg.target_modules)

    # ------------------------------------------------------------------ steps
    def next_batch(self):
        idx = batch_order(len(self.examples), self.config.batch_size, self.step,
                          self.config.seed)
        return collate([self.examples[i] for i in idx], self._pad_id())

    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else (self.tokenizer.eos_token_id or 0)

    def train_step(self) -> StepResult:
        """Draw the next batch (a pure function of step and seed) and train on it."""
        self.model.train()
        result = train_step(self.model, self.next_batch(), self.optimizer,
                            self.config.max_grad_norm, self.scheduler)
        self.step += 1
        self.history.append(result)
        return result

    def fit(self, progress: bool = True) -> list[StepResult]:
        """Train until ``config.steps``; checkpoints every ``save_every`` steps and at the end."""
        from tqdm.auto import tqdm

        cfg = self.config
        bar = tqdm(total=cfg.steps, initial=self.step, disable=not progress, unit="step",
                   dynamic_ncols=True)
        tokens, t0 = 0, time.perf_counter()
        while self.step < cfg.steps:
            r = self.train_step()
            tokens += r.tokens
            elapsed = time.perf_counter() - t0
            losses = " ".join(f"{n}={v:.3f}" for n, v in r.adapter_losses.items())
            # r.loss: the mean of the adapters' losses (each shown too), not their sum
            bar.set_postfix_str(f"loss {r.loss:.3f} [{losses}] {tokens / elapsed:.0f} tok/s")
            bar.update(1)
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save_checkpoint()
        bar.close()
        self.save_checkpoint()
        self.save_adapters()
        return self.history

    # ------------------------------------------------------------------ saving
    def save_adapters(self, output_dir: str | None = None) -> list[Path]:
        """Each adapter in PEFT format under ``<output_dir>/<name>/``."""
        root = Path(output_dir or self.config.output_dir)
        return [save_peft_adapter(self.model, root / n, n, self.config.save_dtype,
                                  self.config.base) for n in self.names]

    def save_checkpoint(self, path: str | None = None) -> Path:
        path = path or Path(self.config.output_dir) / f"checkpoint-{self.step}"
        return save_checkpoint(path, self.model, self.names, self.optimizer, self.scheduler,
                               self.step, rng_state(), self.config.to_dict())

    def resume(self, path: str | None = None) -> int:
        """Continue from a checkpoint (default: the latest in ``output_dir``); returns its step.

        Restores exact adapter weights, optimizer moments, scheduler, step and RNGs.
        """
        path = path or latest_checkpoint(self.config.output_dir)
        if path is None:
            raise FileNotFoundError(f"no checkpoint in {self.config.output_dir}")
        state = load_checkpoint(path)
        if sorted(state["adapters"]) != sorted(self.names):
            raise ValueError(f"checkpoint {path} trains adapters {sorted(state['adapters'])}, "
                             f"this run {sorted(self.names)}")
        restore_adapters(self.model, state)
        self.optimizer.optimizer.load_state_dict(state["optimizer"])
        if state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        return self.step


def train(config: TrainConfig, model: nn.Module | None = None, tokenizer=None,
          resume: bool | str = False, progress: bool = True) -> LoRATrainer:
    """Run a whole training job (see module doc); returns the finished trainer.

    ``resume=True`` continues from the latest checkpoint in ``config.output_dir``, a
    path from that checkpoint.
    """
    if (model is None) != (tokenizer is None):
        raise ValueError("give both model and tokenizer, or neither")
    if model is None:
        model, tokenizer = load_base(config.base, config.group_size)
    trainer = LoRATrainer(model, tokenizer, config)
    if resume:
        trainer.resume(None if resume is True else str(resume))
    trainer.fit(progress)
    return trainer
