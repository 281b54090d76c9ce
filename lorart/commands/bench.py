"""``lorart bench``: measure the machine's ceilings, time every case against the baselines.

    lorart bench --quick --out bench-out            # ~2-3 min on a busy 2-core CPU
    lorart bench --out bench-full                   # the full table (long on a CPU)
    lorart bench --tiny                             # seconds: CI and tests
    lorart bench --quick --compare old/results.jsonl  # exit 1 on regressions beyond noise
    lorart bench --report-only bench-out/results.jsonl --out redraw  # no timing

Writes ``results.jsonl`` (one record per case × implementation, with context),
``report.md`` and PNG plots into ``--out``, and prints a table. The engine lives in
``lorart.bench``; this module is only its command line.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

from ..cli import UserError

NAME = "bench"
HELP = "benchmark lorart's kernels against PEFT-style torch, PEFT and torch int4"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``lorart bench`` (shared by the ``lorart`` CLI and ``main``)."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="a small subset (4096x4096 layer at 1 and 32 rows, 8 adapters, "
                           "a training step, SmolLM2 generation): 2-3 min on a busy 2-core CPU, "
                           "about 70 s with --no-e2e")
    mode.add_argument("--tiny", dest="mode", action="store_const", const="tiny",
                      help="tiny shapes only: seconds, for CI and tests")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="every standard shape, rows 1-4096, ranks 8-128, 1-256 adapters "
                           "(the default)")
    parser.set_defaults(mode="full")
    parser.add_argument("--cases", metavar="REGEX",
                        help="only cases whose id matches (e.g. 'M1/' or 'llama3.*train')")
    parser.add_argument("--impls", metavar="REGEX",
                        help="only implementations whose name matches (e.g. 'lorart|peft')")
    parser.add_argument("--no-e2e", action="store_true",
                        help="leave out the end-to-end SmolLM2 cases (model loads take a while)")
    parser.add_argument("--list", action="store_true", help="print the selected case ids, exit")
    parser.add_argument("--out", metavar="DIR", default="lorart-bench",
                        help="directory for results.jsonl, report.md and plots "
                             "(default: ./lorart-bench)")
    parser.add_argument("--compare", metavar="OLD_JSONL",
                        help="flag runs slower than in OLD_JSONL by more than max(10%%, 3x the "
                             "relative IQR); exit status 1 if any")
    parser.add_argument("--report-only", metavar="JSONL",
                        help="redraw the table, report and plots from a results file; no timing")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"],
                        help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="timing budget per case and implementation (default: tiny 0.1, "
                             "quick 0.4, full 1.0)")
    parser.add_argument("--max-call-s", type=float, default=None, metavar="SECONDS",
                        help="skip an implementation whose single call takes longer "
                             "(default: 5 quick/tiny, 20 full)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the run (default: torch's choice; "
                             "the C++ backend follows OMP_NUM_THREADS)")
    parser.add_argument("--warm-cache", action="store_true",
                        help="do not evict the last-level cache before each layer sample "
                             "(a lone layer's weight can then sit in L3/L2, unlike in a model)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--show-skipped", action="store_true",
                        help="list skipped runs in the terminal table too")


BUDGETS = {"tiny": 0.1, "quick": 0.4, "full": 1.0}
MAX_CALL_S = {"tiny": 5.0, "quick": 5.0, "full": 20.0}


def check_arguments(args: argparse.Namespace) -> None:
    """Flag values and the machine, checked before anything is built or timed."""
    import torch

    from ._checks import check_environment

    for flag, value in (("--budget", args.budget), ("--max-call-s", args.max_call_s)):
        if value is not None and not value > 0:
            raise UserError(f"{flag} must be positive, got {value}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be >= 1, got {args.threads}")
    if args.device not in (None, "cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: torch sees no CUDA GPU here "
                        f"(torch {torch.__version__}); use --device cpu")
    if args.impls:
        try:
            re.compile(args.impls)
        except re.error as exc:
            raise UserError(f"--impls {args.impls!r} is not a valid regular expression: "
                            f"{exc}") from None
    check_environment(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def plots_available() -> bool:
    """Whether matplotlib is installed (the PNG plots need it; the rest does not)."""
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def run(args: argparse.Namespace) -> int:
    """Run ``lorart bench`` with parsed ``args``; returns the exit status."""
    check_arguments(args)
    import torch

    from lorart.bench import cases as case_table
    from lorart.bench import compare, report, suite

    out = Path(args.out)
    try:
        old = report.read_jsonl(args.compare) if args.compare else None
        if args.report_only:
            records = report.read_jsonl(args.report_only)
            if not records:
                raise ValueError(f"{args.report_only} holds no records")
            ceilings, ctx = records[0]["ceilings"], records[0]["context"]
        else:
            cases = case_table.select(args.mode, args.cases)
            if args.no_e2e:
                cases = [c for c in cases if c.kind != "e2e"]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(str(exc)) from None
    no_plots = args.no_plots
    if not no_plots and not plots_available():
        print("lorart bench: matplotlib is not installed: no PNG plots (pip install matplotlib, "
              "or the bench extra)", file=sys.stderr)
        no_plots = True
    if not args.report_only:
        if args.list:
            print("\n".join(c.id for c in cases))
            return 0
        if not cases:
            raise UserError(f"no {args.mode} case matches --cases {args.cases!r} (see --list)")
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if args.threads:
            torch.set_num_threads(args.threads)
        cfg = suite.RunConfig(
            mode=args.mode, device=device,
            budget_s=args.budget if args.budget is not None else BUDGETS[args.mode],
            max_call_s=args.max_call_s if args.max_call_s is not None else MAX_CALL_S[args.mode],
            impl_pattern=args.impls, seed=args.seed, progress=not args.no_progress,
            cold_cache=not args.warm_cache)
        start = time.perf_counter()
        records, ceilings, ctx = suite.run(cases, cfg)
        elapsed = time.perf_counter() - start
    out.mkdir(parents=True, exist_ok=True)
    regressions = None
    if old is not None:
        regressions = compare.find_regressions(old, records)
    plots = [] if no_plots else report.write_plots(records, ceilings, out)
    if not args.report_only:
        report.write_jsonl(records, out / "results.jsonl")
    (out / "report.md").write_text(report.markdown(records, ceilings, ctx, plots, regressions))
    print(report.terminal_table(records, ceilings, args.show_skipped))
    print()
    if not args.report_only:
        print(f"{len(records)} runs in {elapsed:.0f} s; wrote {out / 'results.jsonl'}, "
              f"{out / 'report.md'}" + "".join(f", {out / p}" for p in plots))
    else:
        print(f"wrote {out / 'report.md'}" + "".join(f", {out / p}" for p in plots))
    if regressions is not None:
        n = compare.matched(old, records)
        if regressions:
            print(f"\n{len(regressions)} regression(s) beyond noise against {args.compare} "
                  f"({n} runs compared):")
            for r in regressions:
                print(f"  {r['case']}  {r['impl']}: {report.fmt_time(r['old_s'])} -> "
                      f"{report.fmt_time(r['new_s'])} (+{100 * r['slowdown']:.0f}%, "
                      f"threshold {100 * r['threshold']:.0f}%)")
            return 1
        print(f"\nno regressions beyond noise against {args.compare} ({n} runs compared)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m lorart.bench [options]``."""
    from ..cli import standalone

    return standalone(sys.modules[__name__], argv)


if __name__ == "__main__":
    sys.exit(main())
