"""Aggregation rules: one function per rule, and ``aggregate(updates, rule=...)``.

Every rule takes ``n`` updates of ``d`` coordinates (an ``(n, d)`` array or a
list of ``n`` arrays; NumPy or CPU torch) and returns the aggregate in the
caller's type, or ``(aggregate, AggregationInfo)`` with ``return_info=True``.
``f`` is always the number of Byzantine updates the rule must tolerate.

What each rule does with ``f`` (``RULES[rule].uses_f``):

====================  ============  ==================================================
rule                  f is a        what f does
====================  ============  ==================================================
mean                  (not used)    f > 0 is refused (ValueError), except with
                                    ``nnm=True``, where the mixing uses it
median                precondition  checked: n > 2f; the output does not depend on f
trimmed_mean          parameter     f values cut per side (or ``beta``); n > 2f
krum                  parameter     scores over n - f - 2 neighbours; n > 2f + 2
multi_krum            parameter     Krum scores; ``m`` defaults to n - f; n > 2f + 2
bulyan                parameter     selects n - 2f, averages n - 4f; n >= 4f + 3
geometric_median      precondition  checked: n > 2f; the output does not depend on f
centered_clipping     precondition  checked: n > 2f; the output does not depend on f
(any rule) nnm=True   parameter     each update -> mean of its n - f nearest; n > 2f
====================  ============  ==================================================

Common options of every rule:

``nonfinite``
    ``"raise"`` (default): an update holding NaN or Inf raises ``ValueError``
    naming it. ``"exclude"``: such updates are dropped, reported in
    ``info.excluded``, and the rule runs on the rest (its ``n`` vs ``f``
    precondition is checked on the rest).
``clip_norm``
    Static L2 clipping: each update ``x`` is replaced by
    ``x * min(1, clip_norm / ||x||)`` before the rule (fused into the weights
    for ``mean``). ``info.clipped`` counts the updates scaled down.
``nnm``
    Nearest-neighbour mixing (Allouah et al. 2023) before the rule: each
    update is replaced by the mean of its ``n - f`` nearest updates (itself
    included; squared Euclidean distance, ties by index). The ``n`` mixed
    updates are materialized (one ``n x d`` float32 buffer).
"""

from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import numpy as np

from . import _core
from ._arrays import Batch, as_batch, as_vector, as_weights

__all__ = [
    "AggregationInfo",
    "RULES",
    "aggregate",
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "bulyan",
    "geometric_median",
    "centered_clipping",
    "nnm",
    "clip",
]


@dataclass(frozen=True)
class AggregationInfo:
    """Diagnostics of one aggregation. Indices refer to the updates as given."""

    rule: str
    n: int
    f: int
    #: updates the output was formed from (Krum, Multi-Krum, Bulyan's selection), in selection order
    selected: Optional[np.ndarray] = None
    #: updates dropped for holding NaN/Inf (``nonfinite="exclude"``)
    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    #: Krum scores (Krum, Multi-Krum; NaN for excluded updates)
    scores: Optional[np.ndarray] = None
    #: weight of each update in the output (mean, Multi-Krum, geometric median, centered clipping)
    weights: Optional[np.ndarray] = None
    #: updates scaled down by ``clip_norm``
    clipped: int = 0
    #: iterations run (geometric median, centered clipping)
    iterations: Optional[int] = None
    #: rule-specific extras (objective value, clipped-by-tau count, ...)
    details: Dict[str, Any] = field(default_factory=dict)
    #: client ids in update order (streaming Aggregator)
    client_ids: Optional[Tuple[Any, ...]] = None
    #: what differential privacy did this round (``dp=``): a fedagg.privacy.PrivacyRecord
    privacy: Any = None


class _NonFinite(Exception):
    """A kernel saw NaN or Inf in its input."""


