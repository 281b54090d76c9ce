"""LoRA training step on SmolLM2-135M: lorart 4-bit base vs PEFT on the float model.

    python benchmarks/bench_train.py                      # rank 16, all linear layers, 8 x 256
    python benchmarks/bench_train.py --steps 5 --threads 1 --out bench_train.jsonl

Variants, each in a fresh subprocess (so memory numbers do not mix):

    lorart-4bit   lorart.from_gguf(): SmolLM2-135M-Instruct's Q4_1 weights packed in
                  LoRALinear layers; lorart adapter on every linear layer but lm_head
    peft-float    the same weights dequantized to float32 (from_gguf(quantized=False),
                  unpatched to plain nn.Linear), PEFT LoraConfig(target_modules="all-linear")
    *-bf16        QLoRA-style compute dtype: the frozen float weights (embeddings, norms;
                  PEFT's dense base too) cast to bfloat16, so activations are bf16; the LoRA
                  parameters stay float32 (lorart casts them per call, PEFT casts its input)
    *-ckpt        with activation checkpointing of every decoder layer (PEFT: transformers'
                  non-reentrant checkpointing; lorart: ``lorart.train.checkpoint_layers``)
    *-ckpt-mlp    lorart only: selective checkpointing of the MLP (``-ckpt-attn``: the
                  attention block) of every decoder layer

lorart is set up exactly as ``lorart train`` / ``LoRATrainer`` do it
(``lorart.train.prepare_for_training``: frozen weights in the compute dtype, lean
RMSNorm/SwiGLU activations) and its loss is the fused output layer + cross-entropy
(``lorart.losses``). PEFT runs the step as before: decoder forward, output layer on the
labelled positions only, float32 cross-entropy (``response_losses(fused=False)``).
Both: backward, AdamW over the LoRA parameters (lr 1e-4). Input: random token ids
``[batch, seq]``, labels on the second half of each row (a "response").

``--profile`` adds, per variant, the wall time of forward / backward / optimizer and
torch.profiler's top operators (self CPU time) of one step. ``--curve N --plot out.png``
trains N steps on the shipped pirate JSONL instead (same LoRA init in both variants,
seeded per layer) and plots both loss curves.

Memory (Linux /proc): ``model_mb`` = RSS after loading minus RSS after imports;
``train_peak_mb`` = peak RSS during the timed steps (VmHWM after resetting it with
``/proc/self/clear_refs``) minus RSS after imports, i.e. weights + activations +
gradients + optimizer state, without the loader's transient buffers. Time: median and
min/max of per-step wall time after ``--warmup`` untimed steps, and the median CPU time
of the process per step (``step_cpu_s_median``): with ``--threads 1`` on a shared,
oversubscribed machine that is the comparable number (the wall time then mostly measures
the other processes' load). The machine's load average is recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # "5" resets VmHWM (the peak RSS) to the current RSS


def _to_plain_linear(model) -> None:
    """Replace every ``LoRALinear`` (dense base) by an ``nn.Linear`` sharing its weight,
    and drop lorart's hooks: a plain transformers model for PEFT."""
    from torch import nn

    import lorart

    for path, module in list(model.named_modules()):
        if isinstance(module, lorart.LoRALinear):
            linear = nn.Linear(module.in_features, module.out_features,
                               bias=module.bias is not None)
            linear.weight = module.weight
            if module.bias is not None:
                linear.bias = module.bias
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, linear)
    lorart.unpatch(model)


def _load(variant: str, rank: int):
    import torch

    import lorart
    import lorart.train

    ckpt = False  # "-ckpt": every decoder layer; "-ckpt-mlp" / "-ckpt-attn": that block only
    for block in ("-ckpt-mlp", "-ckpt-attn", "-ckpt"):
        if variant.endswith(block):
            ckpt = block.removeprefix("-ckpt-") if block != "-ckpt" else True
            variant = variant.removesuffix(block)
            break
    bf16 = variant.endswith("-bf16")
    variant = variant.removesuffix("-bf16")
    if variant == "lorart-4bit":
        model, _ = lorart.from_gguf(tokenizer=False)
        lorart.add_adapter(model, "bench", r=rank, lora_alpha=2 * rank,
                           target_modules="all-linear")
        lorart.train.freeze_all_but_adapters(model, ["bench"])
        lorart.set_adapter(model, "bench")
        _same_init(model)
        lorart.train.prepare_for_training(model, "bfloat16" if bf16 else "float32",
                                          gradient_checkpointing=ckpt)
    elif variant == "peft-float":
        from peft import LoraConfig, get_peft_model

        model, _ = lorart.from_gguf(quantized=False, tokenizer=False)
        _to_plain_linear(model)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                 target_modules="all-linear", lora_dropout=0.0))
        _same_init(model)
        if bf16:  # QLoRA-style compute dtype: frozen float weights in bf16, adapters fp32
            for p in model.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(torch.bfloat16)
        if ckpt:  # transformers' checkpointing: every layer (no block choice)
            from lorart.train.trainer import enable_checkpointing

            enable_checkpointing(model)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=1e-4)


