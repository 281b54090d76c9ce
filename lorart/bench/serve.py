"""Serving benchmark: seeded Poisson traffic over many adapters on SmolLM2 4-bit.

    traffic         ``make_traffic``: arrival times (Poisson), prompt and output lengths
                    (uniform in fixed ranges), adapter per request (uniform or Zipf(1.0)
                    over N names), all from one seed
    adapters        ``ensure_adapters``: random PEFT adapters of rank 8..16 on every
                    linear layer, written (bf16 safetensors) only for names the traffic uses
    lorart engine   ``run_engine``: ``lorart.serve.Engine`` driven in this thread; requests
                    are submitted at their arrival times, tokens time-stamped per step
    baselines       ``run_peft_grouped`` (transformers + PEFT, requests grouped by adapter,
                    ``set_adapter`` + one padded ``generate`` per group — how it is done by
                    hand), ``run_peft_static`` (PEFT ``adapter_names=`` mixed batches of 16
                    in arrival order), ``run_transformers_cb`` (transformers' continuous
                    batching ``generate_batch``, base model only: it cannot route adapters)

Baselines get every request up front (no arrival waits), which favours them. Every
runner returns a JSON-able dict with output tokens/s; the engine also TTFT/ITL p50/p99,
adapter loads/evictions and peak RSS. ``benchmarks/bench_serve.py`` is the command line.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TrafficSpec:
    num_adapters: int
    popularity: str = "uniform"     # "uniform" or "zipf"
    num_requests: int = 48
    rate: float = 16.0              # requests per second (Poisson); above capacity = saturating
    prompt_len: tuple[int, int] = (16, 64)
    output_len: tuple[int, int] = (16, 48)
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.num_adapters}-adapters-{self.popularity}"


@dataclass(frozen=True)
class TrafficRequest:
    arrival_s: float
    prompt_ids: list[int]
    adapter: str | None
    max_tokens: int


def adapter_name(i: int) -> str:
    return f"bench{i:04d}"


def make_traffic(spec: TrafficSpec, vocab_size: int) -> list[TrafficRequest]:
    g = torch.Generator().manual_seed(spec.seed)
    n = spec.num_requests
    gaps = -torch.log(torch.rand(n, generator=g, dtype=torch.float64)) / spec.rate
    arrivals = torch.cumsum(gaps, 0) - gaps[0]
    if spec.popularity == "zipf":
        w = 1.0 / torch.arange(1, spec.num_adapters + 1, dtype=torch.float64)
    elif spec.popularity == "uniform":
        w = torch.ones(spec.num_adapters, dtype=torch.float64)
    else:
        raise ValueError(f"popularity must be 'uniform' or 'zipf', got {spec.popularity!r}")
    picks = torch.multinomial(w / w.sum(), n, replacement=True, generator=g)
    out = []
    for i in range(n):
        plen = int(torch.randint(spec.prompt_len[0], spec.prompt_len[1] + 1, (1,), generator=g))
        olen = int(torch.randint(spec.output_len[0], spec.output_len[1] + 1, (1,), generator=g))
        prompt = torch.randint(100, vocab_size, (plen,), generator=g).tolist()
        out.append(TrafficRequest(float(arrivals[i]), prompt, adapter_name(int(picks[i])), olen))
    return out


def ensure_adapters(model, root: Path, names: set[str]) -> None:
    """Random rank 8..16 PEFT adapters on all linear layers under ``root/<name>``."""
    from lorart.serve.testing import random_adapter, write_peft_dir

    for name in sorted(names):
        if (root / name / "adapter_model.safetensors").exists():
            continue
        i = int(name[len("bench"):])
        tensors, config = random_adapter(model, 8 + i % 9, seed=1000 + i, std=0.02)
        write_peft_dir(root / name, {k: v.to(torch.bfloat16) for k, v in tensors.items()},
                       config)


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_engine(engine, traffic: list[TrafficRequest]) -> dict:
    """Drive ``engine`` (not started) with ``traffic`` in real time; per-token times."""
    from lorart.serve import SamplingParams

    m0 = engine.metrics()
    pending = list(traffic)
    live: list[tuple[TrafficRequest, object, float, list[float]]] = []
    done = []
    start = time.perf_counter()
    while pending or live:
        now = time.perf_counter() - start
        while pending and pending[0].arrival_s <= now:
            r = pending.pop(0)
            h = engine.submit(prompt_token_ids=r.prompt_ids, adapter=r.adapter,
                              sampling=SamplingParams(max_tokens=r.max_tokens, ignore_eos=True))
            live.append((r, h, start + r.arrival_s, []))
        if not engine.step():
            if pending and not live:
                time.sleep(max(0.0, pending[0].arrival_s - (time.perf_counter() - start)))
            else:
                time.sleep(0.001)
        t = time.perf_counter()
        for item in list(live):
            for d in item[1].poll():
                item[3].extend([t] * len(d.token_ids))
                if d.finished:
                    live.remove(item)
                    done.append(item)
    wall = time.perf_counter() - start
    m1 = engine.metrics()
    ttft = [times[0] - arrival for _, _, arrival, times in done if times]
    itl = [b - a for _, _, _, times in done for a, b in zip(times, times[1:])]
    tokens = sum(len(times) for *_, times in done)
    return {"output_tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "ttft_p50_s": _pct(ttft, 50), "ttft_p99_s": _pct(ttft, 99),
            "itl_p50_s": _pct(itl, 50), "itl_p99_s": _pct(itl, 99),
            "steps": m1.steps_total - m0.steps_total,
            "slot_loads": m1.adapter_loads_total - m0.adapter_loads_total,
            "slot_evictions": m1.adapter_evictions_total - m0.adapter_evictions_total,
            "disk_loads": m1.adapter_disk_loads_total - m0.adapter_disk_loads_total,
            "host_evictions": m1.adapter_host_evictions_total - m0.adapter_host_evictions_total,
            "preemptions": m1.preemptions_total - m0.preemptions_total,
            "errors": sum(1 for _, h, _, _ in done if h.error is not None),
            "peak_rss_mib": peak_rss_mib()}


def load_peft_model(adapter_dirs: dict[str, Path]):
    """transformers' own load of the SmolLM2 GGUF (dequantized to float32) with the
    adapters attached by PEFT."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lorart.models import default_gguf_path

    path = default_gguf_path()
    base = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    names = sorted(adapter_dirs)
    model = PeftModel.from_pretrained(base, str(adapter_dirs[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapter_dirs[name]), adapter_name=name)
    return model.eval()


def _padded(prompts: list[list[int]], pad: int = 0):
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.int64)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as generate wants for decoder-only models
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def _generate_group(model, reqs: list[TrafficRequest], **kw) -> int:
    ids, mask = _padded([r.prompt_ids for r in reqs])
    n = max(r.max_tokens for r in reqs)
    with torch.inference_mode():
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0, **kw)
    return sum(r.max_tokens for r in reqs)  # tokens the requests asked for (extra are waste)


