"""Batch-1 greedy decode: lorart vs llama.cpp on the same GGUF, without and with an adapter.

    PYTHONPATH=<dir with llama_cpp/> python benchmarks/bench_vs_llamacpp.py   # 1 and 2 threads
    python benchmarks/bench_vs_llamacpp.py --threads 1 --rounds 3 --out bench-out/vs.jsonl
    python benchmarks/bench_vs_llamacpp.py --threads 1 --profile   # + one decode step, by part
    python benchmarks/bench_vs_llamacpp.py --threads 1 --accuracy  # + logits vs float32

Ends with a SUMMARY table: tok/s of both, the ratio against the issue's target (>= 1.0x
without an adapter, >= 1.2x with one), same greedy tokens as llama.cpp (target 60/64) and
the adapter's cost. ~2.5 minutes for both thread counts on the 2-core machine.

Same SmolLM2-135M-Instruct Q4_1 file, same chat prompt (token ids from lorart's
tokenizer fed to both), greedy, ``--tokens`` new tokens (EOS suppressed on lorart's side
with ``min_new_tokens``; the prompt asks for a long answer so llama.cpp does not stop):

    lorart        lorart.from_gguf() + model.generate(...)            (the user's call:
                  the batch-1 decoder, int16 activations by default)
    float32-act   the same with LORART_DECODE_ACTIVATIONS=float32 (transformers' tokens)
    int8-act      the same with LORART_DECODE_ACTIVATIONS=int8 (llama.cpp's rounding)
    lorart (HF)   with --hf: LORART_FAST_DECODE=0, transformers' generate loop
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
up to each one's first EOS; at llama.cpp's first divergence from transformers' tokens the
float32 logit gap between the two tokens is printed (a near-tie that 8-bit activation
rounding can flip: llama.cpp quantizes activations to Q8 for its Q4_1 dot products).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = ("Write a long story about a ship that sails around the world, with many details "
          "about the crew, the weather and the ports they visit.")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                   help="thread counts; each runs in its own process (OpenMP fixes its "
                        "thread count at start)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--adapter", default="pirate", help="a shipped adapter (lorart/data/adapters)")
    p.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp")
    p.add_argument("--hf", action="store_true", help="also time transformers' generate loop")
    p.add_argument("--profile", action="store_true", help="also time one decode step by part")
    p.add_argument("--accuracy", type=int, nargs="?", const=40, default=0, metavar="STEPS",
                   help="also compare each mode's logits with float32 over STEPS (40) "
                        "teacher-forced decode steps, no adapter")
    p.add_argument("--out", type=Path, help="append JSON lines here")
    p.add_argument("--summary-out", type=Path, help=argparse.SUPPRESS)  # (child processes)
    return p.parse_args(argv)


# --------------------------------------------------------------------------- lorart
def lorart_run(model, ids, n: int, adapter: str | None, fast: bool,
               activations: str | None = None) -> tuple[float, float, list]:
    """``(decode tok/s, end-to-end tok/s, new token ids)`` of one greedy generate
    (``activations`` None: the default of ``model.generate``)."""
    import torch

    os.environ["LORART_FAST_DECODE"] = "1" if fast else "0"
    if activations is None:
        os.environ.pop("LORART_DECODE_ACTIVATIONS", None)
    else:
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


# --------------------------------------------------------------------------- accuracy
def accuracy(model, prompt_ids, steps: int, llm=None) -> dict:
    """``{mode: (relative RMS of the logits vs float32, argmax agreements)}`` over ``steps``
    one-token decode steps fed float32's own greedy tokens (teacher-forced, so one flip does
    not change what follows), no adapter; llama.cpp's from the same tokens one at a time."""
    import torch

    from lorart.runtime import LlamaDecoder

    def lorart_logits(activations: str, forced: list | None) -> tuple[torch.Tensor, list]:
        session = LlamaDecoder(model, activations=activations).session(
            prompt_ids.shape[1] + steps + 1, None)
        logits, tokens = [session.forward(prompt_ids[0])[-1]], []
        for i in range(steps):
            tokens.append(int(logits[-1].argmax()) if forced is None else forced[i])
            logits.append(session.step(tokens[-1])[-1])
        return torch.stack(logits[:steps]), tokens

    with torch.inference_mode():
        ref, tokens = lorart_logits("float32", None)
        got = {f"lorart {a}": lorart_logits(a, tokens)[0] for a in ("int16", "int8")}
    if llm is not None:
        llm.reset()
        llm.eval(prompt_ids[0].tolist())
        rows = [torch.tensor(llm.scores[llm.n_tokens - 1])]
        for t in tokens[:-1]:
            llm.eval([t])
            rows.append(torch.tensor(llm.scores[llm.n_tokens - 1]))
        got["llama.cpp"] = torch.stack(rows).float()
    return {name: (float((g - ref).norm() / ref.norm()),
                   int((g.argmax(-1) == ref.argmax(-1)).sum())) for name, g in got.items()}


