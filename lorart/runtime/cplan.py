"""The one-token decode step of a ``DecodeSession`` as one C++ call (``lorart._C.DecodePlan``).

At batch 1 the kernels of a SmolLM2 step take ~15 ms at one thread; the torch calls
between them (two RMSNorms, RoPE, two KV-cache writes, SDPA, SiLU·mul, residual adds:
~15 per layer, 30 layers) took another ~7 ms (2026-12-03, shared 2-core CPU,
``benchmarks/bench_vs_llamacpp.py --profile``). ``csrc/cpu/decode_plan.cpp`` runs the
whole step — the same arithmetic as ``DecodeSession.step`` in float32, over the same
kernel tables, KV cache and RoPE tables — in one call without the GIL.

``build_plan(session)`` returns ``None`` (the Python step stays) when any part is not
something the plan runs: activations other than float32, a group no C++ kernel takes,
or no ``lorart._C``.

With ``LlamaDecoder(..., activations="int16" | "int8")`` every 4-bit (asym/sym) and 8-bit
group of group size 32 runs ``csrc/cpu/decode_q8.cpp`` instead (on CPUs with AVX512-VNNI):
x rounded per group of 32 to 16 bits (logits ~7e-5 from float32) or 8 bits (llama.cpp's
Q8 activations, ~2e-2) and integer dot products. ``LORART_DECODE_PLAN=0`` turns the
plan off (the Python step then runs: the reference the plan is tested against).
"""

from __future__ import annotations

import os

import torch

from ..backend.base import buffer


class CompiledStep:
    """``step(token) -> logits [1, vocab]`` through a ``lorart._C.DecodePlan``.

    Holds every tensor the plan points into (norm weights, rope tables, the session's KV
    cache, bound linear groups), so they live as long as the plan.
    """

    def __init__(self, plan, keep: list, session) -> None:
        self.plan = plan
        self._keep = keep
        self.session = session

    def __call__(self, x: torch.Tensor, pos: int) -> torch.Tensor:
        """Logits ``[1, vocab]`` for the embedding ``x [H]`` (float32, a fresh copy: the
        plan overwrites it with the last hidden state) at position ``pos``."""
        d = self.session.decoder
        logits = torch.empty((1, d.vocab), dtype=torch.float32)
        self.plan.step(x=buffer(x), pos=pos, logits=buffer(logits))
        return logits


def build_plan(session) -> CompiledStep | None:
    """A ``CompiledStep`` for ``session`` (a ``DecodeSession``), or ``None`` (see module doc)."""
    if os.environ.get("LORART_DECODE_PLAN", "1").strip() == "0":
        return None
    d = session.decoder
    if d.dtype != torch.float32 or d.device.type != "cpu":
        return None
    try:
        from .._C import DecodePlan
    except ImportError:
        return None
    keep: list = []

    def f32(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().to(torch.float32).contiguous()
        keep.append(t)
        return t

    cos, sin = f32(session.cos), f32(session.sin)
    norm = f32(d.norm)
    inter = session.bound[0][2].out_features // 2
    plan = DecodePlan(n_head=d.n_head, n_kv=d.n_kv, head_dim=d.head_dim, hidden=d.hidden,
                      inter=inter, max_len=session.max_len, vocab=d.vocab,
                      attn_scale=float(d.layers[0].scaling), cos=buffer(cos),
                      sin=buffer(sin), final_norm=buffer(norm), final_eps=float(d.norm_eps))
    for layer, bound, cache in zip(d.layers, session.bound, session.cache):
        if layer.scaling != d.layers[0].scaling:
            return None
        idx = [g.add_to_plan(plan, keep) for g in bound]
        if any(i is None for i in idx):
            return None
        attn_norm, mlp_norm = f32(layer.attn_norm), f32(layer.mlp_norm)
        plan.add_layer(attn_norm=buffer(attn_norm), attn_eps=float(layer.attn_eps),
                       mlp_norm=buffer(mlp_norm), mlp_eps=float(layer.mlp_eps), qkv=idx[0],
                       o=idx[1], gate_up=idx[2], down=idx[3], k_cache=buffer(cache[0]),
                       v_cache=buffer(cache[1]))
    head = session.lm_head.add_to_plan(plan, keep)
    if head is None:
        return None
    plan.set_lm_head(index=head)
    from .._C import cpu_has_vnni

    # Every group with an integer-activation kernel; without VNNI only its scalar reference
    # exists (slower than the float32 kernels), so the float32 kernels stay.
    if d.activations in ("int8", "int16") and cpu_has_vnni():
        for index in range(head + 1):
            plan.set_q8(index=index, bits=8 if d.activations == "int8" else 16)
    return CompiledStep(plan, keep, session)
