"""Greedy generation on SmolLM2-135M with many adapters: lorart 4-bit, lorart dense float32,
and PEFT ``adapter_names`` on the float32 model, side by side in one run.

    python benchmarks/bench_generate.py                 # batch 16, 1/4/16 adapters, 32 tokens
    python benchmarks/bench_generate.py --new-tokens 16 --repeats 1 --out bench-out/gen.jsonl
    python benchmarks/bench_generate.py --batch 1 --adapters 1   # lorart's batch-1 decoder

All three serve the SAME adapters (random PEFT adapters, saved once and loaded into lorart)
on the SAME base weights: lorart 4-bit keeps the GGUF's exact Q4_1 codes; lorart dense and
the PEFT model hold those codes dequantized to float32 (``lorart.from_gguf(quantized=False)``
and transformers' own GGUF load). So all generate the same tokens (checked), and two wins
are reported separately: **kernels** (lorart dense ÷ PEFT, both float32 weights) and
**4-bit** (lorart 4-bit ÷ lorart float32: the same runtime reading ~1/6 of the linear
layers' bytes).

For each adapter count, the prompts are spread round-robin over the adapters and one
``generate`` call runs them all (``min_new_tokens = max_new_tokens`` so every run produces
the same number of tokens). Reported: tokens/s (best of ``--repeats``), the ratios, and the
resident bytes of each model's weights (parameters and buffers; adapters counted apart).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "What is the capital of France?", "Name three colors.", "What do bees make?",
    "Describe the sea in one sentence.", "Give me a JSON object with a name.",
    "Why is the sky blue?", "Write a haiku about rain.", "What is 7 times 8?",
    "Name a famous painter.", "How do plants grow?", "What is a noun?",
    "Tell me a fun fact.", "What is the largest planet?", "Say hello in Spanish.",
    "What is water made of?", "Suggest a name for a cat.",
]
# name -> what it is, in the order of the table
VARIANTS = {"lorart_q4": "lorart 4-bit (Q4_1)", "lorart_dense": "lorart float32",
            "peft": "PEFT float32"}


def weight_bytes(model: torch.nn.Module, exclude: str = "lora_") -> tuple[int, int]:
    """``(base bytes, adapter bytes)`` of parameters and persistent buffers, shared tensors once."""
    seen, base, lora = set(), 0, 0
    tensors = list(model.named_parameters(remove_duplicate=False))
    tensors += [(n, b) for n, b in model.named_buffers(remove_duplicate=False)
                if not n.endswith("inv_freq")]
    for name, t in tensors:
        if t is None or t.data_ptr() in seen or t.numel() == 0:
            continue
        seen.add(t.data_ptr())
        nbytes = t.numel() * t.element_size()
        if exclude in name:
            lora += nbytes
        else:
            base += nbytes
    return base, lora


def make_adapters(float_model, count: int, rank: int, root: Path):
    """A PEFT model with ``count`` random adapters ``a0..`` on all linear layers (scale
    0.25, so text stays readable), saved under ``root/a<i>``; returns (model, dirs)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=rank / 4, target_modules="all-linear",
                     init_lora_weights=False)
    torch.manual_seed(1000)
    pm = get_peft_model(float_model, cfg, adapter_name="a0")
    for i in range(1, count):
        torch.manual_seed(1000 + i)
        pm.add_adapter(f"a{i}", cfg)
    pm.save_pretrained(root)  # adapters not named "default" go to root/<name>
    return pm.eval(), [root / f"a{i}" for i in range(count)]


def timed_generate(model, batch, names, new_tokens, repeats, pad_id):
    """``(best seconds, output ids)`` of ``repeats`` greedy ``generate`` calls.

    At ``--batch 1`` the lorart models' ``generate`` takes the lean batch-1 decoder
    (``lorart.runtime``; ``decode_path`` in the record says which loop ran)."""
    best, out = float("inf"), None
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=pad_id, adapter_names=names)
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, **kw)
        best = min(best, time.perf_counter() - start)
    return best, out


def load_models(path: Path) -> tuple[dict, dict]:
    """``({variant: model}, {variant: load seconds})``; PEFT's is the float transformers
    model (its adapters are added later)."""
    import lorart

    from .e2e import load_float_model

    loaders = {"lorart_q4": lambda: lorart.from_gguf(path, tokenizer=False)[0],
               "lorart_dense": lambda: lorart.from_gguf(path, quantized=False,
                                                        tokenizer=False)[0],
               "peft": lambda: load_float_model(path).eval()}
    models, load_s = {}, {}
    for variant, load in loaders.items():
        t0 = time.perf_counter()
        models[variant] = load()
        load_s[variant] = time.perf_counter() - t0
    return models, load_s