# --------------------------------------------------------------------------- profile
def profile_step(model, adapter: str | None, threads: int) -> dict:
    """Thread CPU time of one decode step (position ~100) and of its parts, in us: the
    float32-activation step (its parts are the float32 kernels, callable one by one) and,
    as ``step_default_us``, the step ``generate`` runs (int16 activations)."""
    import torch

    from lorart.runtime import LlamaDecoder
    from lorart.runtime.generate import DEFAULT_ACTIVATIONS

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
        prompt = torch.randint(0, dec.vocab, (100,))
        s.forward(prompt)
        step = best(lambda: s.step(5))
        default = LlamaDecoder(model, activations=DEFAULT_ACTIVATIONS).session(4096, adapter)
        default.forward(prompt)
        step_default = best(lambda: default.step(5))
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
    return {"step_us": step, "step_default_us": step_default,
            **{f"{k}_us": v for k, v in parts.items()},
            "glue_us": step - kernels, "hf_step_us": hf,
            "clock": "thread CPU time" if threads == 1 else "wall"}


# --------------------------------------------------------------------------- main
# name -> what it is; "lorart" is the user's plain model.generate call
ENGINES = {"lorart": "lorart model.generate (default: int16 activations)",
           "lorart float32-act": "lorart, float32 activations (transformers' tokens)",
           "lorart int8-act": "lorart, int8 activations (llama.cpp's rounding)",
           "lorart (HF loop)": "lorart kernels in transformers' generate loop",
           "llama.cpp": "llama-cpp-python, same GGUF (+ the adapter exported to GGUF LoRA)"}
TARGETS = {"base": 1.0, "adapter": 1.2}  # issue #15: lorart / llama.cpp decode tok/s


def main(argv=None) -> int:
    args = parse_args(argv)
    if len(args.threads) == 1:
        return run_one(args, args.threads[0])
    summaries = []
    with tempfile.TemporaryDirectory() as tmp:
        rest = [a for a in (argv if argv is not None else sys.argv[1:])]
        if "--threads" in rest:  # drop "--threads N M ..." from the child's arguments
            i = rest.index("--threads")
            j = i + 1
            while j < len(rest) and rest[j].isdigit():
                j += 1
            rest = rest[:i] + rest[j:]
        for t in args.threads:
            out = Path(tmp) / f"summary-{t}.json"
            subprocess.run([sys.executable, __file__, *rest, "--threads", str(t),
                            "--summary-out", str(out)], check=True)
            summaries += json.loads(out.read_text())
    print_summary(summaries, args.tokens)
    return 0


