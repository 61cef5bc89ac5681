"""Plain float64 NumPy reference implementations of the fedagg rules.

Each function follows the definition in the docstrings of ``fedagg.rules``
literally (loops where that is the clearest). Inputs are whatever float
arrays the test generated; they are converted to float64 first, so a
reference computed on float32 data uses exactly the float32 values fedagg sees.
"""

from __future__ import annotations

import math

import numpy as np


def f64(X) -> np.ndarray:
    return np.asarray(X, dtype=np.float64)


# ------------------------------------------------------------------ helpers
def sqdist_matrix(X) -> np.ndarray:
    """Squared Euclidean distances between the rows, in float64."""
    X = f64(X)
    n = X.shape[0]
    D = np.zeros((n, n))
    for i in range(n):
        for k in range(i + 1, n):
            diff = X[i] - X[k]
            D[i, k] = D[k, i] = float(np.dot(diff, diff))
    return D


def sqnorms(X) -> np.ndarray:
    X = f64(X)
    return np.array([float(np.dot(x, x)) for x in X])


def sqdist_to(X, y) -> np.ndarray:
    X, y = f64(X), f64(y)
    return np.array([float(np.dot(x - y, x - y)) for x in X])


def weighted_sum(X, coef) -> np.ndarray:
    X = f64(X)
    out = np.zeros(X.shape[1])
    for c, x in zip(coef, X):
        out += float(c) * x
    return out


