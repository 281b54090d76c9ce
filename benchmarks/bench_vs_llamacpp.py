"""Batch-1 greedy decode: lorart vs llama.cpp on the same GGUF, without and with an adapter.

    python benchmarks/bench_vs_llamacpp.py                       # 64 tokens, 2 threads
    python benchmarks/bench_vs_llamacpp.py --threads 1 --rounds 3 --out bench-out/vs.jsonl
    python benchmarks/bench_vs_llamacpp.py --profile             # + one decode step, by part

Same SmolLM2-135M-Instruct Q4_1 file, same chat prompt (token ids from lorart's
tokenizer fed to both), greedy, ``--tokens`` new tokens (EOS suppressed on lorart's side
with ``min_new_tokens``; the prompt asks for a long answer so llama.cpp does not stop):

    lorart        lorart.from_gguf() + model.generate(...)            (the user's call)
    lorart (HF)   the same with LORART_FAST_DECODE=0: transformers' generate loop
    llama.cpp     llama-cpp-python's Llama.generate (top_k=1)
    + adapter     lorart: adapter_names=["pirate"]; llama.cpp: the same adapter exported
                  with lorart.convert.llamacpp.export_llamacpp_lora, loaded as lora_path

Decode tok/s excludes the prompt: lorart's is (N-1) / (t(N tokens) - t(1 token)), llama.cpp's
is timed from its first to its N-th token. Rounds alternate between the engines; the
median is printed. ``llama-cpp-python`` is optional (``pip install llama-cpp-python``
compiles llama.cpp, ~10+ minutes); without it only lorart runs. A llama.cpp built
elsewhere also works: ``PYTHONPATH=<dir with llama_cpp/> LLAMA_CPP_LIB_PATH=<dir with
libllama.so>``.

Same tokens: lorart suppresses EOS for the timed runs (``min_new_tokens``), llama.cpp
does not, so besides the position-wise count over all tokens the answers are compared
up to each one's first EOS; at the first divergence lorart's logit gap between its token
and llama.cpp's is printed (a near-tie that 8-bit activation rounding can flip: llama.cpp
quantizes activations to Q8 for its Q4_1 dot products, lorart keeps them float32).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROMPT = ("Write a long story about a ship that sails around the world, with many details "
          "about the crew, the weather and the ports they visit.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--adapter", default="pirate", help="a shipped adapter (lorart/data/adapters)")
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' generate loop")
    p.add_argument("--profile", action="store_true", help="also time one decode step by part")
    p.add_argument("--out", type=Path, help="append JSON lines here")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- lorart
def lorart_run(model, ids, n: int, adapter: str | None, fast: bool,
               activations: str = "float32") -> tuple[float, float, list]:
    """``(decode tok/s, end-to-end tok/s, new token ids)`` of one greedy generate."""
    import torch

    os.environ["LORART_FAST_DECODE"] = "1" if fast else "0"
    os.environ["LORART_DECODE_ACTIVATIONS"] = activations
    names = [adapter or "__base__"]
    kw = dict(do_sample=False, adapter_names=names)
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        t2 = time.perf_counter()
    path = getattr(model.generate, "last_path", "?")
    if path != ("lorart" if fast else "transformers"):
        raise RuntimeError(f"generate took the {path!r} path")
    return (n - 1) / ((t2 - t1) - (t1 - t0)), n / (t2 - t1), out[0, ids.shape[1]:].tolist()


# --------------------------------------------------------------------------- llama.cpp
def _find_libllama() -> None:
    """Point ``LLAMA_CPP_LIB_PATH`` at ``<dir>/lib`` when ``llama_cpp`` was found on
    ``PYTHONPATH=<dir>`` with its libraries beside it rather than inside the package
    (how a llama.cpp built from source is often laid out)."""
    import importlib.util

    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return
    package = Path(spec.origin).parent
    if not (package / "lib").is_dir() and (package.parent / "lib" / "libllama.so").exists():
        os.environ["LLAMA_CPP_LIB_PATH"] = str(package.parent / "lib")


def llamacpp_run(llm, ids, n: int) -> tuple[float, float, list]:
    llm.reset()
    tokens, stamps = [], []
    t0 = time.perf_counter()
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                            reset=True):
        stamps.append(time.perf_counter())
        tokens.append(int(tok))
        if len(tokens) == n:
            break
    return (n - 1) / (stamps[-1] - stamps[0]), n / (stamps[-1] - t0), tokens


def same_tokens(a: list, b: list) -> tuple[int, int]:
    """``(equal positions, length of the common prefix)``."""
    equal = sum(x == y for x, y in zip(a, b))
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return equal, prefix


def until_eos(tokens: list, eos: int) -> list:
    """The answer a user sees: tokens up to and including the first EOS."""
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


def logit_gap(model, prompt_ids, ours: list, k: int, theirs: int, adapter) -> float:
    """lorart's logit of its own token minus that of llama.cpp's at the first divergence
    ``k``: a gap near 0 is a near-tie that activation rounding can flip."""
    import torch

    from lorart.runtime import LlamaDecoder

    session = LlamaDecoder(model).session(prompt_ids.shape[1] + k + 1, adapter)
    seq = torch.cat([prompt_ids[0], torch.tensor(ours[:k], dtype=torch.int64)])
    logits = session.forward(seq)[-1]
    return float(logits[ours[k]] - logits[theirs])


# --------------------------------------------------------------------------- profile
def profile_step(model, adapter: str | None, threads: int) -> dict:
    """Thread CPU time of one decode step (position ~100) and of its parts, in us."""
    import torch

    from lorart.runtime import LlamaDecoder

    clk = time.thread_time if threads == 1 else time.perf_counter

    def best(f, n=10, rounds=5):
        f()
        times = []
        for _ in range(rounds):
            t = clk()
            for _ in range(n):
                f()
            times.append((clk() - t) / n * 1e6)
        return min(times)

    dec = LlamaDecoder(model)
    s = dec.session(4096, adapter)
    with torch.inference_mode():
        s.forward(torch.randint(0, dec.vocab, (100,)))
        step = best(lambda: s.step(5))
        x, h = torch.randn(1, dec.hidden), torch.randn(1, s.bound[0][3].in_features)
        groups = {"qkv": 0, "o": 1, "gate_up": 2, "down": 3}
        parts = {name: best(lambda i=i: [b[i](h if i == 3 else x) for b in s.bound])
                 for name, i in groups.items()}
        parts["lm_head"] = best(lambda: s.lm_head(x))
        # transformers' own step on the same model: forward of one token with a cache
        ids = torch.randint(0, dec.vocab, (1, 100))
        out = model(ids, use_cache=True, adapter_names=[adapter or "__base__"])
        cache = out.past_key_values
        one = torch.tensor([[5]])

        def hf_step():
            model(one, past_key_values=cache, use_cache=True,
                  adapter_names=[adapter or "__base__"])
            cache.crop(-1)  # drop the token again: every call runs at position 100
        hf = best(hf_step)
    kernels = sum(parts.values())
    return {"step_us": step, **{f"{k}_us": v for k, v in parts.items()},
            "glue_us": step - kernels, "hf_step_us": hf,
            "clock": "thread CPU time" if threads == 1 else "wall"}


# --------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # lorart's OpenMP kernels
    import torch

    torch.set_num_threads(args.threads)
    import lorart
    from lorart.backend.cpu import isa as cpu_isa
    from lorart.convert.llamacpp import export_llamacpp_lora
    from lorart.models import default_gguf_path

    gguf_path = default_gguf_path()
    model, tok = lorart.from_gguf(gguf_path)
    adapter_dir = Path(lorart.__file__).parent / "data" / "adapters" / args.adapter
    lorart.load_adapter(model, adapter_dir, args.adapter)
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}],
                                  add_generation_prompt=True, return_tensors="pt")
    ids = ids if isinstance(ids, torch.Tensor) else ids["input_ids"]

    engines = {}
    tmp = tempfile.TemporaryDirectory()
    if not args.no_llamacpp:
        _find_libllama()
        try:
            import llama_cpp
        except (ImportError, OSError) as e:
            print(f"llama-cpp-python not importable ({type(e).__name__}: {e}): lorart only",
                  file=sys.stderr)
        else:
            lora_file = export_llamacpp_lora(model, Path(tmp.name) / "adapter.gguf",
                                             args.adapter)
            common = dict(model_path=str(gguf_path), n_ctx=512, n_threads=args.threads,
                          n_threads_batch=args.threads, verbose=False)
            engines["llama.cpp"] = llama_cpp.Llama(**common)
            engines["llama.cpp+lora"] = llama_cpp.Llama(**common, lora_path=str(lora_file))
            print(f"llama-cpp-python {llama_cpp.__version__}")
    prompt = ids[0].tolist()
    runs = {}
    for adapter in (None, args.adapter):
        label = "adapter" if adapter else "base"
        todo = {"lorart": lambda a=adapter: lorart_run(model, ids, args.tokens, a, True),
                "lorart int16-act": lambda a=adapter: lorart_run(model, ids, args.tokens, a,
                                                                 True, "int16"),
                "lorart int8-act": lambda a=adapter: lorart_run(model, ids, args.tokens, a,
                                                                True, "int8")}
        if not args.no_hf:
            todo["lorart (HF loop)"] = lambda a=adapter: lorart_run(model, ids, args.tokens, a,
                                                                    False)
        llm = engines.get("llama.cpp+lora" if adapter else "llama.cpp")
        if llm is not None:
            todo["llama.cpp"] = lambda llm=llm: llamacpp_run(llm, prompt, args.tokens)
        for f in todo.values():  # warm-up
            f()
        results = {name: [] for name in todo}
        for _ in range(args.rounds):
            for name, f in todo.items():
                results[name].append(f())
        runs[label] = results
    os.environ.pop("LORART_FAST_DECODE", None)
    os.environ.pop("LORART_DECODE_ACTIVATIONS", None)

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": args.threads,
            "tokens": args.tokens, "prompt_tokens": len(prompt), "adapter": args.adapter,
            "torch": torch.__version__, "cpu_isa": cpu_isa(),
            "load_avg": os.getloadavg()[0]}
    print(f"\n{meta}")
    records = []
    for label, results in runs.items():
        print(f"\n== {label}: decode tok/s (median of {args.rounds}), end-to-end tok/s")
        ref_tokens = results["lorart"][-1][2]
        # lorart's own answer without EOS suppression: where it would stop by itself
        natural = model.generate(ids, max_new_tokens=args.tokens, do_sample=False,
                                 adapter_names=[args.adapter if label == "adapter" else
                                                "__base__"])
        ref_answer = until_eos(natural[0, ids.shape[1]:].tolist(), tok.eos_token_id)
        med = {name: statistics.median(r[0] for r in rs) for name, rs in results.items()}
        for name, rs in results.items():
            e2e = statistics.median(r[1] for r in rs)
            equal, prefix = same_tokens(rs[-1][2], ref_tokens)
            # lorart suppresses EOS for the timed run (min_new_tokens); llama.cpp does not.
            # The answers compare up to each one's first EOS (the text a user sees).
            answer = ref_answer if name.startswith("lorart") else until_eos(
                rs[-1][2], tok.eos_token_id)
            same_answer = answer == ref_answer
            gap = None
            if prefix < min(len(answer), len(ref_answer)) and not same_answer:
                adapter = args.adapter if label == "adapter" else None
                gap = logit_gap(model, ids, ref_tokens, prefix, rs[-1][2][prefix], adapter)
            rec = {"bench": "vs_llamacpp", "case": label, "engine": name,
                   "decode_tok_s": med[name], "e2e_tok_s": e2e,
                   "decode_tok_s_all": [r[0] for r in rs], "same_tokens_as_lorart": equal,
                   "same_prefix": prefix, "answer_tokens": len(answer),
                   "answer_same_as_lorart": same_answer, "logit_gap_at_divergence": gap,
                   **meta}
            records.append(rec)
            why = "" if gap is None else f", lorart's logit gap there {gap:.3f}"
            print(f"  {name:18s} {med[name]:7.1f}  {e2e:7.1f}   same tokens as lorart: "
                  f"{equal}/{args.tokens} (common prefix {prefix}{why}); answer up to EOS "
                  f"{len(answer)} tokens, {'same' if same_answer else 'differs'}")
        if "llama.cpp" in med:
            print(f"  lorart / llama.cpp decode: {med['lorart'] / med['llama.cpp']:.2f}x")
        for name, rs in results.items():
            print(f"  --- {name}: {tok.decode(rs[-1][2])!r}")
    if args.profile:
        for adapter in (None, args.adapter):
            prof = profile_step(model, adapter, args.threads)
            print(f"\n== one decode step at position 100, adapter={adapter}: "
                  + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in prof.items()))
            records.append({"bench": "vs_llamacpp_profile", "adapter": adapter, **prof, **meta})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