def run_one(args, threads: int) -> int:
    """One thread count, in this process: time every engine, print and return 0."""
    os.environ["OMP_NUM_THREADS"] = str(threads)  # lorart's OpenMP kernels
    import torch

    torch.set_num_threads(threads)
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
            common = dict(model_path=str(gguf_path), n_ctx=512, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
            engines["llama.cpp"] = llama_cpp.Llama(**common)
            engines["llama.cpp+lora"] = llama_cpp.Llama(**common, lora_path=str(lora_file))
            print(f"llama-cpp-python {llama_cpp.__version__}")
    prompt = ids[0].tolist()
    runs = {}
    n = args.tokens
    for adapter in (None, args.adapter):
        label = "adapter" if adapter else "base"
        todo = {"lorart": lambda a=adapter: lorart_run(model, ids, n, a, True),
                "lorart float32-act": lambda a=adapter: lorart_run(model, ids, n, a, True,
                                                                   "float32"),
                "lorart int8-act": lambda a=adapter: lorart_run(model, ids, n, a, True,
                                                                "int8")}
        if args.hf:
            todo["lorart (HF loop)"] = lambda a=adapter: lorart_run(model, ids, n, a, False,
                                                                    "float32")
        llm = engines.get("llama.cpp+lora" if adapter else "llama.cpp")
        if llm is not None:
            todo["llama.cpp"] = lambda llm=llm: llamacpp_run(llm, prompt, n)
        for name in todo:  # warm-up (builds the decoder, faults the weights in): 8 tokens
            warm = {"llama.cpp": lambda llm=llm: llamacpp_run(llm, prompt, 8)}.get(
                name, lambda a=adapter, name=name: lorart_run(
                    model, ids, 8, a, name != "lorart (HF loop)",
                    {"lorart": None, "lorart int8-act": "int8"}.get(name, "float32")))
            warm()
        results = {name: [] for name in todo}
        for _ in range(args.rounds):
            for name, f in todo.items():
                results[name].append(f())
        runs[label] = results
    os.environ.pop("LORART_FAST_DECODE", None)
    os.environ.pop("LORART_DECODE_ACTIVATIONS", None)

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "threads": threads,
            "tokens": n, "prompt_tokens": len(prompt), "adapter": args.adapter,
            "torch": torch.__version__, "cpu_isa": cpu_isa(),
            "load_avg": os.getloadavg()[0]}
    print(f"\n{meta}")
    records, summary = [], []
    for label, results in runs.items():
        print(f"\n== {label}, {threads} thread(s): decode tok/s (median of {args.rounds}), "
              f"end-to-end tok/s")
        adapter = args.adapter if label == "adapter" else None
        exact = results["lorart float32-act"][-1][2]  # = transformers' greedy tokens
        theirs = results["llama.cpp"][-1][2] if "llama.cpp" in results else None
        # lorart's own answer without EOS suppression: where it would stop by itself
        natural = model.generate(ids, max_new_tokens=n, do_sample=False,
                                 adapter_names=[adapter or "__base__"])
        ref_answer = until_eos(natural[0, ids.shape[1]:].tolist(), tok.eos_token_id)
        med = {name: statistics.median(r[0] for r in rs) for name, rs in results.items()}
        for name, rs in results.items():
            e2e = statistics.median(r[1] for r in rs)
            tokens = rs[-1][2]
            vs_exact, prefix = same_tokens(tokens, exact)
            vs_llama = None if theirs is None else same_tokens(tokens, theirs)[0]
            # lorart suppresses EOS for the timed run (min_new_tokens); llama.cpp does not.
            # The answers compare up to each one's first EOS (the text a user sees).
            if name == "llama.cpp":
                answer = until_eos(tokens, tok.eos_token_id)
            else:  # EOS suppressed: compare the tokens before lorart's natural EOS
                core = ref_answer[:-1] if ref_answer[-1:] == [tok.eos_token_id] else ref_answer
                answer = ref_answer if tokens[:len(core)] == core else tokens
            gap = None
            if name == "llama.cpp" and prefix < min(len(tokens), len(exact)):
                gap = logit_gap(model, ids, exact, prefix, tokens[prefix], adapter)
            rec = {"bench": "vs_llamacpp", "case": label, "engine": name,
                   "decode_tok_s": med[name], "e2e_tok_s": e2e,
                   "decode_tok_s_all": [r[0] for r in rs],
                   "same_tokens_as_transformers": vs_exact, "same_prefix": prefix,
                   "same_tokens_as_llamacpp": vs_llama,
                   "answer_tokens": len(answer), "answer_same_as_lorart": answer == ref_answer,
                   "logit_gap_at_divergence": gap, **meta}
            records.append(rec)
            why = "" if gap is None else f", float32 logit gap there {gap:.3f}"
            print(f"  {name:18s} {med[name]:7.1f}  {e2e:7.1f}   same tokens as transformers: "
                  f"{vs_exact}/{n} (prefix {prefix}{why})"
                  + ("" if vs_llama is None else f", as llama.cpp: {vs_llama}/{n}")
                  + f"; answer up to EOS: {len(answer)} tokens, "
                  + ("same as lorart's" if answer == ref_answer else "differs from lorart's"))
        for name, rs in results.items():
            print(f"  --- {name}: {tok.decode(rs[-1][2])!r}")
        summary.append({"case": label, "threads": threads, "load_avg": meta["load_avg"],
                        "date": meta["date"], "tok_s": med,
                        "same_as_llamacpp": {r["engine"]: r["same_tokens_as_llamacpp"]
                                             for r in records if r["case"] == label},
                        "same_as_transformers": {r["engine"]: r["same_tokens_as_transformers"]
                                                 for r in records if r["case"] == label},
                        "llamacpp_answer_same": any(r["answer_same_as_lorart"] for r in records
                                                    if r["case"] == label
                                                    and r["engine"] == "llama.cpp")})
    if args.accuracy:
        llm = None
        if "llama.cpp" in engines:  # a third instance that keeps every position's logits
            llm = llama_cpp.Llama(**common, logits_all=True)
        acc = accuracy(model, ids, args.accuracy, llm)
        print(f"\n== logits vs lorart float32 over {args.accuracy} teacher-forced steps "
              "(relative RMS, argmax agreements):")
        for name, (rel, agree) in acc.items():
            print(f"  {name:18s} {rel:.2e}   {agree}/{args.accuracy}")
            records.append({"bench": "vs_llamacpp_accuracy", "engine": name, "rel_rms": rel,
                            "argmax_same": agree, "steps": args.accuracy, **meta})
    if args.profile:
        for adapter in (None, args.adapter):
            prof = profile_step(model, adapter, threads)
            print(f"\n== one decode step at position 100, adapter={adapter}: "
                  + ", ".join(f"{k} {v:.0f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in prof.items()))
            records.append({"bench": "vs_llamacpp_profile", "adapter": adapter, **prof, **meta})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    if args.summary_out:
        args.summary_out.write_text(json.dumps(summary))
    else:
        print_summary(summary, n)
    return 0


def print_summary(summary: list[dict], n: int) -> None:
    """The issue's targets, one line per (threads, case), then the adapter's cost."""
    print("\n================ SUMMARY: batch-1 greedy decode, lorart / llama.cpp "
          "(ratios from one side-by-side run; machine state: load average) ================")
    print(f"{'threads':>7} {'case':8} {'lorart':>8} {'llama.cpp':>9} {'ratio':>6} {'target':>7}"
          f" {'met':>4}  same tokens lorart~llama.cpp  | float32-act ratio, int8-act ratio")
    for rec in summary:
        t = rec["tok_s"]
        lc = t.get("llama.cpp")
        ratio = None if lc is None else t["lorart"] / lc
        target = TARGETS[rec["case"]]
        met = "-" if ratio is None else ("yes" if ratio >= target else "no")
        same = rec["same_as_llamacpp"].get("lorart")
        others = ", ".join(f"{t[e] / lc:.2f}x" for e in ("lorart float32-act", "lorart int8-act")
                           if lc and e in t)
        print(f"{rec['threads']:>7} {rec['case']:8} {t['lorart']:8.1f} "
              f"{lc if lc is not None else float('nan'):9.1f} "
              f"{ratio if ratio is not None else float('nan'):5.2f}x {target:6.1f}x {met:>4}  "
              f"{same if same is not None else '-'}/{n} (target >= {round(60 * n / 64)}), "
              f"answer up to EOS "
              f"{'same' if rec['llamacpp_answer_same'] else 'differs'} | {others}"
              f"   (load {rec['load_avg']:.1f})")
    for threads in sorted({r["threads"] for r in summary}):
        by = {r["case"]: r["tok_s"] for r in summary if r["threads"] == threads}
        if "base" in by and "adapter" in by:
            cost = {e: 1 - by["adapter"][e] / by["base"][e] for e in by["base"]
                    if e in by["adapter"]}
            print(f"adapter cost at {threads} thread(s) (tok/s lost, target for lorart < 10%): "
                  + ", ".join(f"{e} {100 * c:.0f}%" for e, c in cost.items()))


if __name__ == "__main__":
    sys.exit(main())