def _check_int(value: Any, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_float(value: Any, name: str, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not np.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value}")
    return value


def _finite(x: np.ndarray) -> bool:
    return bool(np.isfinite(x).all())


# ----------------------------------------------------------------- rule kernels
# Each takes a Batch of n finite-or-suspect rows and returns (float32 result, info fields);
# raises _NonFinite when the kernels report NaN/Inf.


def _distances(batch: Batch) -> np.ndarray:
    # Finite input gives a finite matrix (float32 overflow is redone in float64 natively).
    D = batch.ops.pairwise_sqdist(batch.rows)
    if not _finite(D):
        raise _NonFinite
    return D


def _k_mean(batch: Batch, p: dict):
    w = p["weights"] if p["weights"] is not None else np.ones(batch.n)
    coef = w / w.sum()
    if p["scale"] is not None:  # clip_norm fused into the coefficients
        coef = coef * p["scale"]
    out, finite = batch.ops.weighted_sum(batch.rows, coef)
    if not finite:
        raise _NonFinite
    return out, {"weights": w / w.sum()}


def _k_median(batch: Batch, p: dict):
    out, bad = batch.ops.sorted_reduce(batch.rows, "median", 0)
    if bad:
        raise _NonFinite
    return out, {}


def _k_trimmed_mean(batch: Batch, p: dict):
    out, bad = batch.ops.sorted_reduce(batch.rows, "trimmed_mean", p["trim"])
    if bad:
        raise _NonFinite
    return out, {"details": {"trimmed_per_side": p["trim"]}}


def _krum_scores(batch: Batch, p: dict) -> np.ndarray:
    D = p.get("D")
    if D is None:
        D = _distances(batch)
    return _core.krum_scores(D, p["f"])


def _k_krum(batch: Batch, p: dict):
    scores = _krum_scores(batch, p)
    best = int(np.argmin(scores))
    return batch.ops.copy(batch.row(best)), {
        "selected": np.array([best]),
        "scores": scores,
    }


def _k_multi_krum(batch: Batch, p: dict):
    scores = _krum_scores(batch, p)
    m = p["m"] if p["m"] is not None else batch.n - p["f"]
    if not 1 <= m <= batch.n:
        raise ValueError(f"m must satisfy 1 <= m <= n = {batch.n}, got {m}")
    sel = np.argsort(scores, kind="stable")[:m]
    w = p["weights"] if p["weights"] is not None else np.ones(batch.n)
    wsel = w[sel]
    if not wsel.sum() > 0:
        raise ValueError("weights of the selected updates sum to zero")
    coef = wsel / wsel.sum()
    out, _ = batch.ops.weighted_sum(batch.subset(sel).rows, coef)  # finite scores: finite rows
    weights = np.zeros(batch.n)
    weights[sel] = coef
    return out, {"selected": sel, "scores": scores, "weights": weights}


def _k_bulyan(batch: Batch, p: dict):
    D = p.get("D")
    if D is None:
        D = _distances(batch)
    sel = _core.bulyan_select(D, p["f"])
    out, bad = batch.ops.sorted_reduce(batch.subset(sel).rows, "bulyan", p["f"])
    if bad:
        raise _NonFinite
    return out, {"selected": sel}


def _k_geometric_median(batch: Batch, p: dict):
    D = p.get("D")
    if D is None:
        D = _distances(batch)
    w = p["weights"] if p["weights"] is not None else np.ones(batch.n)
    alpha = w / w.sum()
    coef, iters, obj = _core.weiszfeld(D, alpha, p["nu"], p["maxiter"], p["tol"])
    out, finite = batch.ops.weighted_sum(batch.rows, coef)
    if not finite:
        raise _NonFinite
    return out, {"weights": coef, "iterations": int(iters), "details": {"objective": float(obj)}}


def _k_centered_clipping(batch: Batch, p: dict):
    center = batch.ops.zeros(batch.d) if p["center"] is None else batch.ops.to_device(p["center"])
    n = batch.n
    rows = [center, *[batch.row(i) for i in range(n)]]
    D = p.get("D")
    if D is None and p["iterations"] > 1:
        # Later iterations start from a combination of the updates: they need
        # all pairwise distances (one pass gives them, and those to the center).
        full = _distances(batch.with_rows(rows))
    else:
        # One iteration needs only the distances to the center; in streaming
        # those among the updates were built on arrival.
        to_center = batch.ops.sqdist_to(batch.rows, center)
        if not _finite(to_center):
            raise _NonFinite
        full = np.zeros((n + 1, n + 1))
        if D is not None:
            full[1:, 1:] = D
        full[0, 1:] = to_center
        full[1:, 0] = to_center
    w = p["weights"] if p["weights"] is not None else np.ones(n)
    coef, clipped = _core.centered_clipping(full, w / w.sum(), p["tau"], p["iterations"])
    out, finite = batch.ops.weighted_sum(rows, coef)
    if not finite:
        raise _NonFinite
    return out, {
        "weights": coef[1:],
        "iterations": p["iterations"],
        "details": {"center_weight": float(coef[0]), "clipped_by_tau": int(clipped)},
    }


@dataclass(frozen=True)
class _Rule:
    kernel: Any
    weights: bool  # accepts per-update weights
    min_n: Any  # f -> smallest n, for the precondition message
    condition: str
    distance_based: bool
    #: what the rule does with f: "parameter" (it changes the output), "precondition" (only the
    #: n vs f check), or "" (nothing: f > 0 is refused unless nnm=True uses it)
    uses_f: str = "parameter"


RULES: Dict[str, _Rule] = {
    "mean": _Rule(_k_mean, True, lambda f: 1, "n >= 1", False, ""),
    "median": _Rule(_k_median, False, lambda f: 2 * f + 1, "n > 2f", False, "precondition"),
    "trimmed_mean": _Rule(_k_trimmed_mean, False, lambda f: 2 * f + 1, "n > 2f", False, "parameter"),
    "krum": _Rule(_k_krum, False, lambda f: 2 * f + 3, "n > 2f + 2", True, "parameter"),
    "multi_krum": _Rule(_k_multi_krum, True, lambda f: 2 * f + 3, "n > 2f + 2", True, "parameter"),
    "bulyan": _Rule(_k_bulyan, False, lambda f: 4 * f + 3, "n >= 4f + 3", True, "parameter"),
    "geometric_median": _Rule(_k_geometric_median, True, lambda f: 2 * f + 1, "n > 2f", True, "precondition"),
    "centered_clipping": _Rule(_k_centered_clipping, True, lambda f: 2 * f + 1, "n > 2f", True, "precondition"),
}


def _check_f_used(rule: str, f: int, nnm: bool) -> None:
    """Refuse an f that nothing would use (the mean without nnm), rather than ignore it."""
    if f and not nnm and not RULES[rule].uses_f:
        raise ValueError(f"rule {rule!r} does not use f (got f = {f}): it tolerates no Byzantine update; "
                         "pass f=0, or nnm=True to mix each update with its n - f nearest in front of it")

_DEFAULTS = {
    "m": None,
    "beta": None,
    "nu": 1e-6,
    "maxiter": 100,
    "tol": 1e-6,
    "tau": 100.0,
    "iterations": 1,
    "center": None,
}


def _params(rule: str, f: Any, weights: Any, n: Optional[int], d: Optional[int], params: dict) -> dict:
    """Check and normalize the parameters of `rule` (n and d when known)."""
    if rule not in RULES:
        raise ValueError(f"unknown rule {rule!r}; choose one of {sorted(RULES)}")
    unknown = set(params) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"unexpected parameter(s) {sorted(unknown)} for rule {rule!r}")
    p = dict(_DEFAULTS)
    p.update(params)
    p["f"] = _check_int(f, "f")
    spec = RULES[rule]
    if weights is not None and not spec.weights:
        raise ValueError(f"rule {rule!r} does not take per-update weights")
    if p["m"] is not None:
        if rule != "multi_krum":
            raise TypeError(f"m is a parameter of multi_krum, not of {rule!r}")
        p["m"] = _check_int(p["m"], "m", 1)
    if p["beta"] is not None:
        if rule != "trimmed_mean":
            raise TypeError(f"beta is a parameter of trimmed_mean, not of {rule!r}")
        beta = _check_float(p["beta"], "beta", positive=False)
        if not 0 <= beta < 0.5:
            raise ValueError(f"beta must satisfy 0 <= beta < 0.5, got {beta}")
        if p["f"] != 0:
            raise ValueError("give trimmed_mean either f (count per side) or beta (fraction), not both")
    p["nu"] = _check_float(p["nu"], "nu")
    p["tol"] = _check_float(p["tol"], "tol", positive=False)
    if p["tol"] < 0:
        raise ValueError("tol must be >= 0")
    p["maxiter"] = _check_int(p["maxiter"], "maxiter", 1)
    p["tau"] = _check_float(p["tau"], "tau")
    p["iterations"] = _check_int(p["iterations"], "iterations", 1)
    if p["center"] is not None and rule != "centered_clipping":
        raise TypeError(f"center is a parameter of centered_clipping, not of {rule!r}")
    if d is not None and p["center"] is not None:
        p["center"] = as_vector(p["center"], d, "center")
        if not _finite(p["center"]):
            raise ValueError("center must be finite")
    if n is not None:
        _check_n(rule, n, p)
    return p


