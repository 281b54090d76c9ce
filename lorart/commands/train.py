"""``lorart train``: fine-tune LoRA adapters on a 4-bit base from JSONL prompt/response data.

    lorart train --data pirate=pirate.jsonl --rank 8 --steps 150 --output-dir out
    lorart train --data upper=u.jsonl --data json=j.jsonl   # two adapters, one run, mixed batches
    lorart train --base HuggingFaceTB/SmolLM2-360M-Instruct --data x.jsonl  # any HF causal LM
    lorart train ... --resume                                 # continue from the last checkpoint

Writes ``<output-dir>/<adapter>/`` (PEFT format), ``<output-dir>/checkpoint-<step>/`` and
``<output-dir>/train_log.json`` (per-step losses, tokens, seconds).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

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
                   metavar="NAME=PATH", help="JSONL of {prompt, response} for adapter NAME; "
                   "repeat to train several adapters in one run")
    p.add_argument("--base", default=None, help="transformers model name/path (default: "
                   "SmolLM2-135M-Instruct Q4_1 GGUF via lorart.from_gguf)")
    p.add_argument("--output-dir", default="lorart-out")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=None, help="lora_alpha (default 2*rank)")
    p.add_argument("--target-modules", type=_targets, default=["q_proj", "v_proj"],
                   help="comma-separated module names, a regex, or all-linear "
                   "(default q_proj,v_proj)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-schedule", default="cosine", choices=["constant", "linear", "cosine"])
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--max-grad-norm", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps "
                   "(0: only at the end)")
    p.add_argument("--save-dtype", default="float32", choices=["float32", "bfloat16",
                                                                "float16"],
                   help="dtype of the saved PEFT adapter weights")
    p.add_argument("--system", default=None, help="system prompt for every example")
    p.add_argument("--group-size", type=int, default=None,
                   help="4-bit group size for --base models (default: largest that fits)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward: less memory, ~1 more forward")
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT",
                   help="continue from the latest checkpoint in --output-dir, or CHECKPOINT")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")


def run(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, train

    names = [n for n, _ in args.data]
    if len(set(names)) != len(names):
        print(f"lorart train: adapter names repeat in --data: {names}", file=sys.stderr)
        return 2
    try:
        cfg = TrainConfig(
            data=dict(args.data), output_dir=args.output_dir, base=args.base, rank=args.rank,
            lora_alpha=args.alpha, target_modules=args.target_modules, lr=args.lr,
            lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
            weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, steps=args.steps,
            batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
            save_every=args.save_every, save_dtype=args.save_dtype, system=args.system,
            group_size=args.group_size, gradient_checkpointing=args.gradient_checkpointing)
    except ValueError as e:
        print(f"lorart train: {e}", file=sys.stderr)
        return 2
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
    p = argparse.ArgumentParser(prog="lorart train", description=HELP)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
