"""Turn records into a terminal table, JSON lines, a Markdown report and PNG plots.

Every output is made from the records alone, so ``lorart bench --report-only RUN.jsonl``
redraws them from an old run without timing anything.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

OK = ("ok", "mismatch")


# --------------------------------------------------------------------------- JSON lines
def write_jsonl(records: list[dict], path: Path) -> None:
    with open(path, "w") as f:
        for rec in records:
            f.write(json.dumps(rec, sort_keys=True) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Records of a JSON-lines file; ``ValueError`` naming the line if one is not JSON."""
    out = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{i}: not a JSON line: {exc}") from exc
            if not isinstance(rec, dict) or "case" not in rec or "impl" not in rec:
                raise ValueError(f"{path}:{i}: not a lorart bench record (no case/impl)")
            out.append(rec)
    return out


# --------------------------------------------------------------------------- formatting
def fmt_time(sec: float | None) -> str:
    if sec is None:
        return "-"
    if sec < 1e-3:
        return f"{sec * 1e6:.1f} µs"
    if sec < 1:
        return f"{sec * 1e3:.2f} ms"
    return f"{sec:.2f} s"


def _num(v: float | None, digits: int = 1) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _spread(rec: dict) -> str:
    t = rec.get("time_s")
    if not t or not t["median"]:
        return "-"
    return f"±{50 * (t['q3'] - t['q1']) / t['median']:.0f}%"


def _speedups(rec: dict) -> str:
    sp = rec.get("speedup") or {}
    return ", ".join(f"{v:.3g}× {k}" for k, v in sorted(sp.items())) or "-"


COLUMNS = ("impl", "median", "±IQR/2", "GB/s", "%BW", "GFLOP/s", "%peak", "%roof", "speedup")


def row_cells(rec: dict) -> list[str]:
    """Cells of one record for :data:`COLUMNS`; skipped rows say why in the last cell."""
    impl = rec["impl"] + (" (!)" if rec["status"] == "mismatch" else "")
    if rec["status"] not in OK:
        return [impl, rec["status"], "", "", "", "", "", "", rec.get("reason") or ""]
    if rec["kind"] == "e2e":
        tok = f"{rec['tokens_per_s']:.1f} tok/s"
        if rec.get("speedup"):
            tok += "; " + _speedups(rec)
        return [impl, fmt_time(rec["time_s"]["median"]), _spread(rec), "", "", "", "", "", tok]
    return [impl, fmt_time(rec["time_s"]["median"]), _spread(rec), _num(rec["gbps"]),
            _num(rec["pct_bandwidth"], 0), _num(rec["gflops"]), _num(rec["pct_peak"], 0),
            _num(rec["pct_roofline"], 0), _speedups(rec)]


def by_case(records: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = defaultdict(list)
    for rec in records:
        if rec.get("kind") != "ceiling":
            groups[rec["case"]].append(rec)
    return groups


def terminal_table(records: list[dict], ceilings: dict | None, show_skipped: bool = False,
                   width: int = 120) -> str:
    """A plain-text table, one block per case; skipped rows only with ``show_skipped``."""
    lines = []
    if ceilings:
        lines.append(ceilings_line(ceilings))
    for case, recs in by_case(records).items():
        shown = [r for r in recs if show_skipped or r["status"] != "skipped"]
        lines.append("")
        lines.append(case)
        if not shown:
            lines.append("  (every implementation skipped; --show-skipped says why)")
            continue
        rows = [list(COLUMNS)] + [row_cells(r) for r in shown]
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS) - 1)]
        for r in rows:
            head = "  ".join(c.rjust(w) if i else c.ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))
            lines.append(("  " + head + "  " + r[-1])[:width])
    skipped = sum(r["status"] == "skipped" for r in records)
    if skipped and not show_skipped:
        lines.append(f"\n{skipped} skipped runs hidden (see the Markdown report or "
                     f"--show-skipped)")
    return "\n".join(lines)


def ceilings_line(c: dict) -> str:
    rates = ", ".join(f"{k} {v:.0f}" for k, v in c["matmul_gflops"].items())
    return (f"ceilings: read {c['read_gbps']:.1f} GB/s, copy {c['copy_gbps']:.1f} GB/s, "
            f"matmul GFLOP/s: {rates}")