def _check_n(rule: str, n: int, p: dict) -> None:
    spec = RULES[rule]
    f = p["f"]
    if rule == "trimmed_mean":
        p["trim"] = int(np.floor(p["beta"] * n)) if p["beta"] is not None else f
        if 2 * p["trim"] >= n:
            raise ValueError(
                f"trimmed_mean cuts {p['trim']} updates per side, which needs n > {2 * p['trim']}; got n = {n}"
            )
        return
    if n < spec.min_n(f):
        raise ValueError(
            f"{rule} with f = {f} needs {spec.condition} (n >= {spec.min_n(f)}); got n = {n}"
        )
    if p["m"] is not None and p["m"] > n:
        raise ValueError(f"m must satisfy 1 <= m <= n = {n}, got {p['m']}")


def _apply_clip(batch: Batch, clip_norm: float, fold: bool):
    """Norm clipping: scale factors (fold=True), or a batch of clipped rows."""
    norms = np.sqrt(batch.ops.sqnorms(batch.rows))
    if not _finite(norms):
        raise _NonFinite
    with np.errstate(over="ignore"):  # a zero update: C / tiny overflows to inf, and min(1, inf) = 1
        scale = np.minimum(1.0, clip_norm / np.maximum(norms, np.finfo(np.float64).tiny))
    clipped = int(np.count_nonzero(scale < 1.0))
    if fold:
        return batch, scale, clipped
    rows = [batch.row(i) if scale[i] >= 1.0 else batch.ops.scaled(batch.row(i), scale[i])
            for i in range(batch.n)]
    return batch.with_rows(rows), None, clipped


