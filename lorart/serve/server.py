"""``lorart serve``'s HTTP layer: an OpenAI-compatible API over ``lorart.serve.Engine``.

    from lorart.serve import Engine
    from lorart.serve.server import ServerConfig, create_app, run_server

    engine = Engine.from_gguf()
    engine.add_adapter("pirate", "adapters/pirate")
    run_server(engine, ServerConfig(), host="127.0.0.1", port=8000)   # blocks; SIGTERM -> 0

A thin FastAPI app (routes, pydantic request models, OpenAI's error shape); everything
about scheduling, batching, KV cache and adapters is the engine's. The ``model`` field
picks the adapter: the base model's id means no adapter, any other id is an adapter
name (vLLM, SGLang and LoRAX work the same way).

| route                          | what                                                  |
| ------------------------------ | ----------------------------------------------------- |
| GET  /v1/models                | the base model and every adapter (``parent`` = base)   |
| POST /v1/completions           | text/token prompts; ``stream`` -> SSE                  |
| POST /v1/chat/completions      | chat template by the engine; ``stream`` -> SSE         |
| POST /v1/load_lora_adapter     | ``{lora_name, lora_path}``; --allow-runtime-updates,  |
|                                | path inside an --adapter-dir                          |
| POST /v1/unload_lora_adapter   | ``{lora_name}``; needs --allow-runtime-updates          |
| GET  /health                   | 200 while serving, 503 while shutting down (no auth)    |
| GET  /metrics                  | Prometheus text (``lorart_*``)                          |

Lifetimes: a client that disconnects cancels its engine requests (streaming or not),
which frees their slots, KV blocks and adapter references at the next step. SIGTERM
(or SIGINT) stops accepting connections, lets in-flight requests finish for up to
``shutdown_timeout`` seconds, cancels what is left, shuts the engine down and returns
normally (exit status 0).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from . import errors
from .http_errors import APIError, from_engine_error, install_error_handlers
from .http_metrics import ServerMetrics
from .http_models import (
    ChatCompletionRequest,
    CompletionRequest,
    LoadLoraRequest,
    UnloadLoraRequest,
    chat_choice,
    chat_chunk_choice,
    completion_choice,
    new_id,
    now,
    usage_dict,
)
from .http_security import BearerAuth, confine_adapter_path
from .types import SamplingParams

# Chat requests without max_tokens: OpenAI means "until the context ends"; a CPU server
# should not silently run thousands of tokens, so the default is bounded (and documented).
DEFAULT_CHAT_MAX_TOKENS = 256


@dataclass
class ServerConfig:
    """What the HTTP layer adds on top of the engine (the CLI flags of ``lorart serve``)."""

    adapter_dirs: list[Path] = field(default_factory=list)
    allow_runtime_updates: bool = False
    api_key: str | None = None
    shutdown_timeout: float = 10.0
    default_chat_max_tokens: int = DEFAULT_CHAT_MAX_TOKENS


# ---- one HTTP request = a few engine requests ----------------------------------------------


class _Run:
    """The engine requests behind one HTTP request (prompts x n choices), with the
    bookkeeping both response styles need: per-choice text, token counts, finish reasons.

    ``cancel_unfinished`` is idempotent and is called on every exit path (done, error,
    disconnect), so no engine request outlives its HTTP request.
    """

    def __init__(self, handles: list, n: int):
        self.handles = handles
        self.n = n
        self.texts = [""] * len(handles)
        self.completion_tokens = [0] * len(handles)
        self.finish_reasons: list[str | None] = [None] * len(handles)
        self.started = time.perf_counter()
        self.first_output: float | None = None

    @property
    def prompt_tokens(self) -> int:
        # Each prompt counts once, however many choices (n) were sampled from it.
        return sum(len(h.prompt_token_ids) for h in self.handles[::self.n])

    def usage(self) -> dict:
        return usage_dict(self.prompt_tokens, sum(self.completion_tokens))

    def record(self, index: int, delta) -> None:
        if self.first_output is None and (delta.token_ids or delta.finished):
            self.first_output = time.perf_counter()
        self.texts[index] += delta.text
        self.completion_tokens[index] += len(delta.token_ids)
        if delta.finished:
            self.finish_reasons[index] = delta.finish_reason

    def error_of(self, index: int) -> APIError:
        error = self.handles[index].error
        if isinstance(error, errors.EngineError):
            return from_engine_error(error)
        return APIError(500, f"request failed: {error!r}")

    def cancel_unfinished(self) -> None:
        for handle, reason in zip(self.handles, self.finish_reasons):
            if reason is None:
                handle.cancel()


async def _events(handles: list) -> AsyncIterator[tuple[int, object]]:
    """``(choice index, Delta)`` from all handles, in arrival order."""
    if len(handles) == 1:
        async for delta in handles[0].stream():
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(index: int, handle) -> None:
        try:
            async for delta in handle.stream():
                await queue.put((index, delta))
            await queue.put((index, done))
        except Exception as exc:  # surfaced to the consumer below, not lost in a task
            await queue.put((index, exc))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        remaining = len(handles)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _cancel_on_disconnect(request: Request, run: _Run) -> None:
    """Wait for the client to go away; then cancel the run's unfinished requests.

    After the body is read, the ASGI ``receive`` only returns ``http.disconnect``.
    """
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            run.cancel_unfinished()
            return


class _SSEResponse(StreamingResponse):
    """A Server-Sent-Events response that always runs ``on_close`` when it ends, however
    it ends (finished, client gone, server shutting down): that is where the engine
    requests of a dropped stream are cancelled."""

    def __init__(self, body: AsyncIterator[str], on_close):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


# ---- the app ---------------------------------------------------------------------------


class _State:
    def __init__(self, engine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics(engine)
        self.stopping = False


def create_app(engine, config: ServerConfig | None = None, *, manage_engine: bool = True
               ) -> FastAPI:
    """The FastAPI app serving ``engine``.

    ``manage_engine``: start the engine with the app (lifespan startup) and shut it down
    with it (``engine.shutdown(timeout=config.shutdown_timeout)``).
    """
    config = config or ServerConfig()
    state = _State(engine, config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if manage_engine:
            engine.start()
        try:
            yield
        finally:
            state.stopping = True
            if manage_engine:
                await run_in_threadpool(engine.shutdown, config.shutdown_timeout)

    app = FastAPI(title="lorart serve", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.lorart = state
    install_error_handlers(app)

    @app.exception_handler(errors.EngineError)
    async def _engine_error(_request: Request, exc: errors.EngineError):
        return from_engine_error(exc).response()

    _add_routes(app, state)
    app.add_middleware(_HTTPMetricsMiddleware, metrics=state.metrics)
    if config.api_key:
        app.add_middleware(BearerAuth, api_key=config.api_key)
    return app


class _HTTPMetricsMiddleware:
    """Counts every HTTP response by endpoint and status code (``lorart_http_requests``)."""

    _ENDPOINTS = frozenset({"/v1/models", "/v1/completions", "/v1/chat/completions",
                            "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/health",
                            "/metrics"})

    def __init__(self, app, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in self._ENDPOINTS else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.http_requests.labels(endpoint, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


def _add_routes(app: FastAPI, state: _State) -> None:
    engine, config = state.engine, state.config

    @app.get("/health")
    async def health():
        if state.stopping:
            return JSONResponse({"status": "shutting down"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        body = await run_in_threadpool(state.metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        base = engine.base_model_id
        created = now()
        data = [{"id": base, "object": "model", "created": created, "owned_by": "lorart",
                 "root": base, "parent": None}]
        for info in sorted(engine.list_adapters(), key=lambda a: a.name):
            data.append({"id": info.name, "object": "model", "created": created,
                         "owned_by": "lorart", "root": info.source or info.name, "parent": base})
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        body.reject_unsupported()
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        run = await _submit(state, body, body.prompts(), max_tokens)
        meta = {"id": new_id("cmpl"), "object": "text_completion", "created": now(),
                "model": body.model or engine.base_model_id}
        if body.stream:
            return await _stream(state, run, "/v1/completions", _completion_chunks(run, meta),
                                 body.include_usage(), meta)
        await _collect(state, request, run, "/v1/completions")
        choices = [completion_choice(i, t, r)
                   for i, (t, r) in enumerate(zip(run.texts, run.finish_reasons))]
        return {**meta, "choices": choices, "usage": run.usage()}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        body.reject_unsupported()
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
            else body.max_tokens
        if max_tokens is None:
            max_tokens = config.default_chat_max_tokens
        run = await _submit(state, body, [{"messages": body.message_dicts()}], max_tokens)
        meta = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": now(),
                "model": body.model or engine.base_model_id}
        if body.stream:
            chunk_meta = {**meta, "object": "chat.completion.chunk"}
            return await _stream(state, run, "/v1/chat/completions",
                                 _chat_chunks(run, chunk_meta), body.include_usage(),
                                 chunk_meta)
        await _collect(state, request, run, "/v1/chat/completions")
        choices = [chat_choice(i, t, r)
                   for i, (t, r) in enumerate(zip(run.texts, run.finish_reasons))]
        return {**meta, "choices": choices, "usage": run.usage()}

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoraRequest):
        _require_runtime_updates(config)
        name = body.lora_name
        if name == engine.base_model_id or any(a.name == name for a in engine.list_adapters()):
            raise APIError(400, f"an adapter or model named {name!r} is already loaded; unload "
                                f"it first", param="lora_name", code="adapter_exists")
        path = confine_adapter_path(body.lora_path, config.adapter_dirs)
        # Reading and checking the adapter's files is disk work: off the event loop.
        await run_in_threadpool(engine.add_adapter, name, str(path))
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoraRequest):
        _require_runtime_updates(config)
        if body.lora_name == engine.base_model_id:
            raise APIError(400, "the base model cannot be unloaded", param="lora_name")
        try:
            await run_in_threadpool(engine.remove_adapter, body.lora_name)
        except errors.UnknownAdapterError as exc:
            raise APIError(404, f"no adapter named {body.lora_name!r} is loaded",
                           param="lora_name", code="adapter_not_found") from exc
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed "
                                 f"successfully.")


def _require_runtime_updates(config: ServerConfig) -> None:
    if not config.allow_runtime_updates:
        raise APIError(403, "runtime adapter updates are disabled; start the server with "
                            "--allow-runtime-updates", code="runtime_updates_disabled")


async def _submit(state: _State, body, prompts: list[dict], max_tokens: int) -> _Run:
    """Submit every (prompt, choice) to the engine; all or nothing."""
    engine = state.engine
    if state.stopping:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    model = body.model
    adapter = None if model in (None, engine.base_model_id) else model
    handles = []
    try:
        for prompt in prompts:
            for choice in range(body.n):
                # n > 1 with a seed: distinct but reproducible samples per choice.
                seed = None if body.seed is None else body.seed + choice
                sampling = SamplingParams(
                    max_tokens=max_tokens,
                    temperature=1.0 if body.temperature is None else body.temperature,
                    top_p=1.0 if body.top_p is None else body.top_p,
                    top_k=0 if body.top_k in (None, -1) else body.top_k, seed=seed,
                    stop=body.stop_strings(), stop_token_ids=tuple(body.stop_token_ids or ()),
                    ignore_eos=body.ignore_eos).validate()
                # submit tokenizes (and may wait on the engine's lock): not on the event loop.
                handles.append(await run_in_threadpool(
                    lambda p=prompt, s=sampling: engine.submit(**p, adapter=adapter,
                                                               sampling=s)))
    except errors.UnknownAdapterError as exc:
        for handle in handles:
            handle.cancel()
        raise APIError(404, f"the model {model!r} does not exist (not the base model "
                            f"{engine.base_model_id!r} nor a known adapter)", param="model",
                       code="model_not_found") from exc
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    return _Run(handles, body.n)


async def _collect(state: _State, request: Request, run: _Run, endpoint: str) -> None:
    """Run to completion for a non-streaming response; a client that disconnects while
    waiting cancels the run. Raises the first failed request's error."""
    watcher = asyncio.create_task(_cancel_on_disconnect(request, run))
    try:
        async for index, delta in _events(run.handles):
            run.record(index, delta)
            if delta.finish_reason == "error":
                raise run.error_of(index)
    finally:
        watcher.cancel()
        run.cancel_unfinished()
    _observe(state, run, endpoint)


