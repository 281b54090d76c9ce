"""Next-token choice per request: greedy, or temperature / top-k / top-p sampling with a
per-request ``torch.Generator`` (a seeded request samples the same tokens whatever else
shares its batch)."""

from __future__ import annotations

import torch

from .types import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """The request's own RNG (None for greedy); unseeded requests draw a random seed."""
    if params.greedy:
        return None
    g = torch.Generator()
    g.manual_seed(params.seed if params.seed is not None else int(torch.seed()))
    return g


def sample_row(logits: torch.Tensor, params: SamplingParams,
               generator: torch.Generator | None) -> int:
    """One token id from ``logits [V]`` (float32)."""
    if params.greedy:
        return int(torch.argmax(logits))
    scores = logits / params.temperature
    if 0 < params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always >= 1 token)
        drop = torch.cumsum(sorted_p, 0) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """Token ids for ``logits [R, V]``, row ``i`` with ``params[i]``; greedy rows share
    one argmax."""
    greedy = logits.argmax(dim=-1).tolist()
    return [greedy[i] if p.greedy else sample_row(logits[i], p, g)
            for i, (p, g) in enumerate(zip(params, generators))]