def _mixed(batch: Batch, f: int) -> Batch:
    D = _distances(batch)
    return batch.with_rows(batch.ops.mix(batch.rows, _core.nnm_mixing(D, f)))


def _run(rule: str, batch: Batch, p: dict, *, weights: Optional[np.ndarray], nonfinite: str,
         clip_norm: Optional[float], nnm: bool, return_info: bool, client_ids=None,
         D: Optional[np.ndarray] = None):
    """Run `rule` with the non-finite policy; indices in info refer to `batch`."""
    spec = RULES[rule]
    n_total = batch.n
    keep = np.arange(n_total)
    excluded = np.zeros(0, dtype=np.int64)
    for _attempt in range(2):
        given = sub = batch if len(keep) == n_total else batch.subset(keep)
        q = dict(p)
        q["weights"] = None if weights is None else weights[keep]
        q["scale"] = None
        q["D"] = None if (D is None or nnm or len(keep) != n_total) else D
        try:
            _check_n(rule, sub.n, q)
            clipped = 0
            if clip_norm is not None:
                sub, q["scale"], clipped = _apply_clip(sub, clip_norm, fold=(rule == "mean" and not nnm))
            if nnm:
                if not 2 * q["f"] < sub.n:
                    raise ValueError(f"nnm with f = {q['f']} needs n > 2f; got n = {sub.n}")
                sub = _mixed(sub, q["f"])
            out, fields = spec.kernel(sub, q)
            break
        except _NonFinite:
            bad = np.flatnonzero(given.ops.nonfinite_rows(given.rows))  # the rows as given, not transformed
            if bad.size == 0:  # cannot happen: finite input gives finite results
                raise FloatingPointError(f"{rule}: non-finite result from finite input")
            bad = keep[bad]
            if nonfinite == "raise":
                shown = ", ".join(str(int(i)) for i in bad[:10]) + (" ..." if bad.size > 10 else "")
                raise ValueError(
                    f"updates [{shown}] contain NaN or Inf ({bad.size} of {n_total}); "
                    "pass nonfinite='exclude' to drop them"
                ) from None
            excluded = np.union1d(excluded, bad)
            keep = np.setdiff1d(keep, bad)
            if keep.size == 0:
                raise ValueError("every update contains NaN or Inf") from None
    else:  # pragma: no cover - the retry runs on finite rows only
        raise RuntimeError(f"{rule}: non-finite handling did not converge")

    result = batch.wrap(out)
    if not return_info:
        return result
    # Map indices of the kept subset back to the caller's indices.
    if "selected" in fields:
        fields["selected"] = keep[np.asarray(fields["selected"], dtype=np.int64)]
    for key in ("scores", "weights"):
        if key in fields:
            full = np.full(n_total, np.nan if key == "scores" else 0.0)
            full[keep] = fields[key]
            fields[key] = full
    info = AggregationInfo(
        rule=rule, n=n_total, f=p["f"], excluded=excluded, clipped=clipped,
        client_ids=client_ids, **fields,
    )
    return result, info