def linear_bytes(model) -> int:
    """Bytes of the decoder's linear layers' weights (the output layer excluded)."""
    import lorart

    return sum(m.weight_nbytes() if isinstance(m, lorart.LoRALinear)
               else m.weight.numel() * m.weight.element_size()
               for n, m in model.named_modules()
               if isinstance(m, lorart.LoRALinear | torch.nn.Linear) and "lm_head" not in n)


def run(adapter_counts: list[int], batch_size: int, new_tokens: int, rank: int,
        repeats: int) -> list[dict]:
    """One record per adapter count (tokens/s of every variant and the ratios), then one
    record of weight bytes; prints a line per record."""
    import lorart
    from lorart.models import default_gguf_path
    from lorart.models.gguf_llama import load_tokenizer

    from .machine import context as machine_context

    path = default_gguf_path()
    models, load_s = load_models(path)
    tok = load_tokenizer(path)
    weights = {v: weight_bytes(m)[0] for v, m in models.items()}
    linear = {v: linear_bytes(m) for v, m in models.items()}
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch_size)]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                     add_generation_prompt=True) for q in prompts]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True)
    ctx = machine_context(torch.device("cpu"))
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        models["peft"], dirs = make_adapters(models["peft"], max(adapter_counts), rank,
                                             Path(tmp))
        for variant in ("lorart_q4", "lorart_dense"):
            for i, d in enumerate(dirs):
                lorart.load_adapter(models[variant], d, f"a{i}")
        for count in adapter_counts:
            names = [f"a{i % count}" for i in range(batch_size)]
            seconds, outs, paths = {}, {}, {}
            for variant, model in models.items():
                seconds[variant], outs[variant] = timed_generate(
                    model, batch, names, new_tokens, repeats, tok.pad_token_id)
                paths[variant] = getattr(model.generate, "last_path", "transformers")
            tokens = batch_size * new_tokens
            rec = {"bench": "generate", "model": "SmolLM2-135M-Instruct", "batch": batch_size,
                   "adapters": count, "rank": rank, "new_tokens": new_tokens,
                   "seconds": seconds, "tok_s": {v: tokens / s for v, s in seconds.items()},
                   "kernel_speedup": seconds["peft"] / seconds["lorart_dense"],
                   "q4_speedup": seconds["lorart_dense"] / seconds["lorart_q4"],
                   "speedup": seconds["peft"] / seconds["lorart_q4"],
                   "same_tokens_fraction": {
                       v: (outs[v] == outs["peft"]).all(-1).float().mean().item()
                       for v in ("lorart_q4", "lorart_dense")},
                   "decode_path": paths, "context": ctx}
            records.append(rec)
            t = rec["tok_s"]
            print(f"{count:>3} adapters: lorart 4-bit {t['lorart_q4']:7.1f}  lorart fp32 "
                  f"{t['lorart_dense']:7.1f}  PEFT fp32 {t['peft']:7.1f} tok/s   kernels "
                  f"x{rec['kernel_speedup']:.2f}  4-bit x{rec['q4_speedup']:.2f}  total "
                  f"x{rec['speedup']:.2f}   same greedy tokens as PEFT: "
                  + ", ".join(f"{v} {100 * f:.0f}%"
                              for v, f in rec["same_tokens_fraction"].items())
                  + f"   decode loop: lorart {paths['lorart_q4']}", flush=True)
    mem = {"bench": "weights", "base_bytes": weights, "linear_bytes": linear,
           "ratio": weights["peft"] / weights["lorart_q4"],
           "linear_ratio": linear["peft"] / linear["lorart_q4"], "load_s": load_s,
           "context": ctx}
    records.append(mem)
    print("weights: " + ", ".join(f"{VARIANTS[v]} {weights[v] / 1e6:.1f} MB (linear layers "
                                  f"{linear[v] / 1e6:.1f} MB)" for v in VARIANTS)
          + f"; 4-bit vs float: 1/{mem['ratio']:.2f} (linear 1/{mem['linear_ratio']:.2f})")
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16],
                   help="adapter counts, one generate call each")
    p.add_argument("--batch", type=int, default=16, help="prompts per generate call")
    p.add_argument("--new-tokens", type=int, default=32, help="new tokens per prompt")
    p.add_argument("--rank", type=int, default=8, help="rank of every adapter")
    p.add_argument("--repeats", type=int, default=2, help="best of this many calls")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    records = run(args.adapters, args.batch, args.new_tokens, args.rank, args.repeats)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return 0
