"""SmolLM2 from ``lorart.from_gguf()``: whole-model bytes and batch-1 greedy decode tok/s,
with the Q8_0 tied embedding/output kept 8-bit (now) vs dequantized to float32 (before
issue #14: an ``nn.Embedding`` plus ``BaseLinear`` over the same float32 matrix), in one
process, alternating runs.

    python benchmarks/bench_gguf_model.py [--tokens 32] [--runs 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import lorart
from lorart.layers import BaseLinear
from lorart.model_io import model_nbytes
from lorart.models import default_gguf_path


def float_output_variant(model: nn.Module) -> nn.Module:
    """The same model with the embedding/output matrix dequantized to float32 (the layout
    before #14), tied as before."""
    import copy

    old = copy.copy(model)  # shallow: the decoder layers are shared, only the ends differ
    old._modules = dict(model._modules)
    old._modules["model"] = copy.copy(model.model)
    old.model._modules = dict(model.model._modules)
    weight = model.model.embed_tokens.base.dequantize()
    emb = nn.Embedding(*weight.shape, _weight=weight)
    emb.weight.requires_grad_(False)
    old.model._modules["embed_tokens"] = emb
    head = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    head.weight = emb.weight
    old._modules["lm_head"] = BaseLinear.wrap(head)
    return old


def decode_tok_s(model, ids, tokens: int) -> float:
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        dt = time.perf_counter() - t0
    assert out.shape[1] == ids.shape[1] + tokens
    return tokens / dt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    model, tok = lorart.from_gguf()
    before = float_output_variant(model)
    file_bytes = default_gguf_path().stat().st_size
    ids = tok.apply_chat_template([{"role": "user", "content": "Tell me about Paris."}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    rates = {"before (fp32 embedding/output)": [], "after (Q8_0 kept 8-bit)": []}
    variants = dict(zip(rates, (before, model)))
    for m in variants.values():
        decode_tok_s(m, ids, 4)  # warm-up
    for _ in range(args.runs):
        for name, m in variants.items():
            rates[name].append(decode_tok_s(m, ids, args.tokens))
    print(f"threads={torch.get_num_threads()} gguf file {file_bytes / 1e6:.1f} MB, "
          f"{args.tokens} greedy tokens, batch 1, median of {args.runs}")
    for name, m in variants.items():
        b = model_nbytes(m)
        print(f"{name:32} {b / 1e6:7.1f} MB ({b / file_bytes:.2f}x file)  "
              f"{statistics.median(rates[name]):6.1f} tok/s  (runs: "
              f"{', '.join(f'{r:.1f}' for r in rates[name])})")


if __name__ == "__main__":
    main()
