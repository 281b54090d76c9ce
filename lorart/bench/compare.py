"""Regressions between two runs: slower by more than the noise allows.

A (case, impl) pair present and timed in both runs regresses when

    new_median > old_median · (1 + threshold),   threshold = max(10%, 3 · relative spread)

where the relative spread is the larger of the two runs' IQR / median. A noisy pair
thus needs a bigger slowdown to be flagged, and a quiet one is held to 10%.
"""

from __future__ import annotations

MIN_THRESHOLD = 0.10
SPREAD_FACTOR = 3.0


def _timed(records: list[dict]) -> dict[tuple[str, str], dict]:
    return {(r["case"], r["impl"]): r["time_s"] for r in records
            if r.get("status") in ("ok", "mismatch") and r.get("time_s")}


def _rel_spread(t: dict) -> float:
    return (t["q3"] - t["q1"]) / t["median"] if t["median"] > 0 else 0.0


def threshold(old: dict, new: dict) -> float:
    """The slowdown (fraction) beyond which the pair counts as a regression."""
    return max(MIN_THRESHOLD, SPREAD_FACTOR * max(_rel_spread(old), _rel_spread(new)))


def find_regressions(old_records: list[dict], new_records: list[dict]) -> list[dict]:
    """``[{case, impl, old_s, new_s, slowdown, threshold}, ...]``, worst first."""
    old, new = _timed(old_records), _timed(new_records)
    out = []
    for key in sorted(old.keys() & new.keys()):
        o, n = old[key], new[key]
        limit = threshold(o, n)
        slowdown = n["median"] / o["median"] - 1
        if slowdown > limit:
            out.append({"case": key[0], "impl": key[1], "old_s": o["median"],
                        "new_s": n["median"], "slowdown": slowdown, "threshold": limit})
    return sorted(out, key=lambda r: -r["slowdown"])


def matched(old_records: list[dict], new_records: list[dict]) -> int:
    """How many (case, impl) pairs were timed in both runs."""
    return len(_timed(old_records).keys() & _timed(new_records).keys())
