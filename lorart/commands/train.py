"""``lorart train``: fine-tune LoRA adapters on a 4-bit base from JSONL prompt/response data.

    lorart train --data pirate=lorart/data/train/pirate.jsonl --rank 8 --steps 150 --output-dir out
    lorart train --data upper=u.jsonl --data json=j.jsonl   # two adapters, one run, mixed batches
    lorart train --base HuggingFaceTB/SmolLM2-360M-Instruct --data x.jsonl  # any HF causal LM
    lorart train ... --resume                                 # continue from the last checkpoint

Writes ``<output-dir>/<adapter>/`` (PEFT format), ``<output-dir>/checkpoint-<step>/`` and
``<output-dir>/train_log.json`` (per-step losses, tokens, seconds).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from ..cli import UserError

NAME = "train"
HELP = "fine-tune LoRA adapters on a 4-bit base model"


def _data_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    if not sep:  # a bare path: the adapter is named after the file
        return Path(value).stem, value
    if not name or not path:
        raise argparse.ArgumentTypeError(f"--data must be NAME=PATH or PATH, got {value!r}")
    return name, path


def _targets(value: str):
    return value if value in ("all-linear",) or "*" in value else value.split(",")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``lorart train`` options (also used by ``python -m lorart.commands.train``)."""
    p.add_argument("--data", type=_data_arg, action="append", required=True,
                   metavar="NAME=PATH", help="JSONL of {prompt, response} records for adapter "
                   "NAME (a bare PATH names the adapter after the file); repeat to train "
                   "several adapters in one run, e.g. --data pirate=lorart/data/train/"
                   "pirate.jsonl")
    p.add_argument("--base", default=None, metavar="MODEL",
                   help="transformers model name or path (default: SmolLM2-135M-Instruct "
                   "Q4_1 GGUF via lorart.from_gguf)")
    p.add_argument("--output-dir", default="lorart-out", metavar="DIR",
                   help="where adapters, checkpoints and train_log.json go")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=float, default=None,
                   help="lora_alpha; the scale is alpha/rank (default: 2*rank)")
    p.add_argument("--target-modules", type=_targets, default=["q_proj", "v_proj"],
                   metavar="NAMES", help="comma-separated module names, a regex, or "
                   "all-linear")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (AdamW)")
    p.add_argument("--lr-schedule", default="cosine", choices=["constant", "linear", "cosine"],
                   help="learning-rate decay after the warmup")
    p.add_argument("--warmup-steps", type=int, default=None, metavar="N",
                   help="linear warmup steps, at most --steps (default: 10, or a tenth of "
                   "--steps when that is fewer)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--max-grad-norm", type=float, default=1.0,
                   help="clip each adapter's gradient norm to this (0: no clipping)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=8,
                   help="sequences per step (all adapters mixed)")
    p.add_argument("--max-length", type=int, default=256,
                   help="tokens per sequence; longer examples are cut")
    p.add_argument("--seed", type=int, default=0, help="seed of initialization and batch order")
    p.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="checkpoint every N steps (default: 0, only at the end)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16",
                                                                "float16"],
                   help="dtype of the saved PEFT adapter weights")
    p.add_argument("--system", default=None, metavar="TEXT",
                   help="system prompt for every example (default: none)")
    p.add_argument("--group-size", type=int, default=None,
                   help="4-bit group size for --base models (default: the largest of "
                   "128/64/32 that fits)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, ~1 more forward")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in --output-dir, or CHECKPOINT "
                   "(default: start afresh)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def default_warmup(steps: int) -> int:
    """10 warmup steps, or a tenth of a shorter run."""
    return min(10, steps // 10)


def check_arguments(args: argparse.Namespace):
    """Everything that can be checked before the model loads; returns the ``TrainConfig``.

    Data files are read (every line parsed) and the target modules are matched against
    the model's module tree built from its config alone, so a typo costs seconds.
    """
    from ..train import TrainConfig
    from ..train.checkpoint import latest_checkpoint
    from ..train.data import read_jsonl
    from ._checks import check_environment, check_target_modules, model_skeleton

    names = [n for n, _ in args.data]
    if len(set(names)) != len(names):
        raise UserError(f"adapter names repeat in --data: {names}")
    for name, path in args.data:
        if not Path(path).is_file():
            raise UserError(f"--data {name}={path}: no such file")
        try:
            read_jsonl(path)
        except (OSError, ValueError) as exc:
            raise UserError(f"--data {name}={path}: {exc}") from None
    warmup = default_warmup(args.steps) if args.warmup_steps is None else args.warmup_steps
    if warmup > args.steps:
        raise UserError(f"--warmup-steps {warmup} is more than --steps {args.steps}")
    if args.alpha is not None and args.alpha <= 0:
        raise UserError(f"--alpha must be positive, got {args.alpha}")
    if args.max_grad_norm < 0 or args.weight_decay < 0:
        raise UserError("--max-grad-norm and --weight-decay must be >= 0")
    if args.resume is True and latest_checkpoint(args.output_dir) is None:
        raise UserError(f"--resume: no checkpoint-<step> directory in {args.output_dir}")
    if isinstance(args.resume, str) and not Path(args.resume).is_dir():
        raise UserError(f"--resume {args.resume}: no such checkpoint directory")
    try:
        cfg = TrainConfig(
            data=dict(args.data), output_dir=args.output_dir, base=args.base, rank=args.rank,
            lora_alpha=args.alpha, target_modules=args.target_modules, lr=args.lr,
            lr_schedule=args.lr_schedule, warmup_steps=warmup,
            weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, steps=args.steps,
            batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
            save_every=args.save_every, save_dtype=args.save_dtype, system=args.system,
            group_size=args.group_size, gradient_checkpointing=args.gradient_checkpointing)
    except ValueError as exc:  # TrainConfig names its fields; the user typed flags
        flagged = re.sub(r"^(\w+) ", lambda m: f"--{m[1].replace('_', '-')} ", str(exc))
        raise UserError(flagged) from None
    check_environment("cpu")
    check_target_modules(model_skeleton(args.base), args.target_modules)
    return cfg


def run(args: argparse.Namespace) -> int:
    cfg = check_arguments(args)
    from ..train import train

    t0 = time.perf_counter()
    trainer = train(cfg, resume=args.resume, progress=not args.no_progress)
    seconds = time.perf_counter() - t0
    log = {
        "config": cfg.to_dict(),
        "seconds_total": round(seconds, 1),
        "steps": trainer.step,
        "trainable_parameters": trainer.num_trainable,
        "history": [{"loss": r.loss, "adapter_losses": r.adapter_losses, "tokens": r.tokens}
                    for r in trainer.history],
    }
    out = Path(cfg.output_dir)
    (out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")
    last = trainer.history[-1] if trainer.history else None
    print(f"trained {', '.join(trainer.names)}: {trainer.step} steps in {seconds:.0f} s"
          + (f", final losses {last.adapter_losses}" if last else ""))
    for n in trainer.names:
        print(f"  {n}: {out / n}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..cli import standalone

    return standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
