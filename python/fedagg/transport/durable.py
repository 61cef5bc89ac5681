"""What the server must not lose, on disk, and the thread that makes accepted updates durable.

Layout of ``state_dir``:

    server.json          {"round": r, "d": d}   (rewritten atomically each round)
    model.npy            the global model of round r
    round-<r>/           what round r accepted so far, in one of two forms:
        accepted.json      held updates (robust rules): [{"id", "address", "weight"}, ...] in
                           acceptance order, and u<k>.npy, the k-th update
        fold.json          the mean's fold: {"gen": g, "accepted": [...], "weight_sum", "clipped"}
                           and fold-<g>.npy, the float64 running sum it describes
    metrics.jsonl        one JSON record per finished round

Files are written to a temporary name, fsynced, then renamed; each fold generation has its own
file, named by the JSON once complete (older ones are removed after): a crash leaves the old or
the new state, never a torn one. ACCEPTED is sent only after the update is in such a state
(``GroupCommit``), or in the round's close written after it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
from collections import deque
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

log = logging.getLogger("fedagg.server")


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _atomic_write(path: Path, write, sync_dir: bool = True) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
    except Cancelled:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    if sync_dir:
        _fsync_dir(path.parent)


def _save_npy(fh, arr: np.ndarray, cancelled: Optional[Callable[[], bool]] = None) -> None:
    """np.save's format, written in 16 MiB pieces; `cancelled()` true between two pieces abandons it."""
    if cancelled is None:
        np.save(fh, arr, allow_pickle=False)
        return
    np.lib.format.write_array_header_1_0(fh, np.lib.format.header_data_from_array_1_0(arr))
    raw = memoryview(np.ascontiguousarray(arr)).cast("B")
    for off in range(0, len(raw), 16 << 20):
        if cancelled():
            raise Cancelled()
        fh.write(raw[off:off + (16 << 20)])


class Cancelled(Exception):
    """A snapshot write given up because the round's close will make its updates durable."""


