"""A step of ONE running sequence through the batch-1 C++ decode step (``lorart.runtime``).

With a single sequence the engine's packed-token step cost ~3x ``model.generate``'s
(RESULTS.md, 2026-12-03: 27 vs 80 tok/s at one thread on SmolLM2): one op call per
projection and per norm over the paged cache. When a step is one token of one request,
``SoloDecoder`` runs it through a ``DecodeSession`` instead:

    session cache [n_kv, max_len, d] per layer  <- paged slots 0..pos-1   (once, on entry)
    logits = session.step(token)                   the one-call C++ step (float32)
    paged slot of pos <- session cache[:, pos]     (every step: the request can rejoin a
                                                    batched step at any time)

Float32 activations, the engine's own arithmetic (logits equal to ~1e-6, not bit for
bit: a different summation order). The session is kept while the same request stays
alone; anything else (a second request, a preemption, another request) starts over from
the paged cache. ``LORART_ENGINE_SOLO=0`` turns it off.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .kv_cache import PagedKVCache

# A session's static cache holds max_len = prompt + max_tokens positions up front, outside
# the engine's memory budget (engine.memory_plan): above this, the request stays batched
# (SmolLM2: 46 KB per position, so up to ~1400 positions).
MAX_SESSION_CACHE_BYTES = 64 << 20


class SoloDecoder:
    """Runs a lone request's step through the batch-1 decoder where the model allows."""

    def __init__(self, model: nn.Module, kv: PagedKVCache, max_context: int,
                 allowed: bool = True) -> None:
        from ..runtime.llama import unsupported

        self.model, self.kv, self.max_context = model, kv, max_context
        self.enabled = (allowed and os.environ.get("LORART_ENGINE_SOLO", "1").strip() != "0"
                        and unsupported(model) is None
                        and kv.k[0].dtype == torch.float32 and kv.k[0].device.type == "cpu")
        self._decoder = None
        self._req = None
        self._session = None

    def _decoder_for(self):
        if self._decoder is None:
            from ..runtime.llama import LlamaDecoder

            self._decoder = LlamaDecoder(self.model, activations="float32")
        return self._decoder

    def logits(self, req, slots: torch.Tensor) -> torch.Tensor | None:
        """Logits ``[1, V]`` after appending ``req``'s token at position ``req.num_computed``
        (its K/V also written to the paged slot ``slots[pos]``), or ``None`` when this step
        must run batched. ``slots [pos + 1]``: the request's slot of every position."""
        if not self.enabled:
            return None
        pos = req.num_computed
        session = self._session
        if session is None or self._req is not req or session.pos != pos:
            session = self._start(req, slots, pos)
            if session is None:
                return None
        logits = session.step(req.all_ids[pos])
        slot = slots[pos]
        for layer, cache in enumerate(session.cache):
            self.kv.k[layer][slot] = cache[0, 0, :, pos]
            self.kv.v[layer][slot] = cache[1, 0, :, pos]
        return logits

    def forget(self, req) -> None:
        """Drop the session of ``req`` (finished or preempted)."""
        if self._req is req:
            self._req = self._session = None

    def _start(self, req, slots: torch.Tensor, pos: int):
        """A session for ``req`` holding its first ``pos`` positions from the paged cache."""
        self._req = self._session = None
        d = self._decoder_for()
        max_len = min(self.max_context, len(req.prompt_ids) + req.sampling.max_tokens)
        if pos >= max_len:
            return None
        per_token = 2 * len(d.layers) * d.n_kv * d.head_dim * 4
        if max_len * per_token > MAX_SESSION_CACHE_BYTES:
            return None
        adapter = None if req.adapter.is_base else req.adapter.weights
        session = d.session(max_len, adapter)
        if pos:
            past = slots[:pos]
            for layer, cache in enumerate(session.cache):
                cache[0, 0, :, :pos] = self.kv.k[layer].index_select(0, past).transpose(0, 1)
                cache[1, 0, :, :pos] = self.kv.v[layer].index_select(0, past).transpose(0, 1)
        session.pos = pos
        self._req, self._session = req, session
        return session
