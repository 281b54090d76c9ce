"""Which tokens run in the next step: FCFS, a cap on distinct adapters, fairness, memory.

Every step (``Scheduler.schedule``):

1. **Running requests first**, oldest first: each gets its next chunk (1 token when
   decoding; the rest of its prompt, up to the token budget, while prefilling). If the
   KV cache has no block for it, the **youngest** running request is preempted (its
   blocks freed, its progress recomputed later from prompt + generated tokens, which
   gives the same tokens) until the block fits — never an out-of-memory error.
2. **Waiting requests in arrival order (FCFS)** join while there is room: ``max_num_seqs``
   sequences, ``max_batch_tokens`` tokens (long prompts are prefilled in chunks), KV
   blocks for the chunk, and at most ``max_loras`` distinct adapters in the step (the
   base model does not count). A request whose adapter is still loading is skipped
   without blocking anyone (it is not ready).
3. **Fairness rule.** A ready request skipped because the step already holds
   ``max_loras`` other adapters counts one skip per step. After ``fairness_patience``
   skips it becomes *starving*: from then on no request that arrived after it is
   admitted. Running requests finish (each within its ``max_tokens``), their adapters
   leave the step, and the starving request is admitted first. So a popular adapter
   whose requests keep arriving cannot starve a rare one: the wait is bounded by
   ``fairness_patience`` steps plus the longest running request.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .kv_cache import PagedKVCache
from .request import RUNNING, WAITING, Request


@dataclass
class ScheduledStep:
    chunks: list[tuple[Request, int]] = field(default_factory=list)  # (request, new tokens)
    preempted: list[Request] = field(default_factory=list)
    too_long: list[Request] = field(default_factory=list)  # alone and still out of blocks

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.chunks)


class Scheduler:
    def __init__(self, kv: PagedKVCache, max_num_seqs: int, max_batch_tokens: int,
                 max_loras: int, fairness_patience: int = 8) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_loras = max_loras
        self.fairness_patience = fairness_patience
        self.waiting: list[Request] = []   # sorted by arrival
        self.running: list[Request] = []   # sorted by arrival

    def add(self, req: Request) -> None:
        req.state = WAITING
        i = len(self.waiting)
        while i > 0 and self.waiting[i - 1].arrival > req.arrival:
            i -= 1
        self.waiting.insert(i, req)

    def remove(self, req: Request) -> None:
        """Take ``req`` out (finished/cancelled/failed) and free its KV blocks."""
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
        self._free(req)

    def _free(self, req: Request) -> None:
        self.kv.allocator.free(req.block_table)
        req.block_table = []

    def _grow(self, req: Request, new_tokens: int) -> bool:
        """Allocate the blocks ``req`` needs for ``new_tokens`` more; False if none left."""
        need = self.kv.blocks_needed(req.num_computed + new_tokens) - len(req.block_table)
        if need <= 0:
            return True
        blocks = self.kv.allocator.allocate(need)
        if blocks is None:
            return False
        req.block_table.extend(blocks)
        return True

    def _preempt(self, victim: Request, out: ScheduledStep) -> None:
        self.running.remove(victim)
        self._free(victim)
        victim.num_computed = 0
        victim.preemptions += 1
        out.preempted.append(victim)
        self.add(victim)

    def schedule(self) -> ScheduledStep:
        out = ScheduledStep()
        budget = self.max_batch_tokens
        # 1. running requests, oldest first
        for req in list(self.running):
            if req not in self.running:  # preempted below as the youngest
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            if n <= 0:
                continue
            while not self._grow(req, n):
                victim = self.running[-1]
                if victim is req and len(self.running) == 1 and not out.chunks:
                    out.too_long.append(req)  # the whole cache cannot hold it
                    break
                self._preempt(victim, out)
                if victim is req:
                    break
            if req in self.running and req not in out.too_long:
                out.chunks.append((req, n))
                budget -= n
        # Every running request keeps its adapter in the step set, scheduled now or not
        # (a prefill that got no budget this step still runs in the next one).
        adapters = {r.adapter.weights for r in self.running if not r.adapter.is_base}
        # 2. waiting requests, FCFS
        for req in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if not req.adapter.ready:
                continue
            key = None if req.adapter.is_base else req.adapter.weights
            if key is not None and key not in adapters and len(adapters) >= self.max_loras:
                req.skipped_steps += 1
                if req.skipped_steps >= self.fairness_patience:
                    break  # starving: nobody who arrived later goes first
                continue
            n = min(req.num_tokens - req.num_computed, budget)
            if not self._grow(req, n):
                break  # FCFS for memory: later requests must not take the blocks it waits for
            self.waiting.remove(req)
            req.state = RUNNING
            self.running.append(req)
            self.running.sort(key=lambda r: r.arrival)
            out.chunks.append((req, n))
            budget -= n
            if key is not None:
                adapters.add(key)
        return out
