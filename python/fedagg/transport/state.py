"""The server's on-disk state: the round, the model and every accepted update.

Layout of ``state_dir``:

    server.json          {"round": r, "d": d, "session": s}   (rewritten atomically each round)
    model.npy            the global model of round r
    round-<r>/           the accepted updates of round r: u<k>.npy and accepted.json
                         (the participant ids in acceptance order), written before ACCEPTED
                         is sent, so an acknowledged update survives a crash
    metrics.jsonl        one JSON record per finished round

Files are written to a temporary name, fsynced, then renamed: a crash leaves
either the old or the new file, never a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, List, Optional, Tuple

import numpy as np


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class RoundStore:
    """Persists what the server must not lose; loads it back after a restart."""

    def __init__(self, directory: os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------- round and model
    def save_round(self, rnd: int, model: np.ndarray) -> None:
        _atomic_write(self.dir / "model.npy", lambda fh: np.save(fh, model, allow_pickle=False))
        meta = {"round": rnd, "d": int(model.size)}
        _atomic_write(self.dir / "server.json", lambda fh: fh.write(json.dumps(meta).encode()))
        for old in self.dir.glob("round-*"):
            if old.is_dir() and old.name != f"round-{rnd}":
                shutil.rmtree(old, ignore_errors=True)
        (self.dir / f"round-{rnd}").mkdir(exist_ok=True)

    def load(self) -> Optional[Tuple[int, np.ndarray, List[Tuple[str, np.ndarray]]]]:
        """(round, model, [(id, update), ...]) saved before, or None for a fresh directory."""
        meta_path = self.dir / "server.json"
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        rnd = int(meta["round"])
        model = np.load(self.dir / "model.npy", allow_pickle=False)
        if model.dtype != np.float32 or model.ndim != 1 or model.size != int(meta["d"]):
            raise ValueError(f"{self.dir}: model.npy does not match server.json")
        accepted: List[Tuple[str, np.ndarray]] = []
        rdir = self.dir / f"round-{rnd}"
        ids_path = rdir / "accepted.json"
        if ids_path.exists():
            for k, pid in enumerate(json.loads(ids_path.read_text())):
                accepted.append((pid, np.load(rdir / f"u{k}.npy", allow_pickle=False)))
        return rnd, model, accepted

    # ---------------------------------------------------------------- accepted updates
    def save_update(self, rnd: int, ids: List[str], update: np.ndarray) -> None:
        """Persist the newest accepted update (ids: all accepted this round, it last)."""
        rdir = self.dir / f"round-{rnd}"
        rdir.mkdir(exist_ok=True)
        _atomic_write(rdir / f"u{len(ids) - 1}.npy", lambda fh: np.save(fh, update, allow_pickle=False))
        _atomic_write(rdir / "accepted.json", lambda fh: fh.write(json.dumps(ids).encode()))

    def append_metrics(self, record: Any) -> None:
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")