def _check_policy(nonfinite: str) -> str:
    if nonfinite not in ("raise", "exclude"):
        raise ValueError(f"nonfinite must be 'raise' or 'exclude', got {nonfinite!r}")
    return nonfinite


def aggregate(updates: Any, rule: str = "mean", f: int = 0, *, weights: Any = None,
              nonfinite: str = "raise", clip_norm: Optional[float] = None, nnm: bool = False,
              dp: Any = None, return_info: bool = False, **params):
    """Aggregate `updates` with `rule` (one of ``fedagg.RULES``).

    ``f``: the Byzantine updates to tolerate. A parameter of trimmed_mean, krum,
    multi_krum, bulyan and of ``nnm=True``; only the checked precondition of
    median, geometric_median and centered_clipping; refused (f > 0 raises
    ValueError) by the mean unless ``nnm=True`` (see the module's table).

    >>> import numpy as np, fedagg
    >>> x = np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 600.0]], dtype=np.float32)
    >>> fedagg.aggregate(x, rule="median")
    array([2., 4.], dtype=float32)
    >>> fedagg.aggregate(x, rule="mean", weights=[1, 1, 0]).tolist()
    [1.5, 3.0]
    """
    _check_options(rule, nonfinite, nnm)
    return _aggregate_batch(as_batch(updates), rule, f, weights=weights, nonfinite=nonfinite,
                            clip_norm=clip_norm, nnm=nnm, dp=dp, return_info=return_info, params=params)


def _check_options(rule: Any, nonfinite: Any, nnm: Any) -> None:
    if not isinstance(rule, str):
        raise TypeError(f"rule must be a string, got {type(rule).__name__}")
    _check_policy(nonfinite)
    if not isinstance(nnm, bool):
        raise TypeError("nnm must be True or False")


