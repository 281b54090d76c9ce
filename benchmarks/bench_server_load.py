"""A bounded load test of ``lorart serve``: throughput and latency, 1 adapter vs many.

    python benchmarks/bench_server_load.py                    # starts its own server
    python benchmarks/bench_server_load.py --requests 32 --concurrency 8 --adapters 8
    python benchmarks/bench_server_load.py --url http://127.0.0.1:8000 --names a b c

Without ``--url`` it starts ``lorart serve`` on 127.0.0.1 (a free port) with
``--adapters`` copies of the shipped adapters under distinct names (the engine treats
each name as its own adapter: own slot, own batch segment), runs the scenarios and
stops the server. With ``--url`` it talks to a server you started; only 127.0.0.1 /
localhost URLs are accepted (this is a load generator: it must not point at anyone
else's machine).

Each scenario sends ``--requests`` streaming chat requests (greedy, ``--max-tokens``
tokens, EOS ignored so every request does the same work) from ``--concurrency``
concurrent clients with the official ``openai`` client, and stops issuing new ones
after ``--time-limit`` seconds. Scenarios, back to back in one run:

- ``1 adapter``: every request uses the same adapter;
- ``N adapters``: requests round-robin over N adapters (N > --max-loras means
  evictions);
- ``base``: no adapter, for reference.

Reported per scenario: requests/s and generated tokens/s (wall clock of the scenario),
end-to-end latency and time to first token, p50 and p99, and the ratio many/1.
``--out`` appends JSON lines with the machine context.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

SHIPPED = Path(__file__).resolve().parent.parent / "lorart" / "data" / "adapters"
QUESTIONS = ["What is the capital of France?", "Name three colors.", "What do bees make?",
             "Why is the sky blue?", "Write a haiku about rain.", "What is 7 times 8?"]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


async def _one(client, model: str, question: str, max_tokens: int) -> dict:
    start = time.perf_counter()
    first = None
    tokens = 0
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True})
    async for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter()
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"latency": end - start, "ttft": (first or end) - start, "tokens": tokens}


async def run_scenario(url: str, models: list[str], requests: int, concurrency: int,
                       max_tokens: int, time_limit: float, api_key: str) -> dict:
    """Send ``requests`` requests round-robin over ``models`` from ``concurrency`` workers."""
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0,
                                timeout=max(60.0, time_limit))
    results, failures = [], []
    next_index = 0
    start = time.perf_counter()

    async def worker():
        nonlocal next_index
        while next_index < requests and time.perf_counter() - start < time_limit:
            i = next_index
            next_index += 1
            try:
                results.append(await _one(client, models[i % len(models)],
                                          QUESTIONS[i % len(QUESTIONS)], max_tokens))
            except openai.APIError as exc:
                failures.append(repr(exc))

    async with client:
        await asyncio.gather(*[worker() for _ in range(concurrency)])
    wall = time.perf_counter() - start
    latency = [r["latency"] for r in results]
    ttft = [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "failed": len(failures), "wall_s": wall,
            "requests_per_s": len(results) / wall, "tokens_per_s": tokens / wall,
            "latency_p50_s": percentile(latency, 0.5), "latency_p99_s": percentile(latency, 0.99),
            "ttft_p50_s": percentile(ttft, 0.5), "ttft_p99_s": percentile(ttft, 0.99),
            "mean_tokens": statistics.fmean(r["tokens"] for r in results) if results else 0,
            "failures": failures[:3]}


def _check_local(url: str) -> str:
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"--url must point at this machine (127.0.0.1/localhost), got {url}")
    return url.rstrip("/")


def _adapter_copies(count: int, where: Path) -> list[tuple[str, Path]]:
    shipped = sorted(d for d in SHIPPED.iterdir() if (d / "adapter_config.json").is_file())
    out = []
    for i in range(count):
        src = shipped[i % len(shipped)]
        dst = where / f"{src.name}{i}"
        shutil.copytree(src, dst)
        out.append((dst.name, dst))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="a running server (127.0.0.1 only)")
    p.add_argument("--names", nargs="+", default=None,
                   help="with --url: the adapter names to spread requests over")
    p.add_argument("--api-key", default=os.environ.get("LORART_API_KEY", "unused"))
    p.add_argument("--adapters", type=int, default=8, help="adapters in the many-adapter case")
    p.add_argument("--max-loras", type=int, default=8, help="for the server this script starts")
    p.add_argument("--requests", type=int, default=32, help="requests per scenario (bound)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--time-limit", type=float, default=120.0,
                   help="seconds per scenario after which no new request starts (bound)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    args = p.parse_args(argv)
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 256:
        raise SystemExit("--requests must be in 1..10000 and --concurrency in 1..256")

    server = None
    tmp = tempfile.TemporaryDirectory(prefix="lorart-bench-")
    try:
        if args.url:
            url = _check_local(args.url)
            names = args.names or []
            if not names:
                raise SystemExit("with --url, give --names of at least one adapter")
            base = _base_id(url, args.api_key)
        else:
            from lorart.serve.http_launch import ServerProcess

            adapters = _adapter_copies(args.adapters, Path(tmp.name))
            flags = ["--max-loras", str(args.max_loras),
                     "--max-num-seqs", str(max(args.concurrency, 1))]
            for name, path in adapters:
                flags += ["--adapter", f"{name}={path}"]
            server = ServerProcess(flags)
            server.start()
            url, names = server.url, [n for n, _ in adapters]
            base = _base_id(url, args.api_key)

        scenarios = [("1 adapter", names[:1]), (f"{len(names)} adapters", names),
                     ("base", [base])]
        context = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "machine": platform.processor() or platform.machine(),
                   "cpus": os.cpu_count(), "load_avg_1m": os.getloadavg()[0],
                   "requests": args.requests, "concurrency": args.concurrency,
                   "max_tokens": args.max_tokens, "max_loras": args.max_loras}
        rows = []
        # warm-up: first requests pay one-time costs (adapter loads, allocator growth)
        asyncio.run(run_scenario(url, names, min(len(names), 8), args.concurrency, 2, 60,
                                 args.api_key))
        for label, models in scenarios:
            row = asyncio.run(run_scenario(url, models, args.requests, args.concurrency,
                                           args.max_tokens, args.time_limit, args.api_key))
            row = {"scenario": label, **row}
            rows.append(row)
            print(f"{label:>12}: {row['requests']:3d} req ({row['failed']} failed) in "
                  f"{row['wall_s']:6.1f} s  {row['requests_per_s']:6.2f} req/s  "
                  f"{row['tokens_per_s']:7.1f} tok/s  latency p50 {row['latency_p50_s']:.2f} s "
                  f"p99 {row['latency_p99_s']:.2f} s  TTFT p50 {row['ttft_p50_s']:.2f} s "
                  f"p99 {row['ttft_p99_s']:.2f} s", flush=True)
        one, many = rows[0], rows[1]
        if one["tokens_per_s"]:
            print(f"{many['scenario']} / 1 adapter: throughput x"
                  f"{many['tokens_per_s'] / one['tokens_per_s']:.2f}, latency p50 x"
                  f"{many['latency_p50_s'] / one['latency_p50_s']:.2f}")
        print(f"(load average at start: {context['load_avg_1m']:.1f}; "
              f"{context['cpus']} CPUs)")
        if args.out:
            with open(args.out, "a") as f:
                for row in rows:
                    f.write(json.dumps({**context, **row}) + "\n")
    finally:
        if server is not None:
            server.stop()
        tmp.cleanup()
    return 0


def _base_id(url: str, api_key: str) -> str:
    import httpx

    data = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {api_key}"},
                     timeout=30).json()["data"]
    return next(m["id"] for m in data if m.get("parent") is None)


if __name__ == "__main__":
    raise SystemExit(main())