def run_peft_grouped(model, traffic: list[TrafficRequest], batch: int = 16) -> dict:
    """Group requests by adapter; ``set_adapter`` + padded ``generate`` per group (<= batch)."""
    groups: dict[str, list[TrafficRequest]] = {}
    for r in traffic:
        groups.setdefault(r.adapter, []).append(r)
    start = time.perf_counter()
    tokens = 0
    for name, reqs in groups.items():
        model.set_adapter(name)
        for i in range(0, len(reqs), batch):
            tokens += _generate_group(model, reqs[i:i + batch])
    wall = time.perf_counter() - start
    return {"output_tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "groups": len(groups), "peak_rss_mib": peak_rss_mib()}


def run_peft_static(model, traffic: list[TrafficRequest], batch: int = 16) -> dict:
    """Static mixed batches in arrival order with PEFT's per-row ``adapter_names=``."""
    start = time.perf_counter()
    tokens = 0
    for i in range(0, len(traffic), batch):
        reqs = traffic[i:i + batch]
        tokens += _generate_group(model, reqs, adapter_names=[r.adapter for r in reqs])
    wall = time.perf_counter() - start
    return {"output_tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "peak_rss_mib": peak_rss_mib()}


def run_transformers_cb(model, traffic: list[TrafficRequest]) -> dict:
    """transformers' continuous batching (``generate_batch``) on the lorart model, base
    only (its paged-attention manager has no per-request adapter routing)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    n = max(r.max_tokens for r in traffic)
    # Left to itself the manager sizes its paged cache from free memory (14 GB RSS for a
    # tiny model here): bound it to what these requests need.
    tokens = sum(len(r.prompt_ids) + r.max_tokens for r in traffic)
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=tokens // 16 + 2 * len(traffic),
                                  max_batch_tokens=512)
    cfg = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate_batch(inputs=[r.prompt_ids for r in traffic], generation_config=cfg,
                                   continuous_batching_config=cb, progress_bar=False)
    wall = time.perf_counter() - start
    tokens = sum(len(o.generated_tokens) for o in out.values())
    return {"output_tokens": tokens, "wall_s": wall, "tok_per_s": tokens / wall,
            "peak_rss_mib": peak_rss_mib()}


def run_case(case, cfg) -> list[dict]:
    """``lorart bench`` records for an ``EndToEndCase(task="serve")``: ``case.batch``
    requests of ``case.tokens`` output tokens over ``case.adapters`` adapters (uniform,
    saturating arrivals): the engine, and the grouped transformers+PEFT baseline."""
    import tempfile

    from .suite import add_speedups, base_record
    from .timing import Timing

    recs = [base_record(case, "hf_peft_grouped", "baseline"),
            base_record(case, "lorart:engine", "lorart")]
    if cfg.device.type != "cpu":
        for r in recs:
            r.update(status="skipped", reason="measured on CPU only")
        return recs
    try:
        import lorart
        from lorart.serve import Engine

        model, tokenizer = lorart.from_gguf()
        spec = TrafficSpec(case.adapters, "uniform", case.batch, rate=100.0,
                           output_len=(case.tokens, case.tokens))
        traffic = make_traffic(spec, model.config.vocab_size)
        with tempfile.TemporaryDirectory(prefix="lorart-serve-") as tmp:
            root = Path(tmp)
            ensure_adapters(model, root, {r.adapter for r in traffic})
            engine = Engine(model, tokenizer, max_loras=16)
            engine.add_adapter_dir(root)
            run_engine(engine, traffic[:2])  # warm-up
            res = {"lorart:engine": run_engine(engine, traffic)}
            del model
            peft_model = load_peft_model({r.adapter: root / r.adapter for r in traffic})
            res["hf_peft_grouped"] = run_peft_grouped(peft_model, traffic)
    except Exception as exc:
        for r in recs:
            r.update(status="error", reason=f"{type(exc).__name__}: {exc}"[:300])
        return recs
    for r in recs:
        out = res[r["impl"]]
        r["tokens_per_s"] = out["tok_per_s"]
        r["time_s"] = Timing.from_samples([out["wall_s"]]).as_dict()  # one run
        r["serve"] = out
    add_speedups(recs)
    return recs
