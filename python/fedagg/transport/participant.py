"""A synthetic participant for ``fedagg join``, tests and benchmarks.

Every honest participant pulls the model toward a shared target (update =
target - model + small noise, the target from ``task_seed``), so a working
round moves the model toward the target. Byzantine behaviours:

    signflip   sends -10 x the honest update
    noise      sends N(0, 100^2) noise
    nan        sends an update holding NaN
    wrongsize  sends an update of d + 1 coordinates
    die        streams half its update, then the process exits without a word
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional

import numpy as np

from .client import Client, TransportError

BEHAVIOURS = ("honest", "signflip", "noise", "nan", "wrongsize", "die")


def target(d: int, task_seed: int = 0) -> np.ndarray:
    return np.random.default_rng(task_seed).standard_normal(d).astype(np.float32)


def make_update(behaviour: str, model: np.ndarray, goal: np.ndarray, rng) -> np.ndarray:
    honest = (goal - model + 0.01 * rng.standard_normal(model.size)).astype(np.float32)
    if behaviour == "honest" or behaviour == "die":
        return honest
    if behaviour == "signflip":
        return -10.0 * honest
    if behaviour == "noise":
        return (100.0 * rng.standard_normal(model.size)).astype(np.float32)
    if behaviour == "nan":
        bad = honest.copy()
        bad[::97] = np.nan
        return bad
    if behaviour == "wrongsize":
        return np.append(honest, np.float32(0.0))
    raise ValueError(f"behaviour must be one of {BEHAVIOURS}, got {behaviour!r}")


def run(endpoint: str, pid: str, *, behaviour: str = "honest", rounds: int = 1, task_seed: int = 0,
        seed: int = 0, timeout: float = 30.0, chunk_delay: float = 0.0, keys: Optional[Dict[str, Any]] = None,
        log=print) -> List[Dict[str, Any]]:
    """Take part in `rounds` rounds; returns one result per round (accepted or the refusal)."""
    if behaviour not in BEHAVIOURS:
        raise ValueError(f"behaviour must be one of {BEHAVIOURS}, got {behaviour!r}")
    rng = np.random.default_rng(seed)
    results = []
    kw = keys or {}
    with Client(endpoint, pid if not kw else None, timeout=timeout, **kw) as c:
        goal = None
        last = -1
        for _ in range(rounds):
            if last >= 0:
                try:
                    c.wait_round(last, timeout)
                except TransportError as e:
                    results.append({"round": last + 1, "error": e.reason, "detail": e.detail})
                    break
            rnd, model = c.model()
            if goal is None:
                goal = target(model.size, task_seed)
            update = make_update(behaviour, model, goal, rng)
            if behaviour == "die":
                _die_midway(c, update, rnd)
            try:
                res = c.submit(update, rnd, chunk_delay=chunk_delay)
                results.append({"round": rnd, "accepted": True})
            except TransportError as e:
                res = {"round": rnd, "accepted": False, "reason": e.reason, "detail": e.detail}
                results.append(res)
            log(f"{c.id}: round {rnd}: {res}")
            last = rnd
    return results


def _die_midway(c: Client, update: np.ndarray, rnd: int) -> None:
    """Stream half the chunks, then vanish (os._exit: no COMMIT, no goodbye)."""
    from .protocol import Codec, Dtype, Kind, message

    st = c.status()
    blob = update.view(np.uint8)
    step = st["chunk_bytes"]
    for off in range(0, blob.size // 2, step):
        c._send(message(Kind.CHUNK, blob[off:off + step], round=rnd, offset=off, total=blob.size, seq=c._next(),
                        dtype=Dtype.FLOAT32, codec=Codec.RAW, session=st["session"]))
    time.sleep(0.5)  # let the chunks leave
    os._exit(3)
