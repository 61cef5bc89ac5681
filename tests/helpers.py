"""Shared test helpers: data generation, tolerances, rule preconditions."""

from __future__ import annotations

import numpy as np

import fedagg

RTOL = 1e-5
ATOL_REL = 1e-6  # atol = ATOL_REL * max|x|

ALL_RULES = (
    "mean",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "bulyan",
    "geometric_median",
    "centered_clipping",
)
SELECTION_RULES = ("krum", "multi_krum", "bulyan")
WEIGHTED_RULES = ("mean", "multi_krum", "geometric_median", "centered_clipping")


def min_n(rule: str, f: int) -> int:
    """Smallest n the rule accepts for f (the documented preconditions)."""
    return {
        "mean": 1,
        "median": 2 * f + 1,
        "trimmed_mean": 2 * f + 1,
        "krum": 2 * f + 3,
        "multi_krum": 2 * f + 3,
        "bulyan": 4 * f + 3,
        "geometric_median": 2 * f + 1,
        "centered_clipping": 2 * f + 1,
    }[rule]


def max_f(rule: str, n: int) -> int:
    """Largest f the rule accepts for n (-1 if none)."""
    if rule == "mean":
        return 0
    if rule in ("krum", "multi_krum"):
        return (n - 3) // 2
    if rule == "bulyan":
        return (n - 3) // 4
    return (n - 1) // 2


def updates(seed: int, n: int, d: int, scale: float = 1.0, dtype=np.float32) -> np.ndarray:
    """n random updates of d coordinates (fixed seed)."""
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, d)) * scale).astype(dtype)


def atol_for(X) -> float:
    X = np.asarray(X, dtype=np.float64)
    return ATOL_REL * float(np.max(np.abs(X))) if X.size else 0.0


def assert_close(got, ref, X, rtol: float = RTOL, atol_rel: float = ATOL_REL, err_msg: str = ""):
    """float32 result vs float64 reference: rtol plus an atol scaled to the inputs."""
    got = np.asarray(got)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    Xa = np.asarray(X, dtype=np.float64)
    finite = np.abs(Xa[np.isfinite(Xa)])  # the scale of the inputs the rule kept
    atol = atol_rel * float(finite.max()) if finite.size else 0.0
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=rtol, atol=atol, err_msg=err_msg)


def rule_kwargs(rule: str) -> dict:
    """Non-default parameters that make every rule do real work in the tests."""
    if rule == "centered_clipping":
        return {"tau": 1.0, "iterations": 3}
    return {}


def run_rule(X, rule, f=0, weights=None, **kw):
    """fedagg.aggregate with return_info=True."""
    return fedagg.aggregate(X, rule=rule, f=f, weights=weights, return_info=True, **kw)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (a server about to bind it)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    """A transport Server in a thread of this process (on a free loopback port unless `bind` says otherwise)."""

    def __init__(self, d=1000, model=None, **cfg):
        import threading

        from fedagg.transport import Server, ServerConfig

        cfg.setdefault("bind", "tcp://127.0.0.1:0")
        cfg.setdefault("deadline", 30.0)
        self.server = Server(np.zeros(d, np.float32) if model is None else model, ServerConfig(**cfg))
        self.endpoint = self.server.endpoint
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()