def _observe(state: _State, run: _Run, endpoint: str) -> None:
    end = time.perf_counter()
    state.metrics.latency.labels(endpoint).observe(end - run.started)
    if run.first_output is not None:
        state.metrics.first_token.labels(endpoint).observe(run.first_output - run.started)


async def _stream(state: _State, run: _Run, endpoint: str, chunks, include_usage: bool,
                  meta: dict) -> Response:
    """An SSE response of ``chunks`` (an async generator of chunk dicts).

    The first chunk is produced before the response starts, so a request that fails
    before its first token (an adapter that does not load) still gets its proper status
    code instead of a 200 followed by an error event.
    """
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = None
    except BaseException:
        run.cancel_unfinished()
        await chunks.aclose()
        raise

    async def body():
        try:
            if first is not None:
                yield _sse(first)
                async for chunk in chunks:
                    yield _sse(chunk)
            if include_usage:
                yield _sse({**meta, "choices": [], "usage": run.usage()})
            _observe(state, run, endpoint)
        except APIError as exc:  # failed mid-stream: the status line has gone already
            yield _sse(exc.body())
        yield "data: [DONE]\n\n"

    def on_close():
        run.cancel_unfinished()

    return _SSEResponse(body(), on_close)


async def _completion_chunks(run: _Run, meta: dict):
    usage_null = {"usage": None}
    async for index, delta in _events(run.handles):
        run.record(index, delta)
        if delta.finish_reason == "error":
            raise run.error_of(index)
        if delta.text or delta.finished:
            yield {**meta, "choices": [completion_choice(index, delta.text,
                                                         delta.finish_reason)], **usage_null}


