"""Public value types of the serving engine: request parameters, outputs, snapshots."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InvalidRequestError


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


@dataclass(frozen=True)
class SamplingParams:
    """How one request generates.

    ``temperature == 0`` is greedy (argmax; top_p/top_k/seed are then ignored).
    ``top_k == 0`` keeps all tokens; ``top_p == 1`` keeps all. ``seed`` makes sampling
    reproducible per request, whatever else shares the batch. ``stop`` strings end the
    output before the stop string (it is not returned); ``stop_token_ids`` and the
    tokenizer's EOS (unless ``ignore_eos``) end it too (the stop token is not returned
    as text but counts as a completion token).
    """

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self) -> SamplingParams:
        """Raise ``errors.InvalidRequestError(param=...)`` for the first bad field;
        returns ``self`` so calls can chain."""
        def bad(param: str, expected: str, got) -> InvalidRequestError:
            return InvalidRequestError(f"{param} must be {expected}, got {got!r}", param=param)

        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise bad("max_tokens", "an integer >= 1", self.max_tokens)
        if not _is_num(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a finite number >= 0", self.temperature)
        if not _is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]", self.top_p)
        if not _is_int(self.top_k) or self.top_k < 0:
            raise bad("top_k", "an integer >= 0 (0 = no top-k)", self.top_k)
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**63):
            raise bad("seed", "None or an integer in [0, 2**63)", self.seed)
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "a sequence of non-empty strings", self.stop)
        if not all(_is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "a sequence of non-negative integers",
                      self.stop_token_ids)
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "true or false", self.ignore_eos)
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


FINISH_REASONS = (None, "stop", "length", "cancelled", "error")


@dataclass
class Delta:
    """New output of one request since the previous delta (streaming unit).

    ``text`` may lag ``token_ids`` (held back while it could still become a stop string
    or an incomplete UTF-8 character); the final delta flushes it.
    """

    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class Completion:
    """The whole output of a finished request."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    usage: Usage


@dataclass(frozen=True)
class AdapterInfo:
    """One adapter known to the engine: ``source`` is its path (None: pushed tensors),
    ``rank`` None until its config was read, ``resident`` whether it sits in a slot."""

    name: str
    source: str | None
    rank: int | None
    resident: bool


@dataclass
class EngineMetrics:
    """A snapshot of the engine's counters and gauges (see ``Engine.metrics``).

    ``adapter_loads_total``/``adapter_evictions_total`` count writes into / evictions
    from the resident slots (what the kernels read); disk reads and host-tier evictions
    have their own counters."""

    requests_total: dict[str, int] = field(default_factory=dict)
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    queue_depth: int = 0
    running: int = 0
    resident_adapters: int = 0
    adapter_loads_total: int = 0
    adapter_evictions_total: int = 0
    adapter_refs: int = 0
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0
    steps_total: int = 0
    step_seconds_total: float = 0.0
    step_seconds_last: float = 0.0
    preemptions_total: int = 0
    adapter_disk_loads_total: int = 0      # disk -> host reads
    adapter_host_evictions_total: int = 0  # host copies dropped (re-readable from disk)
