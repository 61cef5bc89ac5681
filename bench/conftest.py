"""Shared inputs of the pytest-benchmark suite; sizes from the environment.

FEDAGG_BENCH_N (default 64), FEDAGG_BENCH_D (default 1_000_000),
FEDAGG_BENCH_F (default min(4, (n - 3) // 4), so that every rule runs),
FEDAGG_BENCH_ROUNDS (timed rounds per case, default 3),
FEDAGG_BENCH_MAX_SECONDS (skip an alternative estimated slower per call, default 60).
"""

import os

import numpy as np
import pytest

import fedagg
from fedagg import benchmark as fb

N = int(os.environ.get("FEDAGG_BENCH_N", "64"))
D = int(os.environ.get("FEDAGG_BENCH_D", "1000000"))
F = int(os.environ.get("FEDAGG_BENCH_F", str(max(0, min(4, (N - 3) // 4)))))
ROUNDS = int(os.environ.get("FEDAGG_BENCH_ROUNDS", "3"))
MAX_SECONDS = float(os.environ.get("FEDAGG_BENCH_MAX_SECONDS", "60"))
PROBE_D = 65_536


@pytest.fixture(scope="session")
def settings() -> dict:
    return {"n": N, "d": D, "f": F, "rounds": ROUNDS, "max_seconds": MAX_SECONDS}


@pytest.fixture(scope="session")
def inputs() -> fb.Inputs:
    torch, _ = fb.optional("torch")
    return fb.Inputs(fb.make_updates(N, D, F, seed=0), F, torch)


@pytest.fixture(scope="session")
def probe(inputs):
    """The first PROBE_D columns, to estimate an alternative's time before running it (None: small d)."""
    if D <= PROBE_D:
        return None
    p = fb.Inputs(np.ascontiguousarray(inputs.X[:, :PROBE_D]), F, fb.optional("torch")[0])
    p.ctx = inputs.ctx
    return p


@pytest.fixture(scope="session")
def reference(inputs):
    """fedagg's output for a rule (computed once; fills inputs.ctx[rule] with its info)."""
    cache = {}

    def get(rule: str) -> np.ndarray:
        if rule not in cache:
            try:
                out, info = fedagg.aggregate(inputs.X, rule, fb.f_used(rule, inputs.f), return_info=True)
            except ValueError as e:  # n too small for f
                pytest.skip(str(e))
            inputs.ctx[rule] = info
            cache[rule] = np.asarray(out)
        return cache[rule]

    return get