def _median_of_sorted(v) -> float:
    n = len(v)
    if n % 2 == 1:
        return float(v[(n - 1) // 2])
    return (float(v[n // 2 - 1]) + float(v[n // 2])) / 2.0


# -------------------------------------------------------------------- rules
def mean(X, weights=None) -> np.ndarray:
    X = f64(X)
    w = np.ones(X.shape[0]) if weights is None else f64(weights)
    return weighted_sum(X, w / w.sum())


def median(X) -> np.ndarray:
    X = f64(X)
    return np.array([_median_of_sorted(sorted(X[:, j])) for j in range(X.shape[1])])


def trimmed_mean(X, f=0, beta=None) -> np.ndarray:
    X = f64(X)
    n = X.shape[0]
    trim = math.floor(beta * n) if beta is not None else f
    out = np.empty(X.shape[1])
    for j in range(X.shape[1]):
        v = sorted(X[:, j])
        kept = v[trim:n - trim]
        out[j] = sum(kept) / len(kept)
    return out


def krum_scores(X=None, f=0, D=None) -> np.ndarray:
    """score(i) = sum of the squared distances to the n - f - 2 closest other updates."""
    if D is None:
        D = sqdist_matrix(X)
    n = D.shape[0]
    q = n - f - 2
    scores = np.empty(n)
    for i in range(n):
        others = sorted(D[i, k] for k in range(n) if k != i)
        scores[i] = sum(others[:q])
    return scores


def _argmin_lowest(values, candidates):
    best = None
    for i in candidates:
        if best is None or values[i] < values[best]:
            best = i
    return best


def krum(X, f):
    """(aggregate, selected index)."""
    X = f64(X)
    scores = krum_scores(X, f)
    best = _argmin_lowest(scores, range(len(scores)))
    return X[best].copy(), best, scores


def multi_krum(X, f, m=None, weights=None):
    """(aggregate, selected indices in selection order, scores)."""
    X = f64(X)
    n = X.shape[0]
    scores = krum_scores(X, f)
    m = n - f if m is None else m
    order = sorted(range(n), key=lambda i: (scores[i], i))  # stable
    sel = order[:m]
    w = np.ones(n) if weights is None else f64(weights)
    ws = np.array([w[i] for i in sel])
    return weighted_sum(X[sel], ws / ws.sum()), np.array(sel), scores


def bulyan_select(D, f):
    """Iterated Krum: theta = n - 2f picks; r remaining use max(0, r - f - 2) neighbours."""
    n = D.shape[0]
    theta = n - 2 * f
    remaining = list(range(n))
    selected = []
    for _ in range(theta):
        r = len(remaining)
        q = max(0, r - f - 2)
        scores = {}
        for i in remaining:
            others = sorted(D[i, k] for k in remaining if k != i)
            scores[i] = sum(others[:q])
        best = None
        for i in remaining:  # ascending index: lowest index wins ties
            if best is None or scores[i] < scores[best]:
                best = i
        selected.append(best)
        remaining.remove(best)
    return selected


def bulyan_reduce(S, f) -> np.ndarray:
    """Per coordinate: mean of the theta - 2f values closest to the median of the theta values.

    The 2f excluded values are removed greedily from the ends of the sorted
    values, always the end farther from the median; on a tie the right end.
    """
    S = f64(S)
    theta = S.shape[0]
    out = np.empty(S.shape[1])
    for j in range(S.shape[1]):
        v = sorted(S[:, j])
        med = _median_of_sorted(v)
        lo, hi = 0, theta - 1
        for _ in range(2 * f):
            if med - v[lo] > v[hi] - med:
                lo += 1
            else:
                hi -= 1
        kept = v[lo:hi + 1]
        assert len(kept) == theta - 2 * f
        out[j] = sum(kept) / len(kept)
    return out


def bulyan(X, f):
    X = f64(X)
    sel = bulyan_select(sqdist_matrix(X), f)
    return bulyan_reduce(X[sel], f), np.array(sel)


def geometric_median(X, weights=None, nu=1e-6, maxiter=100, tol=1e-6):
    """Smoothed Weiszfeld from the weighted mean; returns (z, iterations, objective)."""
    X = f64(X)
    n = X.shape[0]
    w = np.ones(n) if weights is None else f64(weights)
    alpha = w / w.sum()

    def objective(z):
        return sum(alpha[i] * math.sqrt(float(np.dot(z - X[i], z - X[i]))) for i in range(n))

    z = weighted_sum(X, alpha)
    obj = objective(z)
    it = 0
    while it < maxiter:
        it += 1
        b = np.empty(n)
        for i in range(n):
            r = math.sqrt(float(np.dot(z - X[i], z - X[i])))
            b[i] = alpha[i] / max(nu, r)
        z = weighted_sum(X, b / b.sum())
        new = objective(z)
        change = abs(obj - new)
        obj = new
        if change <= tol * new:
            break
    return z, it, obj


def centered_clipping(X, tau=100.0, iterations=1, center=None, weights=None):
    """v <- v + sum_i a_i (x_i - v) min(1, tau / ||x_i - v||), `iterations` times."""
    X = f64(X)
    n, d = X.shape
    w = np.ones(n) if weights is None else f64(weights)
    a = w / w.sum()
    v = np.zeros(d) if center is None else f64(center).reshape(-1).copy()
    for _ in range(iterations):
        step = np.zeros(d)
        for i in range(n):
            r = math.sqrt(float(np.dot(X[i] - v, X[i] - v)))
            scale = 1.0 if r <= tau else tau / r
            step += a[i] * scale * (X[i] - v)
        v = v + step
    return v


def nnm_mixing(D, f) -> np.ndarray:
    """Row i: weight 1/(n-f) on the n - f nearest updates of i (itself first, ties by index)."""
    n = D.shape[0]
    A = np.zeros((n, n))
    for i in range(n):
        order = sorted(range(n), key=lambda k: (-1.0 if k == i else D[i, k], k))
        for k in order[:n - f]:
            A[i, k] = 1.0 / (n - f)
    return A


def nnm(X, f) -> np.ndarray:
    X = f64(X)
    A = nnm_mixing(sqdist_matrix(X), f)
    return np.array([weighted_sum(X, A[i]) for i in range(X.shape[0])])


def clip(X, max_norm) -> np.ndarray:
    """x * min(1, max_norm / ||x||) for every row."""
    X = f64(X)
    out = np.empty_like(X)
    for i, x in enumerate(X):
        norm = math.sqrt(float(np.dot(x, x)))
        out[i] = x * (min(1.0, max_norm / norm) if norm > 0 else 1.0)
    return out


# ---------------------------------------------------------- one entry point
def aggregate(X, rule, f=0, weights=None, **params) -> np.ndarray:
    """The reference aggregate (float64) of `rule` on the rows of X."""
    if rule == "mean":
        return mean(X, weights)
    if rule == "median":
        return median(X)
    if rule == "trimmed_mean":
        return trimmed_mean(X, f, params.get("beta"))
    if rule == "krum":
        return krum(X, f)[0]
    if rule == "multi_krum":
        return multi_krum(X, f, params.get("m"), weights)[0]
    if rule == "bulyan":
        return bulyan(X, f)[0]
    if rule == "geometric_median":
        return geometric_median(X, weights, **params)[0]
    if rule == "centered_clipping":
        return centered_clipping(X, weights=weights, **params)
    raise ValueError(rule)


def selection(X, rule, f=0, **params):
    """Selected indices (selection order) for the selection rules, else None."""
    if rule == "krum":
        return np.array([krum(X, f)[1]])
    if rule == "multi_krum":
        return multi_krum(X, f, params.get("m"))[1]
    if rule == "bulyan":
        return bulyan(X, f)[1]
    return None
