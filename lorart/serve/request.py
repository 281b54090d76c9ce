"""A request's state inside the engine, and the handle its submitter holds.

``RequestHandle`` is the public side: iterate it (blocking) or ``async for`` over
``handle.stream()`` to receive ``Delta``s, ``result()`` to wait for the ``Completion``,
``cancel()`` to stop it. The engine thread pushes deltas; both consumers wake without
polling (a ``threading.Condition`` for threads, ``loop.call_soon_threadsafe`` for asyncio).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections import deque

from .types import Completion, Delta, SamplingParams, Usage

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"
_arrivals = itertools.count()


class TextTracker:
    """Incremental detokenization with stop strings.

    Text is decoded from all generated ids each time (robust to tokens that merge), and
    what could still be the start of a stop string or an incomplete UTF-8 character is
    held back until it is known not to be.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.emitted = 0        # characters of text handed out so far
        self.text = ""          # final text once stopped/finished

    def update(self, token_ids: list[int], final: bool) -> tuple[str, bool]:
        """``(new text to emit, stop string hit)`` after ``token_ids`` (all generated)."""
        if self.tokenizer is None:
            return "", False
        full = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        hit = False
        cut = len(full)
        if self.stop:
            lo = max(0, self.emitted - max(len(s) for s in self.stop))
            found = [i for i in (full.find(s, lo) for s in self.stop) if i >= 0]
            if found:
                cut, hit = min(found), True
        if not hit and not final:
            cut = len(full) - _held_back(full, self.stop)
        cut = max(cut, self.emitted)
        new = full[self.emitted:cut]
        self.emitted = cut
        self.text = full[:cut]
        return new, hit


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Characters at the end of ``text`` that must wait: a partial UTF-8 character
    (decoded as U+FFFD) or a proper prefix of a stop string."""
    if text.endswith("\ufffd"):
        return len(text) - len(text.rstrip("\ufffd"))
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), hold, -1):
            if text.endswith(s[:n]):
                hold = n
                break
    return hold


class Request:
    """Engine-side state of one request (touched only by the engine thread after submit)."""

    def __init__(self, request_id: str, prompt_ids: list[int], sampling: SamplingParams,
                 adapter_ref, tokenizer, eos_ids: tuple[int, ...], generator) -> None:
        self.request_id = request_id
        self.arrival = next(_arrivals)          # FCFS order; also "youngest" for preemption
        self.arrival_time = time.monotonic()
        self.prompt_ids = prompt_ids
        self.sampling = sampling
        self.adapter = adapter_ref              # AdapterRef (pool), resolved at submit
        self.generator = generator
        self.output_ids: list[int] = []
        self.num_computed = 0                   # tokens whose K/V are in the cache
        self.block_table: list[int] = []
        self.state = WAITING
        self.skipped_steps = 0                  # steps passed over for lack of an adapter slot
        self.preemptions = 0
        self.cancel_requested = False
        self.stop_ids = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            self.stop_ids |= set(eos_ids)
        self.text = TextTracker(tokenizer, sampling.stop)
        self.first_token_time: float | None = None
        self.handle: RequestHandle | None = None

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


class RequestHandle:
    """What ``Engine.submit`` returns (see module doc). Consume it once: either iterate,
    or ``stream()``, or just ``result()``."""

    def __init__(self, request_id: str, prompt_token_ids: list[int], cancel_fn) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.error: Exception | None = None
        self._cancel_fn = cancel_fn
        self._deltas: deque[Delta] = deque()
        self._cond = threading.Condition()
        self._done = threading.Event()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self._text: list[str] = []
        self._token_ids: list[int] = []
        self._finish_reason: str | None = None
        self._usage = Usage(len(prompt_token_ids), 0)

    # ---------------------------------------------------------------- engine side
    def _push(self, delta: Delta, completion_tokens: int) -> None:
        with self._cond:
            self._deltas.append(delta)
            self._text.append(delta.text)
            self._token_ids.extend(delta.token_ids)
            self._usage = Usage(len(self.prompt_token_ids), completion_tokens)
            if delta.finished:
                self._finish_reason = delta.finish_reason
            self._cond.notify_all()
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the consumer's loop is closed; nothing to wake
                pass
        if delta.finished:
            self._done.set()

    # ---------------------------------------------------------------- consumer side
    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def poll(self) -> list[Delta]:
        """The deltas that arrived since the last call, without waiting (may be empty)."""
        with self._cond:
            out = list(self._deltas)
            self._deltas.clear()
        return out

    def __iter__(self):
        while True:
            with self._cond:
                while not self._deltas:
                    self._cond.wait()
                delta = self._deltas.popleft()
            yield delta
            if delta.finished:
                return

    async def stream(self):
        """Async iterator of deltas; never blocks the event loop."""
        loop = asyncio.get_running_loop()
        event = asyncio.Event()
        with self._cond:
            self._waiters.append((loop, event))
        try:
            while True:
                with self._cond:
                    delta = self._deltas.popleft() if self._deltas else None
                    if delta is None:
                        event.clear()
                if delta is None:
                    await event.wait()
                    continue
                yield delta
                if delta.finished:
                    return
        finally:
            with self._cond:
                self._waiters.remove((loop, event))

    def result(self, timeout: float | None = None) -> Completion:
        """Wait for the end; ``TimeoutError`` after ``timeout`` seconds. A request that
        failed returns finish_reason ``"error"`` (the cause is in ``handle.error``)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.request_id} not finished after {timeout} s")
        with self._cond:
            return Completion("".join(self._text), list(self._token_ids),
                              self._finish_reason, self._usage)

    def cancel(self) -> None:
        """Stop generating; its slot, KV blocks and adapter reference are freed at the
        next step boundary and a final delta with finish_reason "cancelled" follows."""
        if not self._done.is_set():
            self._cancel_fn(self)