# --------------------------------------------------------------------------- Markdown
def markdown(records: list[dict], ceilings: dict, ctx: dict, plots: list[str],
             regressions: list[dict] | None = None) -> str:
    """The report: context, ceilings, one table per case, skipped runs, plots, regressions."""
    md = ["# lorart bench", ""]
    md += ["| context | value |", "| --- | --- |"]
    for key in ("date", "device", "cpu", "gpu", "cores", "torch_threads", "torch", "triton",
                "peft", "lorart", "git_commit", "python", "platform"):
        md.append(f"| {key} | {ctx.get(key)} |")
    backends = ctx.get("lorart_backends") or {}
    md.append("| lorart backends | " + "; ".join(
        f"{n}: {'yes' if b['available'] else 'no'} ({b['why']})" for n, b in backends.items())
        + " |")
    md += ["", "## Measured ceilings", "", "| ceiling | value |", "| --- | --- |",
           f"| memory read (sum of {ceilings['bandwidth_bytes'] >> 20} MiB) | "
           f"{ceilings['read_gbps']:.1f} GB/s |",
           f"| memory copy (read + write) | {ceilings['copy_gbps']:.1f} GB/s |"]
    for dtype, rate in ceilings["matmul_gflops"].items():
        side = ceilings["matmul_side"]
        md.append(f"| matmul {dtype} ({side}×{side}) | {rate:.0f} GFLOP/s |")
    cold = any(r.get("cold_cache") for r in records)
    md += ["", "Layer timings: " + ("each sample is one call after the last-level cache was "
                                    "evicted (as in a model, where every layer's weight "
                                    "comes from memory)." if cold else
                                    "warm cache (`--warm-cache`): a lone layer's weight may "
                                    "sit in cache, inflating decode GB/s.")]
    md += ["", "Ceilings: best of several tries each. `±IQR/2` = half the interquartile range of "
           "the samples, relative to the median. `%BW` = achieved GB/s over the read bandwidth, "
           "`%peak` = achieved FLOP/s over the matmul rate of the case's dtype, `%roof` = "
           "the roofline time max(bytes/BW, FLOPs/peak) over the measured time. Bytes and "
           "FLOPs are the ideal counts of `lorart.bench.roofline` (packed weight, used "
           "adapters, x and y). Speedup = baseline median / lorart median (> 1: lorart is "
           "faster). `(!)` marks output that differs from the first baseline's by more than "
           "5% of its largest value. A share above 100% means the measured ceiling was low "
           "(a busy machine during the ceiling runs), not a faster-than-memory kernel.", ""]
    if regressions is not None:
        md += ["## Regressions against the previous run", ""]
        if regressions:
            md += ["| case | impl | old | new | slower by | threshold |",
                   "| --- | --- | --- | --- | --- | --- |"]
            md += [f"| {r['case']} | {r['impl']} | {fmt_time(r['old_s'])} | "
                   f"{fmt_time(r['new_s'])} | {100 * r['slowdown']:.0f}% | "
                   f"{100 * r['threshold']:.0f}% |" for r in regressions]
        else:
            md.append("None beyond noise.")
        md.append("")
    md += ["## Results", ""]
    skipped = []
    for case, recs in by_case(records).items():
        md += [f"### `{case}`", ""]
        first = recs[0]
        if first.get("bytes"):
            md.append(f"Ideal work per call: {first['bytes'] / 1e6:.2f} MB, "
                      f"{first['flops'] / 1e9:.3f} GFLOP.")
            md.append("")
        md += ["| " + " | ".join(COLUMNS) + " |", "|" + " --- |" * len(COLUMNS)]
        for rec in recs:
            if rec["status"] == "skipped":
                skipped.append(rec)
                continue
            md.append("| " + " | ".join(c.replace("|", "/") for c in row_cells(rec)) + " |")
        md.append("")
    if skipped:
        md += ["## Skipped", "", "| case | impl | why |", "| --- | --- | --- |"]
        md += [f"| {r['case']} | {r['impl']} | {r['reason']} |" for r in skipped]
        md.append("")
    if plots:
        md += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(md)


# --------------------------------------------------------------------------- plots
def _rows_series(records: list[dict]):
    """``{panel: {series: [(rows, record)]}}`` for single-adapter forward layer cases."""
    panels: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for rec in records:
        p = rec.get("params") or {}
        if rec["kind"] != "layer" or rec["status"] not in OK or p.get("adapters") != 1:
            continue
        panel = (f"{p['shape']['name']} [N={p['shape']['n']}, K={p['shape']['k']}]\n"
                 f"{p['base']} {p['dtype']}, r={p['rank']}, {p['direction']}")
        panels[panel][rec["impl"]].append((p["rows"], rec))
    # A panel needs at least two row counts to draw a line against rows.
    return {k: v for k, v in panels.items()
            if len({m for s in v.values() for m, _ in s}) >= 2}


