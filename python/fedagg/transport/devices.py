"""Simulated cross-device participants: thousands of phones in a few processes.

Each device is a DEALER connection of its own (the server sees `n` connected participants) driven
by one event loop per process (epoll over the sockets' ZMQ_FDs: the loop's cost follows the
sockets that are ready, not the number connected). A device's life, in sessions:

    idle (exponential, mean `idle` s) -> STATUS -> GET_MODEL of that version (if fetch_model)
    -> train (log-normal, median `train` s) -> CHUNKs -> COMMIT -> ACCEPTED -> idle ...

A device told `busy` waits the server's retry_after (jittered), then asks STATUS again before it
resends: an update grown too stale meanwhile is dropped (as fedagg's Client does), and while
STATE says `busy` it waits again without sending a byte. A share `drop`
of uploads stop after their first chunk and never COMMIT (the server gives them up
after its upload_timeout); a share `byzantine` of the devices send -10 x their update. Updates
come from a pool of `pool` seeded vectors (``pool_update``), so a check can recompute every
accepted update from what the report lists. Works against buffered servers (an update names
the version it was computed on) and synchronous ones (an update computed on a closed round is
refused ``late``: a straggler's work is lost).

    report = Devices("tcp://127.0.0.1:5555", n=2000, d=100_000, seconds=60).run()

or ``fedagg devices --connect ... --n 2000 --d 100000 --seconds 60 --processes 2``. Every wait
is bounded by ``seconds`` plus ``grace``.
"""

from __future__ import annotations

import heapq
import math
import multiprocessing as mp
import os
import random
import select
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from .. import _core
from .protocol import Dtype, Kind, ProtocolError, json_message, message, parse, parse_json

_NOBLOCK, _MORE = 1, 3  # zmq.NOBLOCK, zmq.NOBLOCK | zmq.SNDMORE (as the server's)


def pool_update(seed: int, k: int, d: int) -> np.ndarray:
    """Pool vector k: N(0, 0.01^2) float32 from the seed (seed, k)."""
    return (np.random.default_rng([seed, k]).standard_normal(d, dtype=np.float32) * np.float32(0.01))


@dataclass
class DevicesReport:
    # ACCEPTED bodies + "pool", "byzantine", "latency" (s from COMMIT), "t" (s since the run started)
    accepted: List[Dict[str, Any]] = field(default_factory=list)
    refused: Dict[str, int] = field(default_factory=dict)  # reason -> count
    dropped: int = 0  # uploads abandoned mid-way on purpose
    sessions: int = 0  # sessions started (STATUS sent)
    seconds: float = 0.0
    connected: int = 0  # devices whose HELLO was answered

    def merge(self, other: "DevicesReport") -> None:
        self.accepted += other.accepted
        for k, v in other.refused.items():
            self.refused[k] = self.refused.get(k, 0) + v
        self.dropped += other.dropped
        self.sessions += other.sessions
        self.seconds = max(self.seconds, other.seconds)
        self.connected += other.connected

    def latencies(self) -> np.ndarray:
        """Seconds from COMMIT sent to ACCEPTED received, per accepted update."""
        return np.array([a["latency"] for a in self.accepted], dtype=np.float64)

    def as_dict(self) -> Dict[str, Any]:
        lat = self.latencies()
        pct = {f"p{q}_ms": (float(np.percentile(lat, q)) * 1e3 if lat.size else None) for q in (50, 99)}
        return {"accepted": len(self.accepted), "refused": dict(self.refused), "dropped": self.dropped,
                "sessions": self.sessions, "seconds": self.seconds, "connected": self.connected,
                "accepted_per_second": len(self.accepted) / self.seconds if self.seconds else 0.0, **pct}


class _Device:
    __slots__ = ("sock", "fd", "index", "pid", "secret", "seq", "state", "wake", "version", "session", "chunk",
                 "credits", "model_bytes", "off", "got", "inflight", "blob", "pool", "byzantine", "drop", "t_commit",
                 "await_seq", "k")

    def __init__(self, index: int, pid: str, byzantine: bool):
        self.sock: Any = None  # connected when its turn in the arrival ramp comes
        self.fd = -1
        self.index, self.pid, self.secret = index, pid, os.urandom(8).hex()
        self.seq = time.time_ns()
        self.state, self.wake = "new", 0.0
        self.version = self.session = self.off = self.got = self.inflight = self.await_seq = self.k = 0
        self.chunk, self.credits, self.model_bytes = 1 << 20, 1, 0
        self.blob: Optional[np.ndarray] = None
        self.pool, self.byzantine, self.drop, self.t_commit = 0, byzantine, False, 0.0

    def connect(self, ctx, endpoint: str) -> None:
        import zmq

        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDBUF, 1 << 20)  # small kernel buffers: thousands of connections
        self.sock.setsockopt(zmq.RCVBUF, 1 << 20)
        self.sock.connect(endpoint)
        self.fd = self.sock.getsockopt(zmq.FD)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


