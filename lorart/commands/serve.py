"""``lorart serve``: an OpenAI-compatible HTTP server for one base model and many adapters.

    lorart serve                                     # SmolLM2 4-bit + the shipped adapters
    lorart serve --adapter support=out/support --adapter-dir /srv/adapters --port 8000
    lorart serve --allow-runtime-updates --adapter-dir /srv/adapters --api-key $KEY

The ``model`` field of a request picks the adapter (the base model's id: no adapter).
Adapters in an ``--adapter-dir`` load by name on first request. Every argument is
checked before the model loads (a bad one: one line on stderr, exit status 2). Binds
127.0.0.1 unless ``--host`` says otherwise; SIGTERM drains in-flight requests and exits 0.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

NAME = "serve"
HELP = "serve a 4-bit model and many LoRA adapters over an OpenAI-compatible HTTP API"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a llama GGUF file (default: the embedded SmolLM2-135M-Instruct "
                             "Q4_1)")
    parser.add_argument("--adapter", action="append", default=None, metavar="NAME=PATH",
                        help="a PEFT adapter directory served as model NAME (repeatable; "
                             "default: the adapters shipped with lorart)")
    parser.add_argument("--adapter-dir", action="append", default=[], metavar="DIR",
                        help="a directory of adapter directories, loaded by name on first "
                             "request; also the only place runtime loads may read (repeatable)")
    parser.add_argument("--max-loras", type=int, default=8, metavar="N",
                        help="distinct adapters resident at once (default: 8)")
    parser.add_argument("--max-cpu-loras", type=int, default=64, metavar="N",
                        help="adapters kept in host memory (default: 64)")
    parser.add_argument("--max-num-seqs", type=int, default=32, metavar="N",
                        help="requests running at once (default: 32)")
    parser.add_argument("--max-queue", type=int, default=256, metavar="N",
                        help="requests waiting before new ones get 429 (default: 256)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--allow-runtime-updates", action="store_true",
                        help="enable POST /v1/load_lora_adapter and /v1/unload_lora_adapter")
    parser.add_argument("--api-key", default=os.environ.get("LORART_API_KEY"), metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on every endpoint but "
                             "/health (default: $LORART_API_KEY, else no auth)")
    parser.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="on SIGTERM, how long in-flight requests may finish (default: 10)")
    parser.add_argument("--tensor-parallel", action="store_true",
                        help="shard the model over the processes torchrun started (gloo, CPU): "
                             "rank 0 serves HTTP, the others run their shard of every step; "
                             "launch as `torchrun --nproc-per-node N -m lorart serve "
                             "--tensor-parallel ...` (N must divide the heads and KV heads)")
    parser.add_argument("--log-level", default="warning",
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's log level")


class _ArgumentError(ValueError):
    pass


def _check_arguments(args: argparse.Namespace) -> list[tuple[str, Path]]:
    """Everything checkable without the model; returns the ``(name, dir)`` adapters."""
    from .demo import parse_adapter_args, shipped_adapters

    if args.model is not None and not Path(args.model).is_file():
        raise _ArgumentError(f"--model {args.model}: no such file (expected a GGUF file)")
    for flag in ("max_loras", "max_cpu_loras", "max_num_seqs", "max_queue"):
        if getattr(args, flag) < 1:
            raise _ArgumentError(f"--{flag.replace('_', '-')} must be at least 1, got "
                                 f"{getattr(args, flag)}")
    if args.max_cpu_loras < args.max_loras:
        raise _ArgumentError(f"--max-cpu-loras ({args.max_cpu_loras}) must be at least "
                             f"--max-loras ({args.max_loras})")
    if not 0 <= args.port <= 65535:
        raise _ArgumentError(f"--port must be in 0..65535, got {args.port}")
    if args.shutdown_timeout < 0:
        raise _ArgumentError(f"--shutdown-timeout must be >= 0, got {args.shutdown_timeout}")
    if args.tensor_parallel and "RANK" not in os.environ:
        raise _ArgumentError("--tensor-parallel: start it with torchrun (torchrun "
                             "--nproc-per-node N -m lorart serve --tensor-parallel ...)")
    if args.api_key is not None and not args.api_key.strip():
        raise _ArgumentError("--api-key must not be empty")
    for directory in args.adapter_dir:
        if not Path(directory).is_dir():
            raise _ArgumentError(f"--adapter-dir {directory}: not a directory")
    if args.allow_runtime_updates and not args.adapter_dir:
        print("lorart serve: note: --allow-runtime-updates without --adapter-dir: runtime "
              "loads will be refused (403); unloads work", file=sys.stderr)
    try:
        adapters = parse_adapter_args(args.adapter) if args.adapter else shipped_adapters()
    except ValueError as exc:
        raise _ArgumentError(f"--adapter: {exc}") from exc
    for name, path in adapters:
        if not name:
            raise _ArgumentError(f"--adapter {name}={path}: empty name")
        if not (path / "adapter_config.json").is_file():
            raise _ArgumentError(f"--adapter {name}={path}: not a PEFT adapter directory "
                                 f"(no adapter_config.json)")
    return adapters


def run(args: argparse.Namespace) -> int:
    try:
        adapters = _check_arguments(args)
    except _ArgumentError as exc:
        print(f"lorart serve: {exc}", file=sys.stderr)
        return 2

    from ..serve import Engine, errors
    from ..serve.server import ServerConfig, bind_socket, run_server

    engine_cls, engine_kwargs = Engine, dict(
        max_loras=args.max_loras, max_cpu_loras=args.max_cpu_loras,
        max_num_seqs=args.max_num_seqs, max_queue=args.max_queue)
    if args.tensor_parallel:  # ranks > 0: no socket, no HTTP; they run rank 0's steps
        from ..distributed.engine import TensorParallelEngine, init_from_env

        engine_cls = TensorParallelEngine
        if init_from_env() != 0:
            engine_cls.from_gguf(args.model, **engine_kwargs).follow()
            return 0

    try:  # before the model loads: a taken port should not cost a model load
        sock = bind_socket(args.host, args.port)
    except OSError as exc:
        print(f"lorart serve: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    if host not in ("127.0.0.1", "::1", "localhost") and not args.api_key:
        print(f"lorart serve: WARNING: listening on {host} without --api-key: anyone who can "
              f"reach this port can use the server", file=sys.stderr)

    print(f"lorart serve: loading {args.model or 'SmolLM2-135M-Instruct (4-bit, embedded)'} "
          f"...", flush=True)
    engine = engine_cls.from_gguf(args.model, **engine_kwargs)
    try:
        for name, path in adapters:
            if name == engine.base_model_id:
                raise errors.InvalidRequestError(f"adapter name {name!r} is the base model's id")
            engine.add_adapter(name, str(path))
        for directory in args.adapter_dir:
            engine.add_adapter_dir(directory)
    except (OSError, errors.EngineError) as exc:
        print(f"lorart serve: {exc}", file=sys.stderr)
        sock.close()
        return 2
    names = ", ".join(a.name for a in engine.list_adapters()) or "none"
    print(f"lorart serve: http://{host}:{port}/v1  base model {engine.base_model_id!r}, "
          f"adapters: {names}", flush=True)
    config = ServerConfig(adapter_dirs=[Path(d) for d in args.adapter_dir],
                          allow_runtime_updates=args.allow_runtime_updates,
                          api_key=args.api_key, shutdown_timeout=args.shutdown_timeout)
    return run_server(engine, config, sock=sock, log_level=args.log_level)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lorart serve", description=HELP)
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
