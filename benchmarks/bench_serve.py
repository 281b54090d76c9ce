"""Serving benchmark: lorart's engine vs transformers+PEFT on SmolLM2 4-bit, many adapters.

    python benchmarks/bench_serve.py                       # 1/8/64/512 adapters, uniform+zipf,
                                                           # baselines at 64 (~10 min busy CPU)
    python benchmarks/bench_serve.py --adapters 1,64 --popularity uniform --requests 24

Seeded Poisson traffic (see ``lorart.bench.serve``), the same requests for every system.
Writes ``results.jsonl`` (one record per run, with context), ``report.md`` and
``serve_throughput.png`` / ``serve_latency.png`` into ``--out``. Keep runs short: the
development machine is shared (say so when quoting numbers).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from lorart.bench import serve as bs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--adapters", default="1,8,64,512")
    ap.add_argument("--popularity", default="uniform,zipf")
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--rate", type=float, default=16.0, help="arrivals per second (Poisson)")
    ap.add_argument("--prompt-len", default="16,64", help="min,max prompt tokens (uniform)")
    ap.add_argument("--output-len", default="16,48", help="min,max output tokens (uniform)")
    ap.add_argument("--max-loras", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--baselines-at", default="64", help="adapter counts to run baselines at")
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--no-engine", action="store_true", help="baselines only")
    ap.add_argument("--adapter-dir", default=None, help="reuse generated adapters here")
    ap.add_argument("--out", default="benchmarks/results/serve")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    import lorart
    from lorart.serve import Engine

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    root = Path(args.adapter_dir or tempfile.mkdtemp(prefix="lorart-serve-adapters-"))
    context = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.machine(), "cpus": os.cpu_count(),
               "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
               "load_avg": os.getloadavg()[0], "requests": args.requests, "rate": args.rate,
               "max_loras": args.max_loras, "seed": args.seed, "prompt_len": args.prompt_len,
               "output_len": args.output_len}
    model, tokenizer = lorart.from_gguf()
    vocab = model.config.vocab_size
    plen = tuple(int(v) for v in args.prompt_len.split(","))
    olen = tuple(int(v) for v in args.output_len.split(","))
    specs = [bs.TrafficSpec(int(n), pop, args.requests, args.rate, plen, olen, seed=args.seed)
             for n in args.adapters.split(",") for pop in args.popularity.split(",")
             if not (int(n) == 1 and pop == "zipf")]
    traffic = {s.name: bs.make_traffic(s, vocab) for s in specs}
    bs.ensure_adapters(model, root, {r.adapter for t in traffic.values() for r in t})
    records = []

    def attempt(system, spec, fn, *a):
        try:
            record(system, spec, fn(*a))
        except Exception as exc:  # a baseline that fails is reported, not fatal
            print(f"{system} at {spec.name} failed: {type(exc).__name__}: {exc}", flush=True)

    def record(system, spec, res):
        rec = {"system": system, "case": spec.name, "adapters": spec.num_adapters,
               "popularity": spec.popularity, **res, "context": context}
        records.append(rec)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                          for k, v in rec.items() if k != "context"}), flush=True)

    def engine():
        e = Engine(model, tokenizer, max_loras=args.max_loras, max_num_seqs=args.max_num_seqs,
                   max_cpu_loras=64, max_batch_tokens=512)
        e.add_adapter_dir(root)
        return e

    # warm-up (first forwards, allocator), not recorded
    warm = bs.make_traffic(bs.TrafficSpec(1, num_requests=4, rate=100.0, output_len=(4, 4)),
                           vocab)
    bs.ensure_adapters(model, root, {r.adapter for r in warm})
    if not args.no_engine:
        bs.run_engine(engine(), warm)
    for spec in specs if not args.no_engine else []:
        e = engine()
        record("lorart-engine", spec, bs.run_engine(e, traffic[spec.name]))
        e.shutdown()  # frees its KV cache and slots before the next case
        del e
        gc.collect()

    if not args.no_baselines:
        counts = {int(n) for n in args.baselines_at.split(",")}
        base_specs = [s for s in specs if s.num_adapters in counts and s.popularity == "uniform"]
        if base_specs:
            t0 = time.perf_counter()
            # transformers' continuous batching, base model (no adapter routing), once
            attempt("transformers-cb (base only)", base_specs[0], bs.run_transformers_cb, model,
                    traffic[base_specs[0].name])
            del model
            for spec in base_specs:
                reqs = traffic[spec.name]
                peft_model = bs.load_peft_model({r.adapter: root / r.adapter for r in reqs})
                attempt("peft-grouped-set_adapter", spec, bs.run_peft_grouped, peft_model, reqs)
                attempt("peft-adapter_names-static16", spec, bs.run_peft_static, peft_model, reqs)
                del peft_model
            print(f"baselines took {time.perf_counter() - t0:.0f} s", flush=True)

    write_report(records, out)
    return 0


def write_report(records: list[dict], out: Path) -> None:
    eng = {r["case"]: r for r in records if r["system"] == "lorart-engine"}
    one = eng.get("1-adapters-uniform")
    lines = ["| system | case | tok/s | vs 1 adapter | TTFT p50/p99 s | ITL p50/p99 s | "
             "slot loads/evictions | disk loads | peak RSS MiB |", "|" + "---|" * 9]
    for r in records:
        rel = f"{r['tok_per_s'] / one['tok_per_s']:.2f}x" if one else ""
        lat = itl = loads = disk = ""
        if r["system"] == "lorart-engine":
            lat = f"{r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f}"
            itl = f"{r['itl_p50_s']:.3f} / {r['itl_p99_s']:.3f}"
            loads = f"{r['slot_loads']} / {r['slot_evictions']}"
            disk = str(r["disk_loads"])
        lines.append(f"| {r['system']} | {r['case']} | {r['tok_per_s']:.1f} | {rel} | {lat} | "
                     f"{itl} | {loads} | {disk} | {r['peak_rss_mib']:.0f} |")
    for r in records:
        if r["system"].startswith("peft") and r["case"] in eng:
            lines.append(f"\nlorart engine / {r['system']} at {r['case']}: "
                         f"{eng[r['case']]['tok_per_s'] / r['tok_per_s']:.2f}x")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(9, 4))
    labels = [f"{r['system']}\n{r['case']}" for r in records]
    ax.barh(labels, [r["tok_per_s"] for r in records])
    ax.set_xlabel("output tokens/s")
    ax.set_title("SmolLM2-135M 4-bit serving, Poisson traffic (shared 2-core CPU)")
    fig.tight_layout()
    fig.savefig(out / "serve_throughput.png", dpi=100)
    fig, ax = plt.subplots(figsize=(9, 4))
    cases = list(eng)
    x = range(len(cases))
    for key, mark in (("ttft_p50_s", "o-"), ("ttft_p99_s", "o--"), ("itl_p50_s", "s-"),
                      ("itl_p99_s", "s--")):
        ax.plot(x, [eng[c][key] for c in cases], mark, label=key)
    ax.set_xticks(list(x), cases, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("seconds")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "serve_latency.png", dpi=100)


if __name__ == "__main__":
    raise SystemExit(main())