def _same_init(model) -> None:
    """PEFT's LoRA init (A kaiming-uniform, B zero), drawn from one seed per layer in
    module order, so lorart and PEFT start from identical adapters."""
    import math

    import torch
    from torch import nn

    a_params = [p for n, p in model.named_parameters() if "lora_A" in n and p.requires_grad]
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for p in a_params:
            bound = 1 / math.sqrt(p.shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, in]
            p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                nn.init.zeros_(p)


def _random_batches(batch: int, seq: int):
    import torch

    from lorart.train import Batch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    data = Batch(ids, labels, torch.ones_like(ids), ["bench"] * batch)
    return lambda step: data


def _pirate_batches(batch: int, seq: int):
    from importlib.resources import files

    import lorart
    from lorart.train import collate, load_examples
    from lorart.train.data import batch_order

    tok = lorart.models.gguf_llama.load_tokenizer(lorart.models.gguf_llama.default_gguf_path())
    path = files("lorart") / "data" / "train" / "pirate.jsonl"
    examples = load_examples(str(path), tok, seq, "bench")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    return lambda step: collate([examples[i] for i in batch_order(len(examples), batch, step,
                                                                   0)], pad)


def run_variant(variant: str, rank: int, batch: int, seq: int, steps: int, warmup: int,
                profile: bool = False, curve: int = 0) -> dict:
    """One variant in this process; returns its measurements."""

    from lorart.train import recompute_cheap_outputs, response_losses

    rss_imports = _status_kb("VmRSS")
    model, params, opt = _load(variant, rank)
    import gc

    gc.collect()
    rss_model = _status_kb("VmRSS")
    batches = _pirate_batches(batch, seq) if curve else _random_batches(batch, seq)
    fused = variant.startswith("lorart")
    phases = {"forward": [], "backward": [], "optimizer": []}

    def step(i: int) -> float:
        data = batches(i)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with recompute_cheap_outputs() if fused else contextlib.nullcontext():
            losses, _ = response_losses(model, data, fused=fused)  # as lorart.train's step
        loss = losses.mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        t3 = time.perf_counter()
        for k, t in zip(phases, (t1 - t0, t2 - t1, t3 - t2)):
            phases[k].append(t)
        return float(loss)

    if curve:
        return {"variant": variant, "curve": [step(i) for i in range(curve)],
                "backend": _backend_name()}
    for i in range(warmup):
        step(i)
    for k in phases:
        phases[k].clear()
    _reset_peak()
    times, cpu_times, losses = [], [], []
    for i in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step(i))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    peak = _status_kb("VmHWM")
    extra = {"phases_s_median": {k: statistics.median(v) for k, v in phases.items()}}
    if profile:
        extra["profile_top"] = _profile(lambda: step(0))
    return {**extra,
        "variant": variant,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "step_cpu_s_median": statistics.median(cpu_times),
        "step_s_max": max(times),
        "tokens_per_s": batch * seq / statistics.median(times),
        "model_mb": (rss_model - rss_imports) / 1024,
        "train_peak_mb": (peak - rss_imports) / 1024,
        "trainable_params": sum(p.numel() for p in params),
        "losses": losses,
        "backend": _backend_name(),
    }