class Devices:
    """`n` simulated devices ("{prefix}-{index}") against one server for `seconds`; see the module doc."""

    def __init__(self, endpoint: str, n: int, d: int, *, seconds: float = 60.0, seed: int = 0, idle: float = 1.0,
                 train: float = 0.5, train_sigma: float = 0.5, drop: float = 0.1, byzantine: float = 0.01,
                 fetch_model: bool = True, pool: int = 64, prefix: str = "dev", start: int = 0, grace: float = 30.0,
                 processes: int = 1, arrivals: float = 1000.0):
        if n < 1 or d < 1 or pool < 1 or processes < 1:
            raise ValueError("n, d, pool and processes must be >= 1")
        for name, v in (("seconds", seconds), ("idle", idle), ("train", train), ("grace", grace),
                        ("arrivals", arrivals)):
            if not (isinstance(v, (int, float)) and 0 < v < math.inf):
                raise ValueError(f"{name} must be a positive number of seconds, got {v!r}")
        if not (0 <= train_sigma < math.inf and 0 <= drop < 1 and 0 <= byzantine < 1):
            raise ValueError("train_sigma must be >= 0, drop and byzantine shares in [0, 1)")
        self.endpoint, self.n, self.d, self.seconds, self.seed = endpoint, n, d, float(seconds), seed
        self.idle, self.train, self.train_sigma = float(idle), float(train), float(train_sigma)
        self.drop, self.byzantine, self.fetch_model, self.pool = drop, byzantine, fetch_model, pool
        self.prefix, self.start, self.grace, self.processes = prefix, start, float(grace), processes
        self.arrivals = float(arrivals)  # devices connecting per second, all processes together (a ramp)

    def is_byzantine(self, index: int) -> bool:
        """Whether device `index` attacks (fixed by the seed: the same in every process)."""
        return random.Random(f"{self.seed}-byz-{index}").random() < self.byzantine

    def run(self) -> DevicesReport:
        if self.processes == 1:
            return self._run(self.start, self.n)
        per = -(-self.n // self.processes)
        parts = [(self.start + k * per, min(per, self.n - k * per)) for k in range(self.processes) if k * per < self.n]
        ctx = mp.get_context("fork")
        with ctx.Pool(len(parts)) as workers:
            reports = workers.starmap(self._run, parts)
        out = DevicesReport()
        for r in reports:
            out.merge(r)
        return out

    # ---------------------------------------------------------------- one process's loop
    def _run(self, first: int, count: int) -> DevicesReport:
        import zmq

        rng = random.Random(f"{self.seed}-{first}")
        self._rng = rng
        self._report = report = DevicesReport()
        self._pool = [pool_update(self.seed, k, self.d).view(np.uint8) for k in range(self.pool)]
        self._crcs: Dict[tuple, int] = {}
        self._attacks = [(pool_update(self.seed, k, self.d) * np.float32(-10)).view(np.uint8) for k in range(self.pool)]
        ctx = zmq.Context()
        ctx.set(zmq.MAX_SOCKETS, count + 64)
        devices = [_Device(i, f"{self.prefix}-{i}", self.is_byzantine(i)) for i in range(first, first + count)]
        by_fd: Dict[int, _Device] = {}
        timers: List[Tuple[float, int]] = []  # (when, device index): arrivals, idle and training ends, HELLOs
        self._timers = timers
        ep = select.epoll(sizehint=count)
        t0 = self._t0 = time.monotonic()
        end, hard_end = t0 + self.seconds, t0 + self.seconds + self.grace
        per_second = self.arrivals * count / self.n  # this process's share of the arrival ramp
        for k, dev in enumerate(devices):  # thousands connecting in one burst overflow the listen backlog
            self._later(dev, k / per_second)
        touched: set = set()
        sweep_at = t0 + 1.0
        try:
            while True:
                now = time.monotonic()
                if now >= hard_end:
                    break
                if now >= end and all(dev.state in ("new", "idle", "hello", "done") for dev in devices):
                    break
                while timers and timers[0][0] <= now:
                    when, i = heapq.heappop(timers)
                    dev = devices[i - first]
                    if when != dev.wake:  # overtaken by a later timer of the device
                        continue
                    if dev.state == "new":
                        dev.connect(ctx, self.endpoint)
                        by_fd[dev.fd] = dev
                        ep.register(dev.fd, select.EPOLLIN | select.EPOLLET)
                        dev.state = "hello"
                    self._timer(dev, now, end)
                    touched.add(dev)
                if now >= sweep_at:  # ZMQ_FD is edge-triggered: once a second, look at every socket
                    touched.update(by_fd.values())
                    sweep_at = now + 1.0
                for dev in list(touched):
                    self._drain(dev, end)
                touched.clear()
                wait = max(0.0, min(0.05, (timers[0][0] - time.monotonic()) if timers else 0.05))
                for fd, _ in ep.poll(wait):
                    touched.add(by_fd[fd])
            report.seconds = time.monotonic() - t0
            return report
        finally:
            ep.close()
            for dev in devices:
                if dev.sock is not None:
                    dev.sock.close(0)
            ctx.term()

    def _hello(self, dev: _Device) -> None:
        """HELLO, asked again every 10 s until answered (a connection made late, a reply lost)."""
        dev.sock.send_multipart(json_message(Kind.HELLO, {"id": dev.pid, "secret": dev.secret},
                                             seq=dev.next_seq()), copy=False)
        self._later(dev, 10.0)

    def _later(self, dev: _Device, seconds: float) -> None:
        dev.wake = time.monotonic() + seconds
        heapq.heappush(self._timers, (dev.wake, dev.index))

    def _drain(self, dev: _Device, end: float) -> None:
        import zmq

        recv = dev.sock.recv
        for _ in range(256):  # bounded per socket and turn
            try:
                frame = recv(_NOBLOCK, copy=False)
            except zmq.Again:
                return
            frames = [frame]
            while frame.more and len(frames) < 8:  # a message arrives whole; more than 8 frames is not ours
                frame = recv(0, copy=False)
                frames.append(frame)
            try:
                head, body = parse(frames, 64 << 20)
            except ProtocolError:
                continue
            self._step(dev, head, body, end)

    def _send(self, dev: _Device, frames) -> None:
        import zmq

        try:  # frame by frame with int flags (send_multipart's flag enums cost more than the send)
            dev.sock.send(frames[0], _MORE)
            dev.sock.send(frames[1], _NOBLOCK, copy=len(frames[1]) < 65536)
        except zmq.Again:  # the connection's queue is full: this session is over
            self._count("send_queue_full")
            self._idle(dev)

    def _count(self, reason: str) -> None:
        self._report.refused[reason] = self._report.refused.get(reason, 0) + 1

    def _idle(self, dev: _Device) -> None:
        dev.state, dev.blob = "idle", None
        self._later(dev, self._rng.expovariate(1.0 / self.idle))

    def _timer(self, dev: _Device, now: float, end: float) -> None:
        if dev.state == "hello":  # just connected, or its HELLO is unanswered: (again) HELLO
            if now < end:
                self._hello(dev)
        elif dev.state == "idle":
            if now >= end:
                dev.state = "done"
                return
            self._report.sessions += 1
            dev.state, dev.await_seq = "status", dev.next_seq()
            self._send(dev, message(Kind.STATUS, b"", seq=dev.await_seq))
        elif dev.state == "train":  # trained: upload at once (a STATUS first would cost every session a round trip)
            self._upload(dev)
        elif dev.state == "backoff":  # told busy at COMMIT: the bytes are held, COMMIT again
            self._commit(dev)
        elif dev.state == "reupload":  # told busy: nothing is held; ask where the server is
            self._recheck(dev)

    def _recheck(self, dev: _Device) -> None:
        """After a busy: STATUS before the first chunk again. An update grown too stale is dropped (as
        fedagg's Client does), and a server whose STATE still says busy is left alone for its retry_after."""
        dev.state, dev.await_seq = "recheck", dev.next_seq()
        self._send(dev, message(Kind.STATUS, b"", seq=dev.await_seq))

    def _trained(self, dev: _Device) -> None:
        dev.state = "train"
        self._later(dev, self.train * math.exp(self.train_sigma * self._rng.gauss(0.0, 1.0)))

    def _upload(self, dev: _Device) -> None:
        dev.k += 1
        dev.pool = (dev.index * 7 + dev.k) % self.pool
        dev.blob = (self._attacks if dev.byzantine else self._pool)[dev.pool]
        dev.drop = self._rng.random() < self.drop
        dev.state, dev.off, dev.inflight = "upload", 0, 0
        self._pump(dev)

    def _pump(self, dev: _Device) -> None:
        total = dev.blob.size
        while dev.off < total and dev.inflight < dev.credits:
            part = dev.blob[dev.off:dev.off + dev.chunk]
            key = (dev.byzantine, dev.pool, dev.off, dev.chunk)  # the pool's chunks: each checksummed once
            crc = self._crcs.get(key)
            if crc is None:
                crc = self._crcs[key] = _core.crc32c(part)
            self._send(dev, message(Kind.CHUNK, part, checksum=crc, round=dev.version, offset=dev.off, total=total,
                                    seq=dev.next_seq(), dtype=Dtype.FLOAT32, session=dev.session))
            if dev.state != "upload":
                return
            dev.off += part.size
            dev.inflight += 1
            if dev.drop:  # gone mid-upload: the server holds a part it will give up
                self._report.dropped += 1
                self._idle(dev)
                return
        if dev.off >= total and dev.inflight == 0:
            dev.t_commit = time.monotonic()  # latency counts from the first COMMIT, busy waits included
            self._commit(dev)

    def _commit(self, dev: _Device) -> None:
        dev.state, dev.await_seq = "commit", dev.next_seq()
        self._send(dev, message(Kind.COMMIT, b"", round=dev.version, total=dev.blob.size, seq=dev.await_seq,
                                session=dev.session))

    def _step(self, dev: _Device, head, body, end: float) -> None:
        kind = head.kind
        if kind == Kind.STATE and dev.state == "recheck":
            st = parse_json(body)
            busy = st.get("busy")
            if st.get("mode") == "buffered" and st["round"] - dev.version > st.get("max_staleness", 0):
                self._count("stale_before_upload")  # its update is too old now: this session is over
                self._idle(dev)
            elif busy and isinstance(busy, (int, float)) and 0 < busy <= 60:
                self._count("busy_before_upload")
                dev.state = "reupload"
                self._later(dev, busy * self._rng.uniform(0.5, 1.5))
            else:
                dev.state, dev.off, dev.inflight = "upload", 0, 0
                self._pump(dev)
        elif kind == Kind.STATE:
            st = parse_json(body)
            if dev.state == "hello":
                self._report.connected += 1
                dev.chunk, dev.credits, dev.model_bytes = st["chunk_bytes"], st["credits"], st["model_bytes"]
                self._idle(dev)
                return
            if dev.state != "status" or st.get("phase") not in ("upload",):
                if st.get("phase") == "finished":
                    dev.state = "done"
                elif dev.state == "status":
                    self._idle(dev)
                return
            dev.version, dev.session = st["round"], head.session
            if self.fetch_model:
                dev.state, dev.got = "model", 0
                self._send(dev, message(Kind.GET_MODEL, b"", round=dev.version, offset=0, aux=dev.credits,
                                        seq=dev.next_seq()))
            else:
                self._trained(dev)
        elif kind == Kind.MODEL and dev.state == "model" and head.round == dev.version:
            dev.got += head.length
            if dev.got >= dev.model_bytes:
                self._trained(dev)
            elif dev.got % (dev.credits * dev.chunk) == 0:
                self._send(dev, message(Kind.GET_MODEL, b"", round=dev.version, offset=dev.got, aux=dev.credits,
                                        seq=dev.next_seq()))
        elif kind == Kind.CREDIT and dev.state == "upload":
            dev.inflight = max(0, dev.inflight - 1)
            self._pump(dev)
        elif kind == Kind.ACCEPTED and dev.state == "commit":
            got = parse_json(body)
            now = time.monotonic()
            got.update(pool=dev.pool, byzantine=dev.byzantine, latency=now - dev.t_commit, t=now - self._t0)
            self._report.accepted.append(got)
            self._idle(dev)
        elif kind == Kind.REJECTED and dev.state in ("status", "model", "upload", "commit", "recheck"):
            r = parse_json(body)
            reason = r.get("reason", "?")
            if head.seq and head.seq < dev.await_seq:
                return  # about an earlier message
            self._count(reason)
            if reason == "unknown":  # the server dropped our entry (or restarted): HELLO, then carry on
                dev.state, dev.await_seq = "status", dev.next_seq()
                self._send(dev, json_message(Kind.HELLO, {"id": dev.pid, "secret": dev.secret}, seq=dev.await_seq))
            elif reason == "busy" and dev.state in ("commit", "upload"):  # wait as asked, then again
                ra = r.get("retry_after")
                pause = float(ra) if isinstance(ra, (int, float)) and 0 < ra <= 60 else 0.5
                dev.state = "backoff" if dev.state == "commit" else "reupload"
                self._later(dev, pause * self._rng.uniform(0.5, 1.5))
            else:  # the session is over (stale, late, round, busy before the upload, ...)
                self._idle(dev)