class RoundStore:
    """Persists what the server must not lose; loads it back after a restart."""

    def __init__(self, directory: os.PathLike):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.extra: Dict[str, Any] = {}  # what save_round's `extra` held, once load() ran

    def _rdir(self, rnd: int) -> Path:
        return self.dir / f"round-{rnd}"

    # ---------------------------------------------------------------- round and model
    def save_round(self, rnd: int, model: np.ndarray, extra: Optional[Dict[str, Any]] = None) -> None:
        """The model of round `rnd` (and `extra`, small JSON the server keeps across rounds)."""
        _atomic_write(self.dir / "model.npy", lambda fh: _save_npy(fh, model))
        meta = {"round": rnd, "d": int(model.size), "extra": extra or {}}
        _atomic_write(self.dir / "server.json", lambda fh: fh.write(json.dumps(meta).encode()))
        for old in self.dir.glob("round-*"):
            if old.is_dir() and old.name != f"round-{rnd}":
                shutil.rmtree(old, ignore_errors=True)
        self._rdir(rnd).mkdir(exist_ok=True)

    def load(self) -> Optional[Tuple[int, np.ndarray, Optional[Dict[str, Any]]]]:
        """(round, model, accepted) saved before, or None for a fresh directory.

        accepted: None, {"kind": "held", "entries": [...], "updates": [arrays]} or
        {"kind": "fold", "entries": [...], "acc": float64 array, "weight_sum", "clipped", "gen"}.
        """
        meta_path = self.dir / "server.json"
        if not meta_path.exists():
            return None
        meta = json.loads(meta_path.read_text())
        rnd, d = int(meta["round"]), int(meta["d"])
        self.extra = dict(meta.get("extra") or {})
        self._forget_metrics_from(rnd)
        model = np.load(self.dir / "model.npy", allow_pickle=False)
        if model.dtype != np.float32 or model.ndim != 1 or model.size != d:
            raise ValueError(f"{self.dir}: model.npy does not match server.json")
        rdir = self._rdir(rnd)
        if (rdir / "fold.json").exists():
            fold = json.loads((rdir / "fold.json").read_text())
            acc = np.load(rdir / f"fold-{int(fold['gen'])}.npy", allow_pickle=False)
            if acc.dtype != np.float64 or acc.shape != (d,):
                raise ValueError(f"{rdir}: the fold's sum does not match the model")
            return rnd, model, {"kind": "fold", "entries": fold["accepted"], "acc": acc, "gen": int(fold["gen"]),
                                "weight_sum": float(fold["weight_sum"]), "clipped": int(fold["clipped"])}
        if (rdir / "accepted.json").exists():
            entries = json.loads((rdir / "accepted.json").read_text())
            updates = [np.load(rdir / f"u{k}.npy", allow_pickle=False) for k in range(len(entries))]
            if any(u.dtype != np.float32 or u.shape != (d,) for u in updates):
                raise ValueError(f"{rdir}: an accepted update does not match the model")
            return rnd, model, {"kind": "held", "entries": entries, "updates": updates}
        return rnd, model, None

    # ---------------------------------------------------------------- accepted updates
    def save_held(self, rnd: int, entries: List[Dict[str, Any]], new: List[Tuple[int, np.ndarray]],
                  cancelled: Optional[Callable[[], bool]] = None) -> None:
        """The newly accepted updates (index, host array), then the list of all: one directory sync."""
        rdir = self._rdir(rnd)
        rdir.mkdir(exist_ok=True)
        for k, update in new:
            _atomic_write(rdir / f"u{k}.npy", lambda fh, u=update: _save_npy(fh, u, cancelled), sync_dir=False)
        _atomic_write(rdir / "accepted.json", lambda fh: fh.write(json.dumps(entries).encode()))

    def save_fold(self, rnd: int, gen: int, acc: np.ndarray, meta: Dict[str, Any],
                  cancelled: Optional[Callable[[], bool]] = None) -> None:
        """Generation `gen` of the fold: its sum in a file of its own, then the JSON naming it."""
        rdir = self._rdir(rnd)
        rdir.mkdir(exist_ok=True)
        _atomic_write(rdir / f"fold-{gen}.npy", lambda fh: _save_npy(fh, acc, cancelled), sync_dir=False)
        _atomic_write(rdir / "fold.json", lambda fh: fh.write(json.dumps(dict(meta, gen=gen)).encode()))
        for old in rdir.glob("fold-*.npy"):
            if old.name != f"fold-{gen}.npy":
                old.unlink(missing_ok=True)

    def _forget_metrics_from(self, rnd: int) -> None:
        """Records of round `rnd` and later: written by a server killed before that round's close was."""
        path = self.dir / "metrics.jsonl"
        if not path.exists():
            return
        lines = path.read_text().splitlines()
        keep = [line for line in lines if line.strip() and json.loads(line).get("round", -1) < rnd]
        if len(keep) != len(lines):
            _atomic_write(path, lambda fh: fh.write("".join(line + "\n" for line in keep).encode()))

    def append_metrics(self, record: Any) -> None:
        with open(self.dir / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps(record, default=str) + "\n")


class StorageError(RuntimeError):
    """The state directory could not be written: accepted updates cannot be kept."""