async def _chat_chunks(run: _Run, meta: dict):
    greeted = set()
    async for index, delta in _events(run.handles):
        run.record(index, delta)
        if delta.finish_reason == "error":
            raise run.error_of(index)
        if index not in greeted:  # OpenAI's first chunk of a choice carries the role
            greeted.add(index)
            yield {**meta, "choices": [chat_chunk_choice(index, {"role": "assistant",
                                                                 "content": ""}, None)],
                   "usage": None}
        if delta.text:
            yield {**meta, "choices": [chat_chunk_choice(index, {"content": delta.text}, None)],
                   "usage": None}
        if delta.finished:
            yield {**meta, "choices": [chat_chunk_choice(index, {}, delta.finish_reason)],
                   "usage": None}


# ---- running it ------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``(host, port)`` (port 0: any free port), bound before
    the model loads so a taken port fails fast. Raises ``OSError``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class GracefulServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM after its graceful shutdown, so the process would die by
    the signal (exit 143). A server that drained cleanly should exit 0: this one handles
    SIGTERM/SIGINT the same way (stop accepting, drain, lifespan shutdown) but does not
    re-raise them."""

    @contextlib.contextmanager
    def capture_signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield  # signals can only be handled in the main thread (tests run it in one)
            return
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in signals}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_server(engine, config: ServerConfig, *, sock: socket.socket | None = None,
               host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> int:
    """Serve ``engine`` on ``sock`` (or ``host:port``) until SIGTERM/SIGINT; returns 0
    after a graceful shutdown."""
    app = create_app(engine, config)
    uv_config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                               timeout_graceful_shutdown=config.shutdown_timeout,
                               access_log=log_level in ("info", "debug"))
    server = GracefulServer(uv_config)
    server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else 1