def _aggregate_batch(batch: Batch, rule: str, f: Any, *, weights: Any, nonfinite: str,
                     clip_norm: Optional[float], nnm: bool, dp: Any, return_info: bool, params: dict,
                     shard: Any = None):
    """aggregate() on a validated batch; `shard` (fedagg.distributed) when the batch is a coordinate range."""
    p = _params(rule, f, weights, None, batch.d, params)
    _check_f_used(rule, p["f"], nnm)
    w = None if weights is None else as_weights(weights, batch.n)
    if clip_norm is not None:
        clip_norm = _check_float(clip_norm, "clip_norm")
    if dp is None:
        return _run(rule, batch, p, weights=w, nonfinite=nonfinite, clip_norm=clip_norm,
                    nnm=nnm, return_info=return_info)
    # Differential privacy (fedagg.privacy.CentralDP): clip -> rule -> noise.
    if clip_norm is not None:
        raise ValueError("dp sets the clipping norm; do not pass clip_norm with it")
    dp.check_weights(rule, w)
    out, info = _run(rule, batch, p, weights=w, nonfinite=nonfinite, clip_norm=dp.clip_norm,
                     nnm=nnm, return_info=True)
    kept = np.setdiff1d(np.arange(batch.n), info.excluded)
    noised, record = dp.release(out, rule=rule, participants=int(kept.size),
                                unclipped=int(kept.size) - info.clipped,
                                weight_sum=float(kept.size if w is None else w[kept].sum()), shard=shard)
    info = dataclasses.replace(info, privacy=record)
    return (noised, info) if return_info else noised


def mean(updates, *, weights=None, **options):
    """Weighted mean, FedAvg (McMahan et al. 2017): ``sum_i w_i x_i / sum_i w_i``.

    Accumulated in float64. Not robust: one update can move it arbitrarily.
    Takes no ``f``: ``aggregate(x, "mean", f)`` refuses f > 0 (ValueError) unless
    ``nnm=True``, where f is the mixing's (each update becomes the mean of its
    n - f nearest before the mean).
    """
    return aggregate(updates, "mean", 0, weights=weights, **options)


def median(updates, f: int = 0, **options):
    """Coordinate-wise median (Yin et al. 2018).

    For each coordinate the middle value of the n updates; for even n the mean of
    the two middle values. Tolerates f < n/2 (checked: n > 2f).
    ``f`` is only that precondition: the output does not depend on it (with
    ``nnm=True`` the mixing uses it).
    """
    return aggregate(updates, "median", f, **options)


def trimmed_mean(updates, f: int = 0, *, beta: Optional[float] = None, **options):
    """Coordinate-wise trimmed mean (Yin et al. 2018).

    For each coordinate, drop the ``f`` smallest and ``f`` largest values and
    average the other ``n - 2f``. Give either ``f`` (a count per side) or
    ``beta`` (a fraction per side: ``floor(beta * n)`` values are cut from each
    end, the paper's beta-trimmed mean). Needs n > 2f.
    ``f`` is a parameter: the number of values cut per side.
    """
    return aggregate(updates, "trimmed_mean", f, beta=beta, **options)


def krum(updates, f: int, **options):
    """Krum (Blanchard et al. 2017).

    score(i) = sum of the squared distances from update i to its n - f - 2
    closest other updates; returns the update with the lowest score (lowest
    index on ties). Needs n > 2f + 2. ``info.scores`` has every score.
    ``f`` is a parameter: it sets the number of neighbours scored.
    """
    return aggregate(updates, "krum", f, **options)


def multi_krum(updates, f: int, m: Optional[int] = None, *, weights=None, **options):
    """Multi-Krum (Blanchard et al. 2017): mean of the ``m`` updates with the best Krum scores.

    Scores as in :func:`krum`, computed once on all n updates; the m lowest
    (stable order) are averaged, weighted by ``weights`` if given. ``m``
    defaults to n - f. Needs n > 2f + 2.
    ``f`` is a parameter: the neighbours scored and the default m.
    """
    return aggregate(updates, "multi_krum", f, m=m, weights=weights, **options)


def bulyan(updates, f: int, **options):
    """Bulyan (El Mhamdi et al. 2018) over Krum, needing n >= 4f + 3.

    1. Selection: theta = n - 2f updates chosen by iterated Krum; each step
       scores the remaining updates (r of them) with their r - f - 2 nearest
       remaining neighbours (at least 0) and removes the best one.
    2. Per coordinate: of the theta selected values, the mean of the
       beta = theta - 2f values closest to their median (ties keep the smaller value).

    ``f`` is a parameter of both stages.
    """
    return aggregate(updates, "bulyan", f, **options)