def _style_axes(ax, ylabel: str) -> None:
    """Row counts as plain numbers on a log2 axis, plain numbers on the log y axis."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("rows M (tokens in the batch)")
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)


def _grid(n: int):
    import matplotlib.pyplot as plt

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, axes.flat


def plot_speedup(records: list[dict], path: Path) -> bool:
    """Speedup of each lorart backend over each baseline against rows, one panel per shape."""
    import matplotlib.pyplot as plt

    panels = {}
    for panel, series in _rows_series(records).items():
        lines = defaultdict(list)
        for impl, points in series.items():
            for rows, rec in points:
                for base, sp in (rec.get("speedup") or {}).items():
                    lines[f"{impl} vs {base}"].append((rows, sp))
        if lines:
            panels[panel] = lines
    if not panels:
        return False
    # Colour = baseline, line style = lorart backend, the same in every panel.
    baselines = sorted({label.split(" vs ")[1] for lines in panels.values() for label in lines})
    backends = sorted({label.split(" vs ")[0] for lines in panels.values() for label in lines})
    colors = {b: f"C{i}" for i, b in enumerate(baselines)}
    styles = {b: ("-", "--", ":", "-.")[i % 4] for i, b in enumerate(backends)}
    fig, axes = _grid(len(panels))
    for ax, (panel, lines) in zip(axes, sorted(panels.items())):
        for label, pts in sorted(lines.items()):
            backend, baseline = label.split(" vs ")
            pts.sort()
            ax.plot([m for m, _ in pts], [s for _, s in pts], marker="o", label=label,
                    color=colors[baseline], ls=styles[backend])
        ax.axhline(1.0, color="grey", lw=1)
        _style_axes(ax, "speedup (baseline time / lorart time)")
        ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("lorart speedup over each baseline vs rows (> 1 = lorart faster)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_roofline_pct(records: list[dict], path: Path) -> bool:
    """% of the roofline (ideal time / measured time) against rows, one line per impl."""
    import matplotlib.pyplot as plt

    panels = _rows_series(records)
    if not panels:
        return False
    # One colour per implementation across every panel.
    impls = sorted({impl for series in panels.values() for impl in series})
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}
    fig, axes = _grid(len(panels))
    for ax, (panel, series) in zip(axes, sorted(panels.items())):
        for impl, pts in sorted(series.items()):
            pts.sort(key=lambda p: p[0])
            ax.plot([m for m, _ in pts], [r["pct_roofline"] for _, r in pts], marker="o",
                    label=impl, color=colors[impl],
                    ls="-" if impl.startswith("lorart") else "--")
        ax.axhline(100, color="grey", lw=1)
        _style_axes(ax, "% of roofline (ideal time / measured time)")
        ax.set_title(panel, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("Share of the measured roofline, max(bytes / read BW, FLOPs / matmul peak)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_roofline(records: list[dict], ceilings: dict, path: Path) -> bool:
    """The classic roofline: achieved GFLOP/s against arithmetic intensity (FLOP/byte)."""
    import matplotlib.pyplot as plt

    pts = defaultdict(list)
    for rec in records:
        if rec["kind"] == "layer" and rec["status"] in OK and rec.get("bytes"):
            pts[rec["impl"]].append((rec["flops"] / rec["bytes"], rec["gflops"]))
    if not pts:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 5))
    xs = [x for v in pts.values() for x, _ in v]
    lo, hi = min(xs) / 2, max(xs) * 2
    grid = [lo * (hi / lo) ** (i / 100) for i in range(101)]
    bw = ceilings["read_gbps"]
    for i, (dtype, peak) in enumerate(ceilings["matmul_gflops"].items()):
        ax.plot(grid, [min(peak, bw * x) for x in grid], lw=1.5, color="black",
                ls=("-", "--", ":")[i % 3],
                label=f"roof: {bw:.0f} GB/s, {dtype} {peak:.0f} GFLOP/s")
    markers = "os^vD<>ph*"
    for i, (impl, v) in enumerate(sorted(pts.items())):
        ax.scatter([x for x, _ in v], [y for _, y in v], s=22, marker=markers[i % len(markers)],
                   label=impl, alpha=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte, ideal counts)")
    ax.set_ylabel("achieved GFLOP/s")
    ax.set_title("Roofline of every timed layer case (measured ceilings)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_plots(records: list[dict], ceilings: dict, out: Path) -> list[str]:
    """Render every plot that has data into ``out``; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    written = []
    if plot_speedup(records, out / "speedup_vs_rows.png"):
        written.append("speedup_vs_rows.png")
    if plot_roofline_pct(records, out / "roofline_pct_vs_rows.png"):
        written.append("roofline_pct_vs_rows.png")
    if plot_roofline(records, ceilings, out / "roofline.png"):
        written.append("roofline.png")
    return written
