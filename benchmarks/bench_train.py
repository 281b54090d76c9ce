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
    *-ckpt        the same with transformers' activation checkpointing (non-reentrant)

Both run the identical step: decoder forward, output layer on the labelled positions,
cross-entropy, backward, AdamW over the LoRA parameters (lr 1e-4). Input: random token
ids ``[batch, seq]``, labels on the second half of each row (a "response").

Memory (Linux /proc): ``model_mb`` = RSS after loading minus RSS after imports;
``train_peak_mb`` = peak RSS during the timed steps (VmHWM after resetting it with
``/proc/self/clear_refs``) minus RSS after imports, i.e. weights + activations +
gradients + optimizer state, without the loader's transient buffers. Time: median and
min/max of per-step wall time after ``--warmup`` untimed steps. The machine's load
average is recorded: on a shared machine the times are only comparable within one run.
"""

from __future__ import annotations

import argparse
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

    ckpt = variant.endswith("-ckpt")
    variant = variant.removesuffix("-ckpt")
    bf16 = variant.endswith("-bf16")
    variant = variant.removesuffix("-bf16")
    if variant == "lorart-4bit":
        model, _ = lorart.from_gguf(tokenizer=False)
        lorart.add_adapter(model, "bench", r=rank, lora_alpha=2 * rank,
                           target_modules="all-linear")
        lorart.train.freeze_all_but_adapters(model, ["bench"])
        lorart.set_adapter(model, "bench")
    elif variant == "peft-float":
        from peft import LoraConfig, get_peft_model

        model, _ = lorart.from_gguf(quantized=False, tokenizer=False)
        _to_plain_linear(model)
        model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank,
                                                 target_modules="all-linear", lora_dropout=0.0))
    else:
        raise ValueError(f"unknown variant {variant!r}")
    if bf16:  # QLoRA-style compute dtype: frozen float weights in bf16, adapters stay fp32
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(torch.bfloat16)
    if ckpt:
        from lorart.train.trainer import enable_checkpointing

        enable_checkpointing(model)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, params, torch.optim.AdamW(params, lr=1e-4)


def run_variant(variant: str, rank: int, batch: int, seq: int, steps: int, warmup: int) -> dict:
    """One variant in this process; returns its measurements."""
    import torch

    from lorart.train import Batch, response_losses

    rss_imports = _status_kb("VmRSS")
    model, params, opt = _load(variant, rank)
    import gc

    gc.collect()
    rss_model = _status_kb("VmRSS")
    g = torch.Generator().manual_seed(0)
    vocab = 49152
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = ids.clone()
    labels[:, : seq // 2] = -100
    data = Batch(ids, labels, torch.ones_like(ids), ["bench"] * batch)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        losses, _ = response_losses(model, data)
        loss = losses.mean()
        loss.backward()
        opt.step()
        return float(loss)

    for _ in range(warmup):
        step()
    _reset_peak()
    times, losses = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    peak = _status_kb("VmHWM")
    return {
        "variant": variant,
        "step_s_median": statistics.median(times),
        "step_s_min": min(times),
        "step_s_max": max(times),
        "tokens_per_s": batch * seq / statistics.median(times),
        "model_mb": (rss_model - rss_imports) / 1024,
        "train_peak_mb": (peak - rss_imports) / 1024,
        "trainable_params": sum(p.numel() for p in params),
        "losses": losses,
        "backend": _backend_name(),
    }


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
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.child:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        res = run_variant(args.child, args.rank, args.batch, args.seq, args.steps, args.warmup)
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
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    results = []
    for variant in args.variants.split(","):
        load_before = os.getloadavg()[0]
        cmd = [sys.executable, __file__, "--child", variant, "--rank", str(args.rank),
               "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
               "--warmup", str(args.warmup)] + (["--threads", str(args.threads)]
                                                if args.threads else [])
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
    for suffix in ("", "-ckpt", "-bf16", "-bf16-ckpt"):
        a, b = by_name.get("lorart-4bit" + suffix), by_name.get("peft-float" + suffix)
        if a is None or b is None:
            continue
        print(f"\n{a['variant']} vs {b['variant']}: step time {a['step_s_median']:.2f} s vs "
              f"{b['step_s_median']:.2f} s ({b['step_s_median'] / a['step_s_median']:.2f}x "
              f"faster); training peak RSS {a['train_peak_mb']:.0f} MB vs "
              f"{b['train_peak_mb']:.0f} MB ({a['train_peak_mb'] / b['train_peak_mb']:.2f}x); "
              f"model RSS {a['model_mb']:.0f} MB vs {b['model_mb']:.0f} MB")
    if args.out:
        with open(args.out, "a") as f:
            for r in results:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
