"""A load generator: one process drives many participant identities against a server.

Each identity has its own DEALER socket, id and HELLO secret, and speaks the protocol of
docs/protocol.md as a single-threaded state machine (no thread per participant), so one process
can stand for hundreds of participants. Updates come from seeds (``seeded_update``): a test
recomputes the exact expected result from (seed, index, round) without holding every update.

    report = Load("tcp://127.0.0.1:5555", n=240, d=25_000_000, seed=7).run()

or ``fedagg load --connect ... --n 240 --d 25000000``. ``concurrency`` bounds the identities
uploading at once (the others wait their turn, holding no update in memory), and a ``busy``
refusal is waited out for its ``retry_after``. Every wait is bounded by ``timeout``.
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from .protocol import Dtype, Kind, ProtocolError, json_message, message, parse, parse_json


def seeded_update(seed: int, index: int, rnd: int, d: int) -> np.ndarray:
    """Participant `index`'s float32 update of round `rnd`: N(0, 1) from the seed (seed, index, rnd)."""
    return np.random.default_rng([seed, index, rnd]).standard_normal(d, dtype=np.float32)


def seeded_mean(seed: int, indices: List[int], rnd: int, d: int) -> np.ndarray:
    """The float64 mean of those participants' updates, one update in memory at a time."""
    acc = np.zeros(d, dtype=np.float64)
    for i in indices:
        acc += seeded_update(seed, i, rnd, d)
    return acc / len(indices)


@dataclass
class LoadReport:
    rounds: Dict[int, List[str]] = field(default_factory=dict)  # round -> ids accepted in it
    refused: Dict[str, int] = field(default_factory=dict)  # reason -> count
    seconds: float = 0.0
    bytes_sent: int = 0


class _Identity:
    def __init__(self, ctx, endpoint: str, index: int, pid: str):
        import zmq

        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.index, self.pid, self.secret = index, pid, os.urandom(16).hex()
        self.seq = time.time_ns()
        self.state = "hello"
        self.round = self.session = self.off = self.inflight = self.resync_seq = 0
        self.chunk, self.credits = 1 << 20, 1
        self.blob: Optional[np.ndarray] = None
        self.done_rounds, self.retry_at = 0, 0.0
        self.queued = False
        self.pending_state: Optional[dict] = None

    def send(self, frames) -> None:
        self.sock.send_multipart(frames, copy=False)

    def next_seq(self) -> int:
        self.seq += 1
        return self.seq


