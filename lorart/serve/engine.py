"""``Engine``: continuous batching of many requests over many LoRA adapters.

One background thread runs steps. A step: take new submissions and cancellations,
install finished adapter loads, ask the ``Scheduler`` which tokens run, put the step's
adapters into resident slots, run ONE packed forward (``ModelRunner``), sample one
token for every sequence whose prompt is complete, stream it, and retire finished
requests (freeing KV blocks and adapter references at once).

Memory: one stated budget covers the KV cache, the resident adapter slots and the
host adapter tier (``engine.memory_plan``). Without ``memory_budget_bytes`` the KV cache
holds ``kv_cache_tokens`` tokens (default 8192) and the host tier 256 MiB; with it, the
resident slots are taken first, the host tier gets a quarter of the rest (at most
256 MiB) and the KV cache everything left.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter

import torch

from ..adapters import AdapterBatch
from ..layers import LoRALinear
from . import adapter_weights as aw
from .adapter_pool import AdapterPool
from .errors import (
    EngineError,
    EngineStoppedError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
)
from .kv_cache import PagedKVCache
from .request import FINISHED, Request, RequestHandle
from .resident import ResidentSlots
from .runner import PROJECTIONS, ModelRunner, SeqChunk, StepBatch, embedding_dtype_device
from .sampling import make_generator, sample
from .scheduler import Scheduler
from .solo import SoloDecoder
from .types import AdapterInfo, Delta, EngineMetrics, SamplingParams

_MIB = 1 << 20


class Engine:
    """See module doc and ``notes/engine_api.md`` (the contract with the HTTP server).

    Added beyond the contract: ``max_lora_rank`` (rank rows of one resident slot),
    ``block_size`` (KV tokens per block), ``kv_cache_tokens`` (KV size without a
    budget), ``max_context``, ``fairness_patience`` (see ``scheduler``), ``step()`` and
    ``run_until_idle()`` to drive the engine without its thread (tests).
    """

    # What runs a step's forward and holds the resident adapters: a subclass may swap them
    # (``lorart.distributed.engine``: the same engine over a tensor-parallel model).
    runner_class = ModelRunner
    slots_class = ResidentSlots

    def __init__(self, model, tokenizer=None, *, max_loras: int = 8, max_cpu_loras: int = 64,
                 max_num_seqs: int = 32, max_batch_tokens: int = 512, max_queue: int = 256,
                 memory_budget_bytes: int | None = None,
                 base_model_id: str = "SmolLM2-135M-Instruct", max_lora_rank: int = 16,
                 block_size: int = 16, kv_cache_tokens: int | None = None,
                 max_context: int | None = None, fairness_patience: int = 8) -> None:
        for name, v in (("max_loras", max_loras), ("max_cpu_loras", max_cpu_loras),
                        ("max_num_seqs", max_num_seqs), ("max_batch_tokens", max_batch_tokens),
                        ("max_queue", max_queue), ("max_lora_rank", max_lora_rank),
                        ("block_size", block_size), ("fairness_patience", fairness_patience)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.base_model_id = base_model_id
        self.max_queue = max_queue
        dtype, device = embedding_dtype_device(model.model.embed_tokens)
        paths = [p for layer in range(len(model.model.layers))
                 for p in (f"model.layers.{layer}.{q}" for q in _proj_names())]
        modules = dict(model.named_modules())
        shapes = {p: (modules[p].out_features, modules[p].in_features)
                  for p in paths if isinstance(modules.get(p), LoRALinear)}
        self.memory_plan = self._plan_memory(model, shapes, max_loras, max_lora_rank, dtype,
                                             block_size, memory_budget_bytes, kv_cache_tokens)
        n_layers, n_kv, head_dim = self.runner_class.kv_shape(model)
        self.kv = PagedKVCache(n_layers, n_kv, head_dim, self.memory_plan["kv_blocks"],
                               block_size, dtype, device)
        self.slots = self.slots_class(shapes, max_loras, max_lora_rank, dtype, device)
        self.runner = self.runner_class(model, self.kv, self.slots)
        self.pool = AdapterPool(model, shapes, self.slots, max_cpu_loras,
                                self.memory_plan["host_cap_bytes"], on_loaded=self._wake)
        self.scheduler = Scheduler(self.kv, max_num_seqs, max_batch_tokens, max_loras,
                                   fairness_patience)
        limit = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.max_context = min(limit, self.kv.capacity_tokens, max_context or 1 << 30)
        self.vocab_size = model.config.vocab_size
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None and tokenizer is not None:
            eos = tokenizer.eos_token_id
        self.eos_ids = tuple(eos) if isinstance(eos, list | tuple) else \
            (() if eos is None else (int(eos),))
        self._import_model_adapters(modules, shapes)
        # A step of one lone token runs the batch-1 C++ decode step (solo.py); not under
        # a subclass's runner (tensor parallel: every rank must run the same step).
        self.solo = SoloDecoder(model, self.kv, self.max_context,
                                allowed=self.runner_class is ModelRunner)

        self._lock = threading.Condition()
        self._incoming: list[Request] = []
        self._cancels: set[str] = set()
        self._live: dict[str, Request] = {}     # submitted and not finished
        self._thread: threading.Thread | None = None
        self._accepting = True
        self._stopping = False
        self._counts: Counter[str] = Counter()
        self._prompt_tokens = self._gen_tokens = 0
        self._steps = 0
        self._step_seconds = self._step_last = 0.0
        self._preemptions = 0
        self._step_lock = threading.Lock()      # one step at a time (thread or manual)

    @classmethod
    def from_gguf(cls, path=None, **kwargs) -> Engine:
        """An engine over ``lorart.from_gguf(path)`` (embedded SmolLM2 4-bit when None)."""
        import lorart

        model, tokenizer = lorart.from_gguf(path)
        return cls(model, tokenizer, **kwargs)

    # ---------------------------------------------------------------- setup helpers
    @classmethod
    def _plan_memory(cls, model, shapes, max_loras, max_lora_rank, dtype, block_size, budget,
                     kv_cache_tokens) -> dict:
        n_layers, n_kv, head_dim = cls.runner_class.kv_shape(model)
        per_block = PagedKVCache.bytes_per_block(n_layers, n_kv, head_dim, block_size, dtype)
        resident = cls.slots_class.bytes_needed(shapes, max_loras, max_lora_rank, dtype)
        if budget is None:
            host = 256 * _MIB
            blocks = -(-(kv_cache_tokens or 8192) // block_size)
            budget = resident + host + blocks * per_block
        else:
            if budget < resident + 2 * per_block:
                raise ValueError(f"memory_budget_bytes={budget} cannot hold the resident "
                                 f"adapter slots ({resident} bytes for max_loras={max_loras} x "
                                 f"max_lora_rank={max_lora_rank}) plus two KV blocks "
                                 f"({per_block} bytes each)")
            host = min(256 * _MIB, (budget - resident) // 4)
            if kv_cache_tokens is not None:
                blocks = -(-kv_cache_tokens // block_size)
            else:
                blocks = (budget - resident - host) // per_block
            blocks = max(2, min(blocks, (budget - resident - host) // per_block))
        return {"budget_bytes": budget, "resident_bytes": resident, "host_cap_bytes": host,
                "kv_bytes": blocks * per_block, "kv_blocks": blocks, "block_size": block_size}

    def _import_model_adapters(self, modules, shapes) -> None:
        """Adapters already loaded into the model (``lorart.load_adapter``) are served too."""
        layers = [(p, modules[p]) for p in shapes]
        names = {n for _, layer in layers for n in layer.lora_A.keys()}
        for name in sorted(names):
            weights = aw.from_model(self.model, name, layers)
            if weights.rank <= self.slots.max_rank:
                self.pool._install(name, weights, source=None)

    # ---------------------------------------------------------------- adapters
    def add_adapter(self, name: str, path) -> None:
        """Register a PEFT adapter directory (read and validated now; replaces ``name``)."""
        self.pool.add_path(name, path)

    def add_adapter_dir(self, directory) -> None:
        """Adapters ``<directory>/<name>`` load on first use by name."""
        self.pool.add_dir(directory)

    def add_adapter_tensors(self, name: str, tensors: dict, config: dict) -> None:
        """Push PEFT-keyed tensors + config (e.g. from a training loop); replaces ``name``.
        Requests already running keep the weights they started with."""
        self.pool.push(name, tensors, config)

    def remove_adapter(self, name: str) -> None:
        self.pool.remove(name)

    def list_adapters(self) -> list[AdapterInfo]:
        resident = self.pool.resident_names()
        with self.pool._lock:
            out = {n: AdapterInfo(n, e.source, e.weights.rank if e.weights else None,
                                  n in resident) for n, e in self.pool.entries.items()}
        for name, path in self.pool.scan_dirs():
            out.setdefault(name, AdapterInfo(name, path, None, False))
        return [out[n] for n in sorted(out)]

    # ---------------------------------------------------------------- requests
    def submit(self, prompt: str | None = None, *, prompt_token_ids: list[int] | None = None,
               messages: list[dict] | None = None, adapter=None,
               sampling: SamplingParams | None = None,
               request_id: str | None = None) -> RequestHandle:
        """Queue a request; raises (nothing allocated) on bad input — see the contract."""
        try:
            if not self._accepting:
                raise EngineStoppedError("the engine is shutting down or stopped")
            sampling = SamplingParams() if sampling is None else sampling
            if not isinstance(sampling, SamplingParams):
                raise InvalidRequestError(f"sampling must be a SamplingParams, got "
                                          f"{type(sampling).__name__}", param="sampling")
            sampling.validate()
            if sampling.stop and self.tokenizer is None:
                raise InvalidRequestError("stop strings need a tokenizer; this engine has none",
                                          param="stop")
            ids = self._prompt_ids(prompt, prompt_token_ids, messages)
            if len(ids) >= self.max_context:
                raise PromptTooLongError(f"the prompt has {len(ids)} tokens; this engine's "
                                         f"context holds {self.max_context} (prompt + at least "
                                         f"one generated token)")
            queued = len(self._incoming) + len(self.scheduler.waiting)
            if queued >= self.max_queue:
                raise QueueFullError(f"{queued} requests are waiting (max_queue="
                                     f"{self.max_queue}); retry later", retry_after=1.0)
            if request_id is not None and (not isinstance(request_id, str) or not request_id
                                           or request_id in self._live):
                raise InvalidRequestError(f"request_id must be a non-empty string not used by a "
                                          f"live request, got {request_id!r}",
                                          param="request_id")
            ref = self.pool.resolve(adapter)
        except EngineError:
            with self._lock:
                self._counts["rejected"] += 1
            raise
        rid = request_id or f"req-{uuid.uuid4().hex[:16]}"
        req = Request(rid, ids, sampling, ref, self.tokenizer, self.eos_ids,
                      make_generator(sampling))
        req.handle = RequestHandle(rid, list(ids), self._cancel)
        req.handle._request = req
        with self._lock:
            self._incoming.append(req)
            self._live[rid] = req
            self._prompt_tokens += len(ids)
            self._lock.notify_all()
        return req.handle

    def _prompt_ids(self, prompt, prompt_token_ids, messages) -> list[int]:
        given = [n for n, v in (("prompt", prompt), ("prompt_token_ids", prompt_token_ids),
                                ("messages", messages)) if v is not None]
        if len(given) != 1:
            raise InvalidRequestError(f"give exactly one of prompt, prompt_token_ids, messages; "
                                      f"got {given or 'none'}", param="prompt")
        if prompt_token_ids is not None:
            ids = prompt_token_ids
            if isinstance(ids, torch.Tensor):
                ids = ids.tolist()
            if not isinstance(ids, list | tuple) or not all(
                    isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise InvalidRequestError("prompt_token_ids must be a list of integers",
                                          param="prompt_token_ids")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise InvalidRequestError(f"prompt_token_ids must lie in 0..{self.vocab_size - 1}"
                                          f", got {bad[:3]}", param="prompt_token_ids")
            ids = list(ids)
        elif self.tokenizer is None:
            raise InvalidRequestError("text prompts and messages need a tokenizer; give "
                                      "prompt_token_ids", param="prompt")
        elif prompt is not None:
            if not isinstance(prompt, str):
                raise InvalidRequestError(f"prompt must be a string, got {type(prompt).__name__}",
                                          param="prompt")
            ids = list(self.tokenizer(prompt)["input_ids"])
        else:
            ids = self._chat_ids(messages)
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return ids

    def _chat_ids(self, messages) -> list[int]:
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise InvalidRequestError("messages must be a non-empty list of {'role': str, "
                                      "'content': str}", param="messages")
        try:
            out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True)
        except Exception as exc:  # the template rejected the conversation (roles, order)
            raise InvalidRequestError(f"messages: chat template failed: {exc}",
                                      param="messages") from exc
        if hasattr(out, "keys"):
            out = out["input_ids"]
        return list(out)

    def _cancel(self, handle: RequestHandle) -> None:
        with self._lock:
            self._cancels.add(handle.request_id)
            self._lock.notify_all()

    # ---------------------------------------------------------------- running
    def start(self) -> Engine:
        """Run steps in a background thread until ``shutdown``."""
        if self._thread is not None:
            return self
        self._thread = threading.Thread(target=self._loop, name="lorart-engine", daemon=True)
        self._thread.start()
        return self

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def _has_work(self) -> bool:
        s = self.scheduler
        return bool(self._incoming or self._cancels or s.running
                    or any(r.adapter.ready or r.adapter.error for r in s.waiting)
                    or (bool(s.waiting) and self.pool.loads_finished()))

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._has_work():
                    self._lock.wait(0.25)  # timed: picks up finished adapter loads too
                if self._stopping:
                    return
            self.step()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop accepting; let in-flight requests finish for up to ``timeout`` seconds,
        cancel the rest, stop the thread and the adapter loader."""
        self._accepting = False
        deadline = time.monotonic() + timeout
        if self._thread is not None:
            while self._live and time.monotonic() < deadline:
                time.sleep(0.01)
        with self._lock:
            self._cancels.update(self._live)
            self._lock.notify_all()
        if self._thread is not None:
            while self._live and time.monotonic() < deadline + 5:
                time.sleep(0.01)
            with self._lock:
                self._stopping = True
                self._lock.notify_all()
            self._thread.join(timeout=max(1.0, deadline + 5 - time.monotonic()))
            self._thread = None
        else:
            self.step()  # retire what is queued (as cancelled)
        self.pool.shutdown()

    def run_until_idle(self, timeout: float = 120.0) -> int:
        """Step (without the thread) until no request is left; returns steps run.
        ``TimeoutError`` if requests are still live after ``timeout`` seconds."""
        n, deadline = 0, time.monotonic() + timeout
        while self._live:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self._live)} requests still live after {timeout} s")
            if not self.step():
                time.sleep(0.002)  # waiting for an adapter load
            n += 1
        return n

    def step(self) -> bool:
        """One engine step; returns whether a forward ran."""
        with self._step_lock:
            t0 = time.perf_counter()
            self._admit_and_cancel()
            self.pool.poll()
            for req in [r for r in self.scheduler.waiting if r.adapter.error is not None]:
                self._finish(req, "error", req.adapter.error)
            sched = self.scheduler.schedule()
            self._preemptions += len(sched.preempted)
            for req in sched.preempted:
                self.solo.forget(req)
            for req in sched.too_long:
                self._finish(req, "length")
            if not sched.chunks:
                return False
            self._run(sched.chunks)
            dt = time.perf_counter() - t0
            self._steps += 1
            self._step_seconds += dt
            self._step_last = dt
            return True

    def _admit_and_cancel(self) -> None:
        with self._lock:
            incoming, self._incoming = self._incoming, []
            cancels, self._cancels = self._cancels, set()
        for req in incoming:
            self.scheduler.add(req)
        for rid in cancels:
            req = self._live.get(rid)
            if req is not None:
                self._finish(req, "cancelled")

    def _run(self, chunks: list[tuple[Request, int]]) -> None:
        if len(chunks) == 1 and chunks[0][1] == 1 and self._run_solo(chunks[0][0]):
            return
        needed = list(dict.fromkeys(r.adapter.weights for r, _ in chunks
                                    if not r.adapter.is_base))
        segments = self.pool.ensure_resident(needed)
        tokens, positions, seg_ids, seqs, sample_rows, samplers = [], [], [], [], [], []
        write_slots = []
        row = 0
        for req, n in chunks:
            start, end = req.num_computed, req.num_computed + n
            tokens.extend(req.all_ids[start:end])
            positions.append(torch.arange(start, end))
            seg = -1 if req.adapter.is_base else segments[req.adapter.weights]
            seg_ids.extend([seg] * n)
            kv_slots = self.kv.slots(req.block_table, 0, end)
            write_slots.append(kv_slots[start:])
            seqs.append(SeqChunk(row, n, end, kv_slots))
            row += n
            if end == req.num_tokens:
                sample_rows.append(row - 1)
                samplers.append(req)
        ids = torch.tensor(seg_ids, dtype=torch.int64)
        adapters = AdapterBatch(ids, self.slots.num_segments) if needed else None
        batch = StepBatch(torch.tensor(tokens, dtype=torch.int64), torch.cat(positions),
                          torch.cat(write_slots), seqs, adapters,
                          torch.tensor(sample_rows, dtype=torch.int64))
        logits = self.runner.forward(batch)
        for req, n in chunks:
            req.num_computed += n
        new_tokens = sample(logits, [r.sampling for r in samplers],
                            [r.generator for r in samplers])
        for req, tok in zip(samplers, new_tokens):
            self._append(req, tok)

    def _run_solo(self, req: Request) -> bool:
        """One token of one request through the batch-1 decoder; False: run it batched."""
        end = req.num_computed + 1
        logits = self.solo.logits(req, self.kv.slots(req.block_table, 0, end))
        if logits is None:
            return False
        req.num_computed = end
        if end == req.num_tokens:
            self._append(req, sample(logits, [req.sampling], [req.generator])[0])
        return True

    def _append(self, req: Request, token: int) -> None:
        req.output_ids.append(token)
        self._gen_tokens += 1
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        reason = None
        text_ids = req.output_ids
        if token in req.stop_ids:
            reason, text_ids = "stop", req.output_ids[:-1]
        elif len(req.output_ids) >= req.sampling.max_tokens or req.num_tokens >= self.max_context:
            reason = "length"
        text, hit = req.text.update(text_ids, final=reason is not None)
        if hit:
            reason = "stop"
        if reason is None:
            req.handle._push(Delta([token], text), len(req.output_ids))
        else:
            self._finish(req, reason, delta=Delta([token], text))

    def _finish(self, req: Request, reason: str, error: Exception | None = None,
                delta: Delta | None = None) -> None:
        if req.state == FINISHED:
            return
        self.scheduler.remove(req)
        self.pool.release(req.adapter)
        self.solo.forget(req)
        req.state = FINISHED
        if delta is None:
            delta = Delta([], "")
            if reason in ("cancelled", "length") and req.output_ids:
                delta.text, _ = req.text.update(req.output_ids, final=True)
        delta.finished, delta.finish_reason = True, reason
        req.handle.error = error
        with self._lock:
            self._live.pop(req.request_id, None)
            self._counts[reason] += 1
        req.handle._push(delta, len(req.output_ids))

    # ---------------------------------------------------------------- metrics
    def metrics(self) -> EngineMetrics:
        pool = self.pool
        with self._lock:
            counts = dict(self._counts)
            queued = len(self._incoming)
        return EngineMetrics(
            requests_total=counts, prompt_tokens_total=self._prompt_tokens,
            generation_tokens_total=self._gen_tokens,
            queue_depth=queued + len(self.scheduler.waiting),
            running=len(self.scheduler.running),
            resident_adapters=sum(h is not None for h in self.slots.holder),
            adapter_loads_total=pool.slot_writes, adapter_evictions_total=pool.slot_evictions,
            adapter_refs=sum(pool.refs.values()), kv_blocks_total=self.kv.allocator.num_blocks,
            kv_blocks_used=self.kv.allocator.num_used, steps_total=self._steps,
            step_seconds_total=self._step_seconds, step_seconds_last=self._step_last,
            preemptions_total=self._preemptions, adapter_disk_loads_total=pool.disk_loads,
            adapter_host_evictions_total=pool.host_evictions)


def _proj_names() -> tuple[str, ...]:
    return PROJECTIONS