def geometric_median(updates, f: int = 0, *, weights=None, nu: float = 1e-6,
                     maxiter: int = 100, tol: float = 1e-6, **options):
    """Geometric median by smoothed Weiszfeld (RFA, Pillutla et al. 2022).

    Minimizes sum_i a_i max(nu, ||z - x_i||) (a = normalized weights) starting
    from the weighted mean: z <- sum_i b_i x_i / sum_i b_i with
    b_i = a_i / max(nu, ||z - x_i||), until the objective changes by at most
    ``tol`` times its value or ``maxiter`` iterations ran. Computed from the
    pairwise distance matrix (two passes over the data in all): distances
    to the iterate follow from it as (D a)_i - a^T D a / 2. Its entries carry
    float32 rounding (relative ~1e-7), so an update within ~1e-3 * spread of
    the estimate gets a slightly perturbed weight; the objective, flat there,
    matches a float64 Weiszfeld to ~1e-7.

    ``f`` is only a precondition, checked (n > 2f): the output does not depend
    on it (with ``nnm=True`` the mixing uses it).
    """
    return aggregate(updates, "geometric_median", f, weights=weights, nu=nu,
                     maxiter=maxiter, tol=tol, **options)


def centered_clipping(updates, f: int = 0, *, tau: float = 100.0, iterations: int = 1,
                      center=None, weights=None, **options):
    """Centered clipping (Karimireddy et al. 2021).

    Starting at v = ``center`` (the previous aggregate; zeros if None), repeat
    ``iterations`` times: v <- v + sum_i a_i (x_i - v) min(1, tau / ||x_i - v||)
    with a = normalized weights (1/n by default).

    ``f`` is only a precondition, checked (n > 2f): the output does not depend
    on it; ``tau`` sets the robustness (with ``nnm=True`` the mixing uses f).
    """
    return aggregate(updates, "centered_clipping", f, tau=tau, iterations=iterations,
                     center=center, weights=weights, **options)


def nnm(updates, f: int):
    """Nearest-neighbour mixing (Allouah et al. 2023): returns the n mixed updates.

    Row i of the result is the mean of the n - f updates nearest to update i
    (itself included; squared Euclidean distance, ties by index). Needs n > 2f.
    Pass ``nnm=True`` to any rule to mix before it. Updates holding NaN or Inf
    raise ValueError.
    """
    batch = as_batch(updates)
    f = _check_int(f, "f")
    if not 2 * f < batch.n:
        raise ValueError(f"nnm with f = {f} needs n > 2f; got n = {batch.n}")
    bad = np.flatnonzero(batch.ops.nonfinite_rows(batch.rows))
    if bad.size:
        raise ValueError(f"updates {bad.tolist()[:10]} contain NaN or Inf")
    Y = batch.ops.mix(batch.rows, _core.nnm_mixing(batch.ops.pairwise_sqdist(batch.rows), f))
    if isinstance(updates, (list, tuple)):
        return [batch.wrap(y) for y in Y]
    return batch.wrap(Y)


def clip(updates, max_norm: float):
    """Static L2 clipping: each update scaled by min(1, max_norm / ||x||); returns copies."""
    max_norm = _check_float(max_norm, "max_norm")
    batch = as_batch(updates)
    norms = np.sqrt(batch.ops.sqnorms(batch.rows))
    if not _finite(norms):
        raise ValueError("updates contain NaN or Inf")
    scale = np.minimum(1.0, max_norm / np.maximum(norms, np.finfo(np.float64).tiny))
    rows = [batch.ops.scaled(batch.row(i), scale[i]) for i in range(batch.n)]
    if isinstance(updates, (list, tuple)):
        return [batch.wrap(r) for r in rows]
    return batch.wrap(batch.ops.stack(rows))