def _profile(step, top: int = 18) -> list:
    """``[(operator, self CPU ms, calls)]`` of one step, the largest first."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [(e.key, round(e.self_cpu_time_total / 1e3, 1), e.count) for e in rows[:top]]


def _backend_name() -> str:
    from lorart.backend import available_backends

    forced = os.environ.get("LORART_BACKEND")
    return forced or ",".join(n for n, (ok, _) in available_backends().items() if ok)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None,
                   help="OMP_NUM_THREADS for both variants (default: torch's default)")
    p.add_argument("--variants", default="lorart-4bit,peft-float")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--profile", action="store_true", help="phase times + top operators")
    p.add_argument("--return-freed-memory", action="store_true",
                   help="glibc returns freed blocks to the OS, so peak RSS follows the live "
                        "tensors instead of what the heap kept from earlier steps")
    p.add_argument("--curve", type=int, default=0, metavar="N",
                   help="train N steps on pirate.jsonl and record the loss curve instead")
    p.add_argument("--plot", default=None, help="with --curve: write the curves' PNG here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        res = run_variant(args.child, args.rank, args.batch, args.seq, args.steps, args.warmup,
                          args.profile, args.curve)
        res["torch_threads"] = torch.get_num_threads()
        print("RESULT " + json.dumps(res), flush=True)
        return 0

    import torch

    context = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "shape": f"rank {args.rank}, all linear, batch {args.batch} x {args.seq} tokens",
    }
    env = dict(os.environ)
    if args.return_freed_memory:  # glibc: mmap every block >= 64 KiB, give it back on free
        env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    results = []
    for variant in args.variants.split(","):
        load_before = os.getloadavg()[0]
        cmd = [sys.executable, __file__, "--child", variant, "--rank", str(args.rank),
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--curve", str(args.curve)]
        cmd += (["--threads", str(args.threads)] if args.threads else [])
        cmd += ["--profile"] if args.profile else []
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"{variant} failed (rc {proc.returncode}):\n{proc.stderr[-2000:]}",
                  file=sys.stderr)
            return 1
        res = {**context, **json.loads(line[len("RESULT "):]),
               "loadavg_1m": [load_before, os.getloadavg()[0]]}
        results.append(res)
        print(json.dumps(res), flush=True)
    by_name = {r["variant"]: r for r in results}
    if args.curve:
        _report_curves(results, args.plot)
    pairs = [("lorart-4bit" + s, "peft-float" + s) for s in ("", "-ckpt", "-bf16", "-bf16-ckpt")]
    pairs += [("lorart-4bit-bf16" + s, "peft-float-bf16") for s in ("-ckpt", "-ckpt-mlp",
                                                                     "-ckpt-attn")]
    for name_a, name_b in pairs:
        a, b = by_name.get(name_a), by_name.get(name_b)
        if a is None or b is None or args.curve:
            continue
        print(f"\n{a['variant']} vs {b['variant']}: CPU time per step "
              f"{a['step_cpu_s_median']:.2f} s vs {b['step_cpu_s_median']:.2f} s "
              f"({b['step_cpu_s_median'] / a['step_cpu_s_median']:.2f}x); "
              f"step time {a['step_s_median']:.2f} s vs "
              f"{b['step_s_median']:.2f} s ({b['step_s_median'] / a['step_s_median']:.2f}x "
              f"faster); training peak RSS {a['train_peak_mb']:.0f} MB vs "
              f"{b['train_peak_mb']:.0f} MB ({a['train_peak_mb'] / b['train_peak_mb']:.2f}x); "
              f"model RSS {a['model_mb']:.0f} MB vs {b['model_mb']:.0f} MB")
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0


def _report_curves(results: list[dict], plot: str | None) -> None:
    """Print how far the curves are apart; plot them when asked."""
    curves = {r["variant"]: r["curve"] for r in results}
    names = list(curves)
    if len(names) >= 2:
        a, b = curves[names[0]], curves[names[1]]
        diff = [abs(x - y) for x, y in zip(a, b)]
        print(f"\n{names[0]} vs {names[1]} over {len(diff)} steps: first loss {a[0]:.3f} vs "
              f"{b[0]:.3f}, last {a[-1]:.3f} vs {b[-1]:.3f}; |difference| mean "
              f"{statistics.mean(diff):.4f}, max {max(diff):.4f}")
    if plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        for name, c in curves.items():
            ax.plot(range(1, len(c) + 1), c, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("mean response-token loss")
        ax.set_title(f"SmolLM2-135M LoRA r{results[0].get('rank', 16)}, pirate.jsonl")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plot, dpi=120)
        print(f"wrote {plot}")


if __name__ == "__main__":
    sys.exit(main())