class Load:
    """Drive `n` identities ("{prefix}-{index}") through `rounds` rounds each; see the module doc."""

    def __init__(self, endpoint: str, n: int, d: int, *, seed: int = 0, rounds: int = 1, prefix: str = "load",
                 start: int = 0, timeout: float = 120.0, concurrency: Optional[int] = None,
                 pregenerate: bool = False):
        if n < 1 or d < 1 or rounds < 1 or timeout <= 0:
            raise ValueError("n, d and rounds must be >= 1, timeout positive")
        if concurrency is not None and concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.endpoint, self.n, self.d, self.seed, self.rounds = endpoint, n, d, seed, rounds
        self.prefix, self.start, self.timeout = prefix, start, timeout
        self.concurrency = n if concurrency is None else concurrency
        self.pregenerate = pregenerate  # rounds 0.. rounds-1 made before the first HELLO (n x rounds x d in memory)
        self._made: Dict[tuple, np.ndarray] = {}

    def run(self) -> LoadReport:
        import zmq

        ctx = zmq.Context()
        report = self._report = LoadReport()
        self._sent = 0
        self._active: set = set()  # identities holding an upload slot (concurrency)
        self._queue: "deque[_Identity]" = deque()
        people = [_Identity(ctx, self.endpoint, self.start + k, f"{self.prefix}-{self.start + k}")
                  for k in range(self.n)]
        if self.pregenerate:
            self._made = {(p.index, r): seeded_update(self.seed, p.index, r, self.d).view(np.uint8)
                          for p in people for r in range(self.rounds)}
        by_sock = {p.sock: p for p in people}
        poller = zmq.Poller()
        for p in people:
            poller.register(p.sock, zmq.POLLIN)
            p.send(json_message(Kind.HELLO, {"id": p.pid, "secret": p.secret}, seq=p.next_seq()))
        t0 = time.monotonic()
        last_progress = t0
        try:
            while any(p.done_rounds < self.rounds for p in people):
                if time.monotonic() - last_progress > self.timeout:
                    waiting = sum(p.done_rounds < self.rounds for p in people)
                    raise TimeoutError(f"{waiting} identities made no progress for {self.timeout} s")
                now = time.monotonic()
                for p in people:  # identities told `busy` ask again once their pause is over
                    if p.state == "backoff" and now >= p.retry_at:
                        self._resync(p)
                for sock, _ in poller.poll(100):
                    p = by_sock[sock]
                    for _ in range(64):  # a bounded burst per socket
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        try:
                            head, body = parse(frames, 64 << 20)
                        except ProtocolError:
                            continue
                        if self._step(p, head, body):
                            last_progress = time.monotonic()
            report.seconds, report.bytes_sent = time.monotonic() - t0, self._sent
            return report
        finally:
            for p in people:
                p.sock.close(0)
            ctx.term()

    # ---------------------------------------------------------------- the state machine
    def _begin(self, p: _Identity, st: Optional[dict]) -> None:
        """Start (or, after a STATE, resume from `held`) the upload of round p.round."""
        if st is not None:
            p.chunk, p.credits = st["chunk_bytes"], st["credits"]
            if st.get("accepted"):  # our COMMIT got through before a resynchronisation
                self._finish(p, accepted=True)
                return
        if p not in self._active:
            if len(self._active) >= self.concurrency:  # wait for a slot, holding no update
                p.state, p.pending_state = "queued", st
                if not p.queued:
                    p.queued = True
                    self._queue.append(p)
                return
            self._active.add(p)
        if p.blob is None:
            p.blob = self._made.pop((p.index, p.round), None)
        if p.blob is None:
            p.blob = seeded_update(self.seed, p.index, p.round, self.d).view(np.uint8)
        p.off = min(st.get("held", 0), p.blob.size) if st is not None else 0
        p.state, p.inflight = "upload", 0
        self._pump(p)

    def _pump(self, p: _Identity) -> None:
        total = p.blob.size
        while p.off < total and p.inflight < p.credits:
            part = p.blob[p.off:p.off + p.chunk]
            p.send(message(Kind.CHUNK, part, round=p.round, offset=p.off, total=total, seq=p.next_seq(),
                           dtype=Dtype.FLOAT32, session=p.session))
            self._sent += part.size
            p.off += part.size
            p.inflight += 1
        if p.off >= total and p.inflight == 0 and p.state == "upload":
            p.send(message(Kind.COMMIT, b"", round=p.round, total=total, seq=p.next_seq(), session=p.session))
            p.state = "commit"

    def _finish(self, p: _Identity, accepted: bool) -> None:
        if accepted:
            self._report.rounds.setdefault(p.round, []).append(p.pid)
        p.state, p.blob = "wait", None
        p.done_rounds += 1
        self._release(p)

    def _release(self, p: _Identity) -> None:
        """p's upload slot is free: the next queued identity starts."""
        self._active.discard(p)
        while self._queue and len(self._active) < self.concurrency:
            q = self._queue.popleft()
            q.queued = False
            if q.state == "queued":
                self._begin(q, q.pending_state)

    def _resync(self, p: _Identity, hello: bool = False) -> None:
        p.state = "resync"
        p.resync_seq = p.next_seq()
        p.send(json_message(Kind.HELLO, {"id": p.pid, "secret": p.secret}, seq=p.resync_seq) if hello
               else message(Kind.STATUS, b"", seq=p.resync_seq))

    def _step(self, p: _Identity, head, body) -> bool:
        """Handle one server message; True when it moved this identity forward."""
        if head.kind == Kind.STATE:
            st = parse_json(body)
            p.session = head.session  # from the header: JSON numbers above 2^53 are not safe everywhere
            if st.get("phase") == "finished":
                p.done_rounds, p.state = self.rounds, "wait"
                self._release(p)
                return True
            if st.get("phase", "upload") != "upload":
                raise RuntimeError("the load generator drives federated rounds; this server has a ledger phase")
            if len(st.get("shards") or []) > 1:
                raise RuntimeError("the load generator drives one server; this one is a shard of "
                                   f"{len(st['shards'])} (use fedagg.Client, which streams each range to its shard)")
            if p.state == "wait":
                return False
            if st["round"] != p.round:
                p.round, p.blob = st["round"], None
            self._begin(p, st)
            return True
        if head.kind == Kind.ROUND:
            if head.round <= p.round:
                return False
            if p.state != "wait":  # the round closed before our update was in
                p.done_rounds += 1
            p.round, p.session, p.blob = head.round, head.session, None
            if p.done_rounds < self.rounds:
                self._begin(p, None)
            else:
                p.state = "wait"
                self._release(p)
            return True
        if head.kind == Kind.CREDIT and p.state == "upload":
            p.inflight = max(0, p.inflight - 1)
            self._pump(p)
            return True
        if head.kind == Kind.ACCEPTED and p.state == "commit":
            self._finish(p, accepted=True)
            return True
        if head.kind == Kind.REJECTED and head.seq >= p.resync_seq and p.state in ("hello", "upload", "commit",
                                                                                    "resync"):
            reason = parse_json(body).get("reason", "?")
            self._report.refused[reason] = self._report.refused.get(reason, 0) + 1
            if reason == "busy":  # the server is full: ask again after the pause it asked for (jittered)
                ra = parse_json(body).get("retry_after")
                pause = float(ra) if isinstance(ra, (int, float)) and 0 < ra <= 60 else 0.5
                p.state, p.retry_at = "backoff", time.monotonic() + pause * random.uniform(0.5, 1.5)
            elif reason in ("order", "checksum", "session", "incomplete", "unknown"):
                self._resync(p, hello=reason == "unknown")
            else:  # a final refusal: this identity sits the round out
                self._finish(p, accepted=False)
            return True
        return False
