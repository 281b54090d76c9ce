"""Greedy generation on SmolLM2-135M: lorart 4-bit vs PEFT ``adapter_names`` on the float model.

    python benchmarks/bench_generate.py                 # batch 16, 1/4/16 adapters, 32 tokens
    python benchmarks/bench_generate.py --new-tokens 16 --repeats 1 --out bench-out/gen.jsonl

Both sides serve the SAME adapters (random PEFT adapters, saved once and loaded into
lorart) on the SAME base weights: lorart keeps the GGUF's exact Q4_1 codes, the float
model is transformers' own GGUF load (those codes dequantized to float32). So both
generate the same tokens (checked), and only the speed and the memory differ.

For each adapter count, the 16 prompts are spread round-robin over the adapters and
one ``generate`` call runs them all (``min_new_tokens = max_new_tokens`` so every run
produces the same number of tokens). Reported: tokens/s (best of ``--repeats``),
the ratio lorart/PEFT, and the resident bytes of each model's weights (parameters and
buffers; adapters counted separately). Results print as a table and, with ``--out``,
as JSON lines with the machine context.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
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
    best, out = float("inf"), None
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
              pad_token_id=pad_id, adapter_names=names)
    for _ in range(repeats):
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**batch, **kw)
        best = min(best, time.perf_counter() - start)
    return best, out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    import lorart
    from lorart.models import default_gguf_path

    path = default_gguf_path()
    t0 = time.perf_counter()
    ours, tok = lorart.from_gguf(path)
    load_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    float_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    float_model.eval()
    load_float = time.perf_counter() - t0
    base_ours, _ = weight_bytes(ours)
    base_float, _ = weight_bytes(float_model)
    linear_ours = sum(m.weight_nbytes() for m in ours.modules()
                      if isinstance(m, lorart.LoRALinear))
    linear_float = sum(m.weight.numel() * m.weight.element_size()
                       for n, m in float_model.named_modules()
                       if isinstance(m, torch.nn.Linear) and n != "lm_head")

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                     add_generation_prompt=True) for q in prompts]
    tok.padding_side = "left"
    batch = tok(texts, return_tensors="pt", padding=True)

    n_max = max(args.adapters)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        peft_model, dirs = make_adapters(float_model, n_max, args.rank, Path(tmp))
        for i, d in enumerate(dirs):
            lorart.load_adapter(ours, d, f"a{i}")
        _, lora_ours = weight_bytes(ours)
        _, lora_peft = weight_bytes(peft_model)
        context = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "backends": {k: v[1] for k, v in lorart.backends().items() if v[0]},
        }
        for count in args.adapters:
            names = [f"a{i % count}" for i in range(args.batch)]
            t_ours, out_ours = timed_generate(ours, batch, names, args.new_tokens, args.repeats,
                                              tok.pad_token_id)
            t_peft, out_peft = timed_generate(peft_model, batch, names, args.new_tokens,
                                              args.repeats, tok.pad_token_id)
            tokens = args.batch * args.new_tokens
            same = (out_ours == out_peft).all(-1).float().mean().item()
            rec = {"bench": "generate", "model": "SmolLM2-135M-Instruct", "batch": args.batch,
                   "adapters": count, "rank": args.rank, "new_tokens": args.new_tokens,
                   "lorart_s": t_ours, "peft_s": t_peft,
                   "lorart_tok_s": tokens / t_ours, "peft_tok_s": tokens / t_peft,
                   "speedup": t_peft / t_ours, "same_tokens_fraction": same,
                   "context": context}
            records.append(rec)
            print(f"{count:>3} adapters: lorart {rec['lorart_tok_s']:7.1f} tok/s   "
                  f"PEFT {rec['peft_tok_s']:7.1f} tok/s   x{rec['speedup']:.2f}   "
                  f"same greedy tokens in {100 * same:.0f}% of sequences", flush=True)
    mem = {"bench": "weights", "lorart_base_bytes": base_ours, "float_base_bytes": base_float,
           "ratio": base_float / base_ours, "lorart_linear_bytes": linear_ours,
           "float_linear_bytes": linear_float, "linear_ratio": linear_float / linear_ours,
           "lorart_adapter_bytes": lora_ours, "peft_adapter_bytes": lora_peft,
           "load_s": {"lorart": load_ours, "float": load_float}, "context": context}
    records.append(mem)
    mb = 1e6
    print(f"weights: lorart {base_ours / mb:.1f} MB vs float {base_float / mb:.1f} MB "
          f"(1/{mem['ratio']:.2f}); linear layers alone {linear_ours / mb:.1f} MB vs "
          f"{linear_float / mb:.1f} MB (1/{mem['linear_ratio']:.2f}); adapters "
          f"{lora_ours / mb:.1f} MB (lorart) / {lora_peft / mb:.1f} MB (PEFT)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
