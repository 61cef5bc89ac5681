"""Benchmark engine: fedagg's rules against the code a user would otherwise run.

For every rule it times, on the same float32 ``(n, d)`` updates in the same
process: fedagg, the NumPy and torch idioms, Flower's server-side aggregation
functions and ByzFL's aggregators (each where installed), checks each output
against fedagg's, and relates every time to one plain read pass over the input
(the faster of ``np.sum(X)`` and ``torch.sum(T)``) and to the machine's copy
bandwidth. Needs only NumPy; torch, flwr and byzfl are optional and imported
lazily. ``fedagg bench`` (:mod:`fedagg.cli`) prints the results.

>>> from fedagg import benchmark
>>> res = benchmark.run(n=7, d=1000, f=1, rules=["median"], repeat=1,
...                     compare=False, bandwidth_gb=0)
>>> [(r["rule"], r["impl"], r["f"]) for r in res["results"]]
[('median', 'fedagg', 1)]
>>> benchmark.default_f("bulyan", 16), benchmark.default_f("krum", 16), benchmark.default_f("mean", 16)
(3, 4, 0)
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import platform
import statistics
import sys
import time
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

import fedagg
from fedagg.rules import RULES

__all__ = ["CASES", "Case", "Inputs", "check", "default_f", "estimate_seconds", "f_used", "make_updates",
           "measure_bandwidth", "memory_estimate", "optional", "machine_info", "read_pass", "run", "time_call"]

RTOL, ATOL = 1e-4, 1e-4  # float32 outputs of O(1) data, summed in different orders
LOOSE = 1e-3  # iterative rules stopped differently (fedagg: tol on the objective)
BYZANTINE_SHIFT = 4.0  # the last f updates are N(shift, 1) instead of N(0, 1)
TAU = 100.0  # centered clipping radius (fedagg's and ByzFL's default)
NU = 1e-6  # Weiszfeld smoothing (fedagg's default)
_BLOCK = 1 << 14  # columns per block in the blocked NumPy references
SLOW_SECONDS = 1.0  # alternatives slower than this per call are timed once after the warm-up


# ------------------------------------------------------------------ inputs


def make_updates(n: int, d: int, f: int = 0, seed: int = 0) -> np.ndarray:
    """n x d float32 updates filled row by row (peak memory: the matrix itself).

    Honest rows are N(0, 1); the last ``f`` rows are N(4, 1), a shifted attack.
    """
    rng = np.random.default_rng(seed)
    X = np.empty((n, d), dtype=np.float32)
    for i in range(n):
        rng.standard_normal(d, dtype=np.float32, out=X[i])
        if i >= n - f:
            X[i] += np.float32(BYZANTINE_SHIFT)
    return X


class Inputs:
    """What the cases run on: the updates in every form the implementations take."""

    def __init__(self, X: np.ndarray, f: int, torch: Any = None):
        self.X, self.f = X, f
        self.n, self.d = X.shape
        self.T = torch.from_numpy(X) if torch is not None else None  # shares X's memory
        self.results = [([X[i]], 1) for i in range(self.n)]  # Flower: (layers, num_examples)
        self.ctx: Dict[str, Any] = {}  # per rule: fedagg's AggregationInfo

    def with_f(self, f: int) -> "Inputs":
        """The same updates (shared, not copied) and ctx, with another f."""
        other = copy.copy(self)
        other.f = f
        return other


def f_used(rule: str, f: int) -> int:
    """The f `rule` is called with: `f`, or 0 for a rule that takes none (the mean refuses f > 0)."""
    return f if RULES[rule].uses_f else 0


def default_f(rule: str, n: int, max_f: int = 4) -> int:
    """The largest f <= max_f that `rule` allows with n updates (0 for the mean, which takes none;
    0 where even f = 0 needs more updates: the rule's row then says what it needs)."""
    spec = RULES[rule]
    if not spec.uses_f:
        return 0
    return next((f for f in range(max_f, -1, -1) if n >= spec.min_n(f)), 0)


_OPTIONAL: Dict[str, Tuple[Any, str]] = {}


def optional(name: str) -> Tuple[Any, str]:
    """(module or None, note) for "torch", "flwr" or "byzfl"; never raises, warnings silenced.

    flwr gives ``flwr.server.strategy.aggregate``; byzfl gives
    ``byzfl.aggregators.aggregators``. ByzFL's package __init__ also imports its
    training benchmark (torchvision); where that import fails the aggregators are
    loaded on their own, with a note.
    """
    if name not in _OPTIONAL:
        _OPTIONAL[name] = _load(name)
    return _OPTIONAL[name]


def _load(name: str) -> Tuple[Any, str]:
    if importlib.util.find_spec(name) is None:
        return None, f"{name} is not installed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if name == "torch":
                return importlib.import_module("torch"), ""
            if name == "flwr":
                return importlib.import_module("flwr.server.strategy.aggregate"), ""
            if name == "byzfl":
                try:
                    importlib.import_module("byzfl")
                    note = ""
                except Exception as e:  # e.g. a torchvision built for another torch
                    spec = importlib.util.find_spec("byzfl")
                    stub = types.ModuleType("byzfl")
                    stub.__path__ = list(spec.submodule_search_locations)
                    stub.__spec__ = spec
                    sys.modules["byzfl"] = stub
                    note = (f"'import byzfl' failed ({type(e).__name__}: {e}); "
                            "loaded byzfl.aggregators alone")
                return importlib.import_module("byzfl.aggregators.aggregators"), note
        except Exception as e:
            return None, f"{name} failed to import: {type(e).__name__}: {e}"
    raise ValueError(f"unknown optional module {name!r}")


# ------------------------------------------------------------------ reference implementations


def _sqdist64(X: np.ndarray) -> np.ndarray:
    """Pairwise squared distances from a float64 Gram matrix, built over column blocks."""
    n, d = X.shape
    G = np.zeros((n, n))
    for j in range(0, d, _BLOCK):
        B = X[:, j:j + _BLOCK].astype(np.float64)
        G += B @ B.T
    s = np.diag(G).copy()
    D = np.maximum(s[:, None] + s[None, :] - 2.0 * G, 0.0)
    np.fill_diagonal(D, 0.0)
    return D


def _krum_scores(D: np.ndarray, f: int) -> np.ndarray:
    """Sum of the n - f - 2 smallest distances to the others (at least 0 of them)."""
    n = len(D)
    E = D + np.diag(np.full(n, np.inf))
    return np.sort(E, axis=1)[:, :max(n - f - 2, 0)].sum(1)


def _np_bulyan(X: np.ndarray, f: int) -> np.ndarray:
    """Iterated Krum selection of n - 2f updates, then per coordinate the mean of the
    beta = theta - 2f sorted values closest to their median (ties keep the smaller)."""
    D = _sqdist64(X)
    n, d = X.shape
    theta = n - 2 * f
    beta = theta - 2 * f
    remaining, chosen = list(range(n)), []
    for _ in range(theta):
        best = int(np.argmin(_krum_scores(D[np.ix_(remaining, remaining)], f)))
        chosen.append(remaining.pop(best))
    S = X[chosen]
    rank = np.arange(theta)[:, None]
    out = np.empty(d, dtype=np.float32)
    for j in range(0, d, _BLOCK):
        s = np.sort(S[:, j:j + _BLOCK], axis=0).astype(np.float64)
        med = 0.5 * (s[(theta - 1) // 2] + s[theta // 2])
        lo = np.zeros(s.shape[1], dtype=np.int64)  # excluded values left of the window
        for t in range(1, 2 * f + 1):
            lo += (med - s[t - 1]) > (s[theta - 1 - 2 * f + t] - med)
        out[j:j + _BLOCK] = np.where((rank >= lo) & (rank < lo + beta), s, 0.0).sum(0) / beta
    return out


def _np_weiszfeld(X: np.ndarray, iterations: int) -> np.ndarray:
    z = X.mean(0)
    for _ in range(iterations):
        b = (1.0 / np.maximum(np.linalg.norm(X - z, axis=1), NU)).astype(np.float32)
        z = (b / b.sum()) @ X
    return z


def _torch_weiszfeld(torch, T, iterations: int):
    z = T.mean(0)
    for _ in range(iterations):
        b = 1.0 / torch.linalg.vector_norm(T - z, dim=1).clamp_min(NU)
        z = (b / b.sum()) @ T
    return z


def _np_centered_clipping(X: np.ndarray) -> np.ndarray:
    v = np.zeros(X.shape[1], dtype=np.float32)
    diff = X - v
    with np.errstate(divide="ignore"):
        c = np.minimum(1.0, TAU / np.linalg.norm(diff, axis=1))
    return v + (c / len(X)).astype(np.float32) @ diff


def _torch_centered_clipping(torch, T):
    v = torch.zeros(T.shape[1], dtype=T.dtype)
    diff = T - v
    c = (TAU / torch.linalg.vector_norm(diff, dim=1)).clamp(max=1.0)
    return v + (c / len(T)) @ diff


def _torch_krum_scores(torch, T, f: int):
    D = torch.cdist(T, T) ** 2
    D.fill_diagonal_(float("inf"))
    k = max(len(T) - f - 2, 0)
    return torch.sort(D, dim=1).values[:, :k].sum(1)


# ------------------------------------------------------------------ the cases


def _as_array(out: Any) -> np.ndarray:
    """An implementation's output as a 1-D NumPy array."""
    if isinstance(out, tuple):  # fedagg with return_info
        out = out[0]
    if isinstance(out, list):  # Flower: one array per layer
        out = out[0]
    if hasattr(out, "detach"):
        out = out.detach().cpu().numpy()
    return np.asarray(out).reshape(-1)


def check(kind: str, out: Any, ref: np.ndarray, u: Inputs, selected=None) -> Tuple[Optional[bool], str]:
    """Does `out` agree with fedagg's `ref`? kind: close | loose | exact | close_odd_n."""
    a = _as_array(out)
    if a.shape != ref.shape:
        return False, f"shape {a.shape} != {ref.shape}"
    if kind == "close_odd_n" and u.n % 2 == 0:
        return None, "torch.median returns the lower middle value for even n (fedagg: mean of the two)"
    if kind == "exact":
        if np.array_equal(a, ref):
            return True, ""
        rows = np.flatnonzero((u.X == a).all(axis=1))
        return False, f"selected update {rows.tolist()[:3]}, fedagg {np.asarray(selected).tolist()[:3]}"
    tol = LOOSE if kind == "loose" else ATOL
    ok = np.isclose(a, ref, rtol=tol, atol=tol)
    if ok.all():
        return True, ""
    bad = int(ok.size - ok.sum())
    return False, f"{bad} of {ok.size} coordinates differ (max |diff| {np.max(np.abs(a - ref)):.3g})"


@dataclass(frozen=True)
class Case:
    rule: str
    impl: str  # "fedagg", "numpy", "torch", "flwr" or "byzfl"
    fn: Callable[[Inputs, Any], Any]  # (inputs, module of `impl` or None) -> output
    check: str = "close"  # how the output is compared with fedagg's
    same_definition: bool = True  # False: a disagreement is a definition difference
    note: str = ""

    @property
    def requires(self) -> Optional[str]:
        return self.impl if self.impl in ("torch", "flwr", "byzfl") else None


def _fedagg(rule):
    return lambda u, _: fedagg.aggregate(u.X, rule, f_used(rule, u.f))


def _flwr_bulyan(u, A):
    results = list(u.results)  # aggregate_bulyan pops from the list it is given
    return A.aggregate_bulyan(results, u.f, A.aggregate_krum, to_keep=0)


CASES: List[Case] = [c for rule in fedagg.RULES for c in [Case(rule, "fedagg", _fedagg(rule))]] + [
    Case("mean", "numpy", lambda u, _: u.X.mean(0)),
    Case("mean", "torch", lambda u, t: u.T.mean(0)),
    Case("mean", "flwr", lambda u, A: A.aggregate(u.results), note="aggregate, num_examples = 1"),
    Case("mean", "byzfl", lambda u, B: B.Average()(u.T), note="Average"),
    Case("median", "numpy", lambda u, _: np.median(u.X, 0)),
    Case("median", "torch", lambda u, t: t.median(u.T, 0).values, check="close_odd_n"),
    Case("median", "flwr", lambda u, A: A.aggregate_median(u.results), note="aggregate_median"),
    Case("median", "byzfl", lambda u, B: B.Median()(u.T), note="Median (torch.quantile)"),
    Case("trimmed_mean", "numpy", lambda u, _: np.sort(u.X, 0)[u.f:u.n - u.f].mean(0)),
    Case("trimmed_mean", "torch", lambda u, t: t.sort(u.T, 0).values[u.f:u.n - u.f].mean(0)),
    Case("trimmed_mean", "flwr",
         lambda u, A: A.aggregate_trimmed_avg(u.results, (u.f + 1e-6) / u.n),
         note="aggregate_trimmed_avg, fraction (f + 1e-6)/n cuts int(fraction * n) = f"),
    Case("trimmed_mean", "byzfl", lambda u, B: B.TrMean(f=u.f)(u.T), note="TrMean"),
    Case("krum", "numpy",
         lambda u, _: u.X[int(np.argmin(_krum_scores(_sqdist64(u.X), u.f)))],
         check="exact", note="float64 Gram distances"),
    Case("krum", "torch", lambda u, t: u.T[int(t.argmin(_torch_krum_scores(t, u.T, u.f)))],
         check="exact", note="torch.cdist"),
    Case("krum", "flwr", lambda u, A: A.aggregate_krum(u.results, u.f, 0), check="exact",
         note="aggregate_krum(to_keep=0)"),
    Case("krum", "byzfl", lambda u, B: B.Krum(f=u.f)(u.T), check="exact", same_definition=False,
         note="Krum: scores over n-f-1 neighbours (fedagg: n-f-2)"),
    Case("multi_krum", "numpy",
         lambda u, _: u.X[np.argsort(_krum_scores(_sqdist64(u.X), u.f), kind="stable")[:u.n - u.f]].mean(0),
         note="float64 Gram distances, m = n - f"),
    Case("multi_krum", "torch",
         lambda u, t: u.T[t.argsort(_torch_krum_scores(t, u.T, u.f), stable=True)[:u.n - u.f]].mean(0),
         note="torch.cdist, m = n - f"),
    Case("multi_krum", "flwr", lambda u, A: A.aggregate_krum(u.results, u.f, u.n - u.f),
         note="aggregate_krum(to_keep = n - f)"),
    Case("multi_krum", "byzfl", lambda u, B: B.MultiKrum(f=u.f)(u.T), same_definition=False,
         note="MultiKrum: scores over n-f-1 neighbours (fedagg: n-f-2)"),
    Case("bulyan", "numpy", lambda u, _: _np_bulyan(u.X, u.f), note="iterated Krum + sorted window"),
    Case("bulyan", "flwr", _flwr_bulyan, same_definition=False,
         note="aggregate_bulyan(aggregate_krum): >= 1 Krum neighbour per step (fedagg: r-f-2 >= 0), "
              "float32 distances to the median"),
    Case("geometric_median", "numpy",
         lambda u, _: _np_weiszfeld(u.X, u.ctx["geometric_median"].iterations),
         note="Weiszfeld from the mean, fedagg's iteration count"),
    Case("geometric_median", "torch",
         lambda u, t: _torch_weiszfeld(t, u.T, u.ctx["geometric_median"].iterations),
         note="Weiszfeld from the mean, fedagg's iteration count"),
    Case("geometric_median", "byzfl",
         lambda u, B: B.GeometricMedian(nu=NU, T=u.ctx["geometric_median"].iterations)(u.T),
         check="loose", note="GeometricMedian(nu=1e-6, T=fedagg's iterations): starts at 0, not at the mean; "
                             "compared at 1e-3"),
    Case("centered_clipping", "numpy", lambda u, _: _np_centered_clipping(u.X), note="1 iteration from 0"),
    Case("centered_clipping", "torch", lambda u, t: _torch_centered_clipping(t, u.T), note="1 iteration from 0"),
    Case("centered_clipping", "byzfl", lambda u, B: B.CenteredClipping(L=1, tau=TAU)(u.T),
         note="CenteredClipping(L=1, tau=100), a new instance per call (it keeps its last result)"),
]


# ------------------------------------------------------------------ timing


def time_call(fn: Callable[[], Any], repeat: int = 3, max_seconds: Optional[float] = None,
              warmup: bool = True):
    """(warm-up output, median seconds, all timings, note): a warm-up call, then `repeat` calls.

    When the warm-up alone takes more than `max_seconds`, it is the only timing; calls
    slower than SLOW_SECONDS are timed once after the warm-up (their spread is small
    next to their length, and it keeps the default run to minutes).
    """
    out = None
    if warmup:
        t0 = time.perf_counter()
        out = fn()
        first = time.perf_counter() - t0
        if max_seconds is not None and first > max_seconds:
            return out, first, [first], f"timed once: {first:.3g} s > {max_seconds:g} s budget"
        if first > SLOW_SECONDS:
            repeat = 1
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return out, statistics.median(times), times, ""


def estimate_seconds(case: Case, mod: Any, probe: Inputs, d: int) -> float:
    """Seconds per call of `case` at `d` columns, scaled from a second call on `probe`."""
    case.fn(probe, mod)
    t0 = time.perf_counter()
    case.fn(probe, mod)
    return (time.perf_counter() - t0) * d / probe.d


def measure_bandwidth(gb: float = 1.0, repeat: int = 3) -> Dict[str, Any]:
    """Copy bandwidth: np.copyto between two `gb`-GB arrays, read + write bytes counted."""
    size = int(gb * 1e9) // 4
    src = np.ones(size, dtype=np.float32)
    dst = np.empty_like(src)
    _, seconds, times, _ = time_call(lambda: np.copyto(dst, src), repeat)
    del src, dst
    return {"bytes": 2 * 4 * size, "seconds": seconds, "times": times, "gbps": 2 * 4 * size / seconds / 1e9}


def read_pass(X: np.ndarray, T: Any = None, repeat: int = 3) -> Dict[str, Any]:
    """One plain read pass over the input: the faster of np.sum(X) and torch.sum(T)."""
    res = {"numpy": time_call(lambda: np.sum(X), repeat)[1]}
    if T is not None:
        torch = sys.modules["torch"]
        res["torch"] = time_call(lambda: torch.sum(T), repeat)[1]
    res["seconds"] = min(res.values())
    res["gbps"] = X.nbytes / res["seconds"] / 1e9
    return res


def memory_estimate(n: int, d: int, compare: bool = True, bandwidth_gb: float = 1.0) -> Dict[str, float]:
    """Bytes needed: the input, and the peak with the alternatives' temporaries
    (torch.sort keeps values and int64 indices: 3x the input on top of it)."""
    data = 4.0 * n * d
    peak = max(2e9 * bandwidth_gb, data * (4 if compare else 1) + 64 * d)
    return {"input_bytes": data, "peak_bytes": peak}


def machine_info() -> Dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    be = fedagg.backends()["cpu"]
    info = {"cpu": cpu, "cores": os.cpu_count(), "isa": be["isa"], "threads": fedagg.get_num_threads(),
            "python": platform.python_version(), "numpy": np.__version__, "fedagg": fedagg.__version__}
    if "torch" in sys.modules:
        info["torch"] = sys.modules["torch"].__version__
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info


# ------------------------------------------------------------------ the run


def run(n: int = 64, d: int = 10_000_000, f: Optional[int] = None, seed: int = 0,
        rules: Optional[List[str]] = None, repeat: int = 3, compare: bool = True,
        max_seconds: Optional[float] = 60.0, bandwidth_gb: float = 1.0, threads: Optional[int] = None,
        progress: Optional[Callable[[int, int, str], None]] = None, probe_d: int = 65_536,
        max_f: int = 4) -> Dict[str, Any]:
    """Benchmark `rules` (default: all of fedagg.RULES); returns a JSON-ready dict.

    `f`: the Byzantine updates every rule tolerates, used as given (a rule that
    cannot run with it says why on its row); None (default): per rule, the
    largest f <= `max_f` it allows with n updates (:func:`default_f`). The mean
    takes no f. The last max(f) updates of the data are shifted (attackers).
    With `max_seconds`, each alternative is first run on the first `probe_d`
    columns; one whose time scaled to d exceeds the budget is skipped.
    `progress(done, total, label)` is called before each step.
    """
    for name, value, low in (("n", n, 1), ("d", d, 1), ("f", 0 if f is None else f, 0), ("repeat", repeat, 1),
                             ("max_f", max_f, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    rules = list(fedagg.RULES) if rules is None else list(rules)
    unknown = [r for r in rules if r not in fedagg.RULES]
    if unknown:
        raise ValueError(f"unknown rule(s) {unknown}; choose from {list(fedagg.RULES)}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be > 0, got {max_seconds}")

    torch, _ = optional("torch")  # for the read pass even without --compare
    if threads is not None:
        fedagg.set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(threads if threads > 0 else os.cpu_count() or 1)
    mods, notes = {}, {}
    cases = [c for c in CASES if c.rule in rules and (compare or c.impl == "fedagg")]
    for name in sorted({c.requires for c in cases} - {None}):
        mods[name], notes[name] = optional(name)
    cases = [c for c in cases if c.requires is None or mods[c.requires] is not None]
    cases.sort(key=lambda c: (rules.index(c.rule), c.impl != "fedagg"))
    f_by_rule = {r: f_used(r, f) if f is not None else default_f(r, n, max_f) for r in rules}
    byzantine = f if f is not None else max(f_by_rule.values(), default=0)

    total, step = len(cases) + 2, 0

    def tick(label):
        nonlocal step
        if progress:
            progress(step, total, label)
        step += 1

    tick("copy bandwidth")
    bw = measure_bandwidth(bandwidth_gb, repeat) if bandwidth_gb > 0 else None
    X = make_updates(n, d, min(byzantine, n), seed)
    inputs = Inputs(X, byzantine, torch)
    tick("read pass")
    rp = read_pass(X, inputs.T, repeat)
    probe_all = None
    if max_seconds and d > probe_d:
        probe_all = Inputs(np.ascontiguousarray(X[:, :probe_d]), byzantine, torch)
        probe_all.ctx = inputs.ctx

    results, refs = [], {}
    for case in cases:
        tick(f"{case.rule} / {case.impl}")
        if case.impl != "fedagg" and case.rule not in refs:
            continue  # fedagg refused these parameters (reported on its row)
        rf = f_by_rule[case.rule]
        u = inputs.with_f(rf)
        probe = probe_all.with_f(rf) if probe_all is not None else None
        rec = {"rule": case.rule, "f": rf if RULES[case.rule].uses_f else None, "impl": case.impl,
               "seconds": None, "times": [], "gbps": None, "x_read": None, "speedup": None, "agrees": None,
               "same_definition": case.same_definition, "skipped": False, "note": case.note}
        results.append(rec)
        mod = mods.get(case.requires)
        fn = lambda: case.fn(u, mod)  # noqa: E731
        try:
            if case.impl == "fedagg":
                out, info = fedagg.aggregate(X, case.rule, rf, return_info=True)  # the warm-up
                refs[case.rule], u.ctx[case.rule] = _as_array(out), info
                _, sec, times, extra = time_call(fn, repeat, warmup=False)
            else:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # third-party deprecations while running
                    estimate = estimate_seconds(case, mod, probe, d) if probe is not None else 0.0
                    if estimate > max_seconds:
                        rec.update(skipped=True, note=_join(case.note, (
                            f"skipped: ~{estimate:.3g} s per call estimated > {max_seconds:g} s budget")))
                        continue
                    out, sec, times, extra = time_call(fn, repeat, max_seconds)
                rec["agrees"], why = check(case.check, out, refs[case.rule], u, u.ctx[case.rule].selected)
                extra = _join(why, extra)
            rec.update(seconds=sec, times=times, gbps=X.nbytes / sec / 1e9, x_read=sec / rp["seconds"],
                       note=_join(rec["note"], extra))
        except Exception as e:
            rec.update(skipped=True, note=_join(rec["note"], f"{type(e).__name__}: {e}"))
        out = None  # free the output before the next case
    fed = {r["rule"]: r["seconds"] for r in results if r["impl"] == "fedagg"}
    for r in results:
        if r["seconds"] and fed.get(r["rule"]):
            r["speedup"] = r["seconds"] / fed[r["rule"]]
    tick("done")
    return {
        "machine": machine_info(),
        "n": n, "d": d, "f": f, "max_f": max_f, "f_by_rule": f_by_rule, "byzantine": byzantine,
        "seed": seed, "repeat": repeat, "max_seconds": max_seconds,
        "input_bytes": X.nbytes, "input_gb": X.nbytes / 1e9,
        "read_pass": rp, "bandwidth": bw,
        "optional": {k: {"available": mods[k] is not None, "note": notes[k]} for k in mods},
        "results": results,
    }


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)


# ------------------------------------------------------------------ half precision

HALF_RULES = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "bulyan")


def run_half(n: int = 64, d: int = 10_000_000, dtype: str = "bfloat16", rules: Optional[List[str]] = None,
             repeat: int = 3, seed: int = 0, max_seconds: Optional[float] = 30.0) -> Dict[str, Any]:
    """fedagg on a float16 or bfloat16 batch read in place, against what users do instead, in one run:
    widen the batch to float32 first (``fedagg.aggregate(T.float())``), torch's own reduction on the
    half tensor (mean, median), and, for scale, fedagg on the same batch stored as float32. Each
    in-place result is checked to be the bits of the widened one. Needs torch."""
    torch, why = optional("torch")
    if torch is None:
        raise RuntimeError(f"the half-precision benchmark needs torch: {why}")
    if dtype not in ("float16", "bfloat16"):
        raise ValueError(f"dtype must be 'float16' or 'bfloat16', got {dtype!r}")
    rules = list(HALF_RULES if rules is None else rules)
    X32 = make_updates(n, d, default_f("bulyan", n), seed)
    T = torch.from_numpy(X32).to(getattr(torch, dtype))
    half_bytes = T.numel() * T.element_size()
    bits = T.view(torch.int16).numpy()
    rp = min(time_call(lambda: torch.sum(T), repeat)[1], time_call(lambda: np.sum(bits, dtype=np.int64), repeat)[1])
    rows = []
    for rule in rules:
        f = default_f(rule, n)
        ref = fedagg.aggregate(T.float(), rule, f_used(rule, f))
        cases = [("fedagg, in place", lambda: fedagg.aggregate(T, rule, f_used(rule, f))),
                 ("widen, then fedagg", lambda: fedagg.aggregate(T.float(), rule, f_used(rule, f))),
                 ("fedagg on float32", lambda: fedagg.aggregate(X32, rule, f_used(rule, f)))]
        if rule == "mean":
            cases.append(("torch T.mean(0)", lambda: T.mean(0)))
        elif rule == "median":
            cases.append(("torch T.median(0)", lambda: T.median(0).values))
        for impl, fn in cases:
            out, sec, times, note = time_call(fn, repeat, max_seconds)
            rec = {"rule": rule, "f": f if RULES[rule].uses_f else None, "impl": impl, "seconds": sec,
                   "times": times, "gbps": half_bytes / sec / 1e9, "x_read": sec / rp, "note": note}
            if impl == "fedagg, in place":
                rec["bitwise_equal_to_widened"] = bool(torch.equal(out, ref.to(T.dtype)))
            rows.append(rec)
            out = None
    return {"machine": machine_info(), "n": n, "d": d, "dtype": dtype, "half_bytes": half_bytes,
            "read_pass_seconds": rp, "read_pass_gbps": half_bytes / rp / 1e9, "rows": rows}


def half_lines(res: Dict[str, Any]) -> List[str]:
    out = [f"half precision: n = {res['n']}, d = {res['d']:,} {res['dtype']} ({res['half_bytes'] / 1e9:.2f} GB); "
           f"read pass (torch.sum, or NumPy's sum of the bits) {res['read_pass_seconds'] * 1e3:.1f} ms, "
           f"{res['read_pass_gbps']:.1f} GB/s",
           f"{'rule':18s} {'implementation':22s} {'ms':>9s} {'GB/s':>6s} {'x read':>7s}  note"]
    for r in res["rows"]:
        note = r["note"]
        if "bitwise_equal_to_widened" in r:
            note = ("same bits as widened" if r["bitwise_equal_to_widened"] else "DIFFERS from widened") + (
                f"; {note}" if note else "")
        out.append(f"{r['rule']:18s} {r['impl']:22s} {r['seconds'] * 1e3:9.1f} {r['gbps']:6.1f} "
                   f"{r['x_read']:7.2f}  {note}")
    return out
