"""What the benchmark sections share: timing, speed-ups against fedagg, the table."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any, Callable, Dict, List


def median_time(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall time of `repeat` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def optional_torch():
    """torch if it is installed (imported now if needed), else None: the comparisons are optional."""
    torch = sys.modules.get("torch")
    if torch is None:
        try:
            import torch
        except ImportError:
            return None
    return torch


def add_speedups(rows: List[Dict[str, Any]]) -> None:
    """r["speedup"] = r's time / the first fedagg row's time of the same case."""
    for case in {r["case"] for r in rows}:
        ours = [r for r in rows if r["case"] == case and r["impl"].startswith("fedagg")]
        if not ours:
            continue
        for r in rows:
            if r["case"] == case:
                r["speedup"] = r["seconds"] / ours[0]["seconds"]


def table(title: str, rows: List[Dict[str, Any]]) -> List[str]:
    out = [title, f"{'case':36s} {'impl':22s} {'time':>10s} {'GB/s':>7s} {'fedagg speed-up':>16s}  agrees  note"]
    for r in rows:
        sp = "" if r["impl"].startswith("fedagg") or "speedup" not in r else f"{r['speedup']:.1f}x"
        ag = {True: "yes", False: "no", None: "-"}[r["agrees"]]
        gb = "-" if r["gbps"] is None else f"{r['gbps']:.2f}"
        out.append(f"{r['case']:36s} {r['impl']:22s} {r['seconds'] * 1e3:8.2f}ms {gb:>7s} {sp:>16s}  "
                   f"{ag:6s}  {r['note']}")
    return out