class GroupCommit:
    """Two threads make accepted updates part of the round and durable, in groups.

    The applier runs ``apply(jobs)`` on the jobs submitted since it last ran, in submission order
    (it sets ``job.error`` on those it refuses; an exception refuses the whole group). Whenever the writer is free, the applier takes ``snapshot(jobs)`` of everything
    applied since the last one (a copy of the round's state: the mean's sum, or the new updates)
    and the writer writes it (``write(cancelled)``, one fsync for the whole group) while the
    applier goes on with the next jobs. ``snapshot`` may return None (nothing to write): the jobs
    are done at once. At a round's close ``settle()`` gives up the write in progress and hands
    back every applied job as ``deferred``: the close's own write makes them durable.
    Finished jobs come back through ``completed()``; the event loop polls ``fileno()``. A failing
    snapshot or write is fatal (``StorageError`` from ``completed()``): the jobs it held were
    applied in memory but are not durable, so none of them may be acknowledged, and the server
    must stop.
    """

    def __init__(self, apply: Callable[[List[Any]], None], snapshot: Callable[[List[Any]], Optional[Callable[..., None]]]):
        self._apply, self._snapshot = apply, snapshot
        self._jobs: "deque[Any]" = deque()
        self._done: "deque[Any]" = deque()
        self._unsaved: List[Any] = []  # applied, in no snapshot yet
        self._to_write: Optional[Tuple[Callable[..., None], List[Any]]] = None
        self._cancel = False  # settle(): the write in progress is given up, no new snapshot is taken
        self._cv = threading.Condition()
        self._pending = 0  # submitted and not yet handed back by completed()
        self._applying = self._writing = False
        self._failed: Optional[BaseException] = None
        self._stop = False
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._threads = [threading.Thread(target=self._applier, name="fedagg-apply", daemon=True),
                         threading.Thread(target=self._writer, name="fedagg-write", daemon=True)]
        for t in self._threads:
            t.start()

    def fileno(self) -> int:
        return self._r

    @property
    def pending(self) -> int:
        return self._pending

    def submit(self, jobs: List[Any]) -> None:
        """Hand jobs (in order) to the applier: one lock and one wake-up for a burst of COMMITs."""
        with self._cv:
            if self._failed is not None:
                raise StorageError(str(self._failed))
            self._jobs.extend(jobs)
            self._pending += len(jobs)
            self._cv.notify_all()

    def completed(self) -> List[Any]:
        """Jobs finished since the last call (job.error set on those that failed)."""
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._cv:
            if self._failed is not None:
                raise StorageError(str(self._failed))
            out = list(self._done)
            self._done.clear()
            self._pending -= len(out)
        return out

    def _idle(self) -> bool:
        return not (self._jobs or self._applying or self._unsaved or self._writing)

    def settle(self, timeout: float = 600.0) -> List[Any]:
        """For the round's close: every submitted job applied, the write in progress given up, and
        every job not yet durable handed back with ``deferred = True`` (with the finished ones)."""
        with self._cv:
            self._cancel = True  # from now on no snapshot is started, and the one being written stops
            try:
                if not self._cv.wait_for(lambda: (not self._jobs and not self._applying) or self._failed is not None,
                                         timeout):
                    raise StorageError(f"accepted updates were not applied within {timeout} s")
                if not self._cv.wait_for(lambda: not self._writing or self._failed is not None, timeout):
                    raise StorageError(f"the round state was not written within {timeout} s")
                for job in self._unsaved:
                    job.deferred = True
                self._done.extend(self._unsaved)
                self._unsaved = []
            finally:
                self._cancel = False
        return self.completed()

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join(timeout=60)
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _fail(self, e: BaseException) -> None:
        log.critical("writing the round state failed: %s", e, extra={"event": "storage_error"})
        with self._cv:
            self._failed = e
            self._cv.notify_all()
        self._wake()

    def _applier(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._jobs or self._stop or self._failed is not None
                                  or (self._unsaved and not self._writing and not self._cancel))
                if self._failed is not None or (self._stop and not self._jobs):
                    return
                group = list(self._jobs)
                self._jobs.clear()
                self._applying = True
            try:
                self._apply(group)
            except Exception as e:  # noqa: BLE001 - a bug: this group is refused, the server goes on
                log.exception("applying %d updates failed", len(group), extra={"event": "internal_error"})
                for job in group:
                    if getattr(job, "error", None) is None:
                        job.error = ("internal", f"{type(e).__name__}: {e}"[:300])
            applied = [job for job in group if getattr(job, "error", None) is None]
            failed = [job for job in group if getattr(job, "error", None) is not None]
            with self._cv:
                self._unsaved += applied
                self._done.extend(failed)
                if self._writing or not self._unsaved or self._cancel:
                    self._applying = False
                    self._cv.notify_all()
                    group = []
                else:  # the writer is free: a snapshot of everything applied so far
                    group, self._unsaved, self._writing = self._unsaved, [], True
            if failed:
                self._wake()
            if not group:
                continue
            try:
                write = self._snapshot(group)
            except BaseException as e:  # noqa: BLE001 - not durable: fatal
                self._fail(e)
                return
            with self._cv:
                self._applying = False
                if write is None:  # nothing to write: done now
                    self._done.extend(group)
                    self._writing = False
                else:
                    self._to_write = (write, group)
                self._cv.notify_all()
            if write is None:
                self._wake()

    def _writer(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._to_write is not None or self._stop or self._failed is not None)
                if self._to_write is None:
                    return
                write, group = self._to_write
                self._to_write = None
            try:
                write(lambda: self._cancel)
            except Cancelled:  # the round's close makes these durable (settle)
                for job in group:
                    job.deferred = True
            except BaseException as e:  # noqa: BLE001 - not durable: nothing of the group may be acknowledged
                self._fail(e)
                return
            with self._cv:
                self._done.extend(group)
                self._writing = False
                self._cv.notify_all()
            self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._w, b"x")
        except (BlockingIOError, OSError):  # the pipe is full: the loop has a wake-up pending already
            pass
