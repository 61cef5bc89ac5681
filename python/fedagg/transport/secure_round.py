"""One secure round of the server (docs/protocol.md, "Secure rounds"; docs/secure.md).

Phases, each announced in STATE's ``phase``:

- ``join``: participants with an update ready send SECAGG JOIN. The phase ends at the quorum, or at
  the round's deadline with at least min_updates joined (else the round closes without a model).
  The joined are split into buckets by a seed drawn now (secure.buckets); each bucket is one
  SecAgg+ group (secure.protocol.Server) of its own, and each JOIN is answered with its group.
- ``advertise``, ``share``: each member's key advertisement, then its encrypted shares, answered
  (once everyone answered or after phase_seconds) with its bucket's roster, then its inbox.
- ``upload``: each member streams its masked input (CHUNK of dtype uint32, then COMMIT); it is
  added to its bucket's sum at once, and the upload's buffer is free: the server holds one ring
  vector per bucket, whatever n is.
- ``unmask``: the members' SECAGG UNMASK are answered with their bucket's unmask request, their
  responses collected; each bucket that can be unmasked becomes its survivors' mean.

A participant's requests wait ("parked") until their step's phase opens; a request sent again
(its answer was lost) is answered again. A bucket refused at any phase (too few left, a secret
that cannot be rebuilt) is left out, and its members are told why; the round goes on with the
others while the rule can run on them. Nothing of a secure round is written to disk: a restarted
server starts the round over (participants make new keys and masks).
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ..secure import PRG, RoundRefused, buckets, wire
from ..secure import Server as GroupServer
from ..secure.ddg import Encoding
from ..secure.protocol import Params, UnmaskResponse
from .protocol import Kind, ProtocolError, json_message, message

log = logging.getLogger("fedagg.server")

PHASES = ("join", "advertise", "share", "upload", "unmask")


class Step(enum.IntEnum):
    """SECAGG's aux: what the participant sends (and the reply it waits for)."""

    JOIN = 1  # empty; answered with the group (JSON) once the join phase closes
    ADVERTISE = 2  # wire.advertisement; answered with the bucket's roster (wire.roster)
    SHARES = 3  # wire.ciphertexts; answered with this participant's inbox (wire.ciphertexts)
    UNMASK = 4  # empty, after the masked input was accepted; answered with the unmask request
    RESPONSE = 5  # wire.unmask_response; answered at once (empty reply)


# the phase in which each step is taken, and the one that answers it
_TAKEN = {Step.JOIN: "join", Step.ADVERTISE: "advertise", Step.SHARES: "share", Step.UNMASK: "upload",
          Step.RESPONSE: "unmask"}
_ANSWERED = {Step.JOIN: "advertise", Step.ADVERTISE: "share", Step.SHARES: "upload", Step.UNMASK: "unmask"}


@dataclass
class Bucket:
    """One SecAgg+ group of the round."""

    number: int
    ids: List[str]
    params: Params
    encoding: Encoding
    graph_seed: bytes
    round_id: bytes
    server: GroupServer
    ads: Dict[int, Any] = field(default_factory=dict)
    shares: Dict[int, list] = field(default_factory=dict)
    responses: Dict[int, UnmaskResponse] = field(default_factory=dict)
    roster: Optional[bytes] = None
    inbox: Dict[int, bytes] = field(default_factory=dict)
    request: Optional[bytes] = None
    refused: Optional[str] = None  # why the bucket is out of the round

    def group_json(self, index: int) -> Dict[str, Any]:
        p, e = self.params, self.encoding
        return {"bucket": self.number, "index": index, "n": p.n, "k": p.k, "t": p.t, "bits": p.bits,
                "d": p.d, "min_survivors": p.min_survivors, "round_id": self.round_id.hex(),
                "graph_seed": self.graph_seed.hex(), "neighbours": sorted(self.server.graph[index]),
                "encoding": {"clip": e.clip, "sigma": e.sigma, "gamma": e.gamma, "n": e.n, "d": e.d, "bits": e.bits,
                             "beta": e.beta, "seed": e.seed}}


@dataclass
class Outcome:
    """How the secure round ended: bucket means for the rule, or why there are none."""

    means: Optional[np.ndarray] = None  # B x d float32
    counts: List[int] = field(default_factory=list)  # survivors per bucket
    members: List[List[str]] = field(default_factory=list)  # each kept bucket's survivors
    failed: Optional[str] = None
    privacy: Optional[Dict[str, Any]] = None
    left_out: Dict[str, str] = field(default_factory=dict)  # participant -> why its update is not in
    timeline: Dict[str, float] = field(default_factory=dict)  # phase -> seconds from the round's start to its end


class SecureRound:
    """The secure state of one round. `send(rid, frames)` and `reject(rid, reason, detail, pid, seq)`
    are the server's; `min_buckets` the fewest bucket means the rule runs on."""

    def __init__(self, cfg, *, d: int, round: int, session: int, quorum: int, min_updates: int, deadline: float,
                 min_buckets: int, started: float, send: Callable, reject: Callable):
        self.cfg, self.d, self.round, self.session = cfg, d, round, session
        self.quorum, self.min_updates, self.deadline, self.min_buckets = quorum, min_updates, deadline, min_buckets
        self.send, self.reject = send, reject
        self.phase = "join"
        self.started = self.phase_started = started
        self.joined: Dict[str, None] = {}
        self.parked: Dict[str, Tuple[Step, bytes, int]] = {}  # pid -> (step, routing id, seq)
        self.buckets: List[Bucket] = []
        self.member: Dict[str, Tuple[Bucket, int]] = {}
        self.ring_bytes = 4 * Encoding(clip=1.0, sigma=0.0, gamma=1.0, n=1, d=d).padded
        self.left_out: Dict[str, str] = {}
        self.timeline: Dict[str, float] = {}  # seconds from the round's start to each phase's end

    # ------------------------------------------------------------------ public facts
    def public(self) -> Dict[str, Any]:
        """STATE's "secure": what a participant needs before it joins."""
        c = self.cfg
        return {"bucket_size": c.bucket_size, "clip": c.clip, "sigma": c.sigma, "bits": c.bits,
                "phase_seconds": c.phase_seconds, "deadline": self.deadline, "ring_bytes": self.ring_bytes,
                "prg": PRG}

    # ------------------------------------------------------------------ messages
    def on_message(self, rid: bytes, pid: str, head, body) -> None:
        try:
            step = Step(head.aux)
        except ValueError:
            self.reject(rid, "malformed", f"SECAGG step {head.aux} is not one of {[int(s) for s in Step]}", pid,
                        head.seq)
            return
        if head.round != self.round or head.session != self.session:
            why = "session" if head.round == self.round else ("late" if head.round < self.round else "future")
            self.reject(rid, why, f"round {head.round} of session {head.session}: the server is in round "
                        f"{self.round} of session {self.session}", pid, head.seq)
            return
        if self.phase not in PHASES:  # closed without a model: the next round (if any) takes over
            self.reject(rid, "phase", "this secure round is over", pid, head.seq)
            return
        if step == Step.JOIN:
            self._join(rid, pid, head)
            return
        at = self.member.get(pid)
        if at is None:
            self.reject(rid, "secure", "not in this round's secure groups (join in the join phase)", pid, head.seq)
            return
        bucket, index = at
        if bucket.refused is not None:
            self.reject(rid, "secure", f"bucket {bucket.number} is out of the round: {bucket.refused}", pid, head.seq)
            return
        why = self.left_out.get(pid)
        if why is not None:
            self.reject(rid, "dropped", why, pid, head.seq)
            return
        taken = PHASES.index(_TAKEN[step])
        now = PHASES.index(self.phase)
        if now < taken:
            self.reject(rid, "phase", f"{step.name} is taken in the {_TAKEN[step]} phase; the round is in its "
                        f"{self.phase} phase", pid, head.seq)
            return
        try:
            if now == taken:
                ok = self._take(bucket, index, pid, step, bytes(body))
                if not ok:
                    return
            elif not self._has(bucket, index, step):
                self.reject(rid, "phase", f"the {_TAKEN[step]} phase is over: too late for {step.name}", pid,
                            head.seq)
                return
        except (ValueError, ProtocolError) as e:
            self.reject(rid, "malformed", f"SECAGG {step.name}: {e}", pid, head.seq)
            return
        if step == Step.RESPONSE:
            self.send(rid, self._reply(step, b""))
        elif now >= PHASES.index(_ANSWERED[step]):  # sent again after its answer was lost
            self._answer(rid, pid, step, bucket, index, head.seq)
        else:
            self.parked[pid] = (step, rid, head.seq)

    def _join(self, rid: bytes, pid: str, head) -> None:
        if self.phase != "join":
            if pid in self.member:  # its group's answer was lost: again
                self._answer(rid, pid, Step.JOIN, *self.member[pid], seq=head.seq)
            else:
                self.reject(rid, "phase", "the join phase of this round is over: join the next round", pid, head.seq)
            return
        self.joined[pid] = None
        self.parked[pid] = (Step.JOIN, rid, head.seq)

    def _take(self, b: Bucket, i: int, pid: str, step: Step, body: bytes) -> bool:
        """Keep what a participant sent in its step's phase (False: refused, and told)."""
        p = b.params
        if step == Step.ADVERTISE:
            ad = wire.parse_advertisement(body, p)
            if ad.index != i:
                raise ValueError(f"the advertisement names index {ad.index}; this participant is {i}")
            if b.ads.setdefault(i, ad) != ad:
                raise ValueError("advertised again with other keys")
        elif step == Step.SHARES:
            if i not in (b.server.roster or {}):
                raise ValueError("not in the bucket's roster")
            cts = wire.parse_ciphertexts(body, p)
            if b.shares.setdefault(i, cts) != cts:
                raise ValueError("sent other share ciphertexts before")
        elif step == Step.UNMASK:
            if i not in b.server.u3:
                raise ValueError("its masked input is not in the bucket's sum")
        elif step == Step.RESPONSE:
            r = wire.parse_unmask_response(body, p)
            if r.index != i:
                raise ValueError(f"the response names index {r.index}; this participant is {i}")
            b.responses.setdefault(i, r)
        return True

    def _has(self, b: Bucket, i: int, step: Step) -> bool:
        return {Step.ADVERTISE: i in b.ads, Step.SHARES: i in b.shares, Step.UNMASK: i in b.server.u3,
                Step.RESPONSE: i in b.responses}[step]

    def _reply(self, step: Step, payload: bytes, json_obj=None) -> List[Any]:
        if json_obj is not None:
            return json_message(Kind.SECAGG_REPLY, json_obj, aux=int(step), round=self.round, session=self.session)
        return message(Kind.SECAGG_REPLY, payload, aux=int(step), round=self.round, session=self.session)

    def _answer(self, rid: bytes, pid: str, step: Step, b: Bucket, i: int, seq: int = 0) -> None:
        if b.refused is not None:
            self.reject(rid, "secure", f"bucket {b.number} is out of the round: {b.refused}", pid, seq)
        elif pid in self.left_out:
            self.reject(rid, "dropped", self.left_out[pid], pid, seq)
        elif step == Step.JOIN:
            self.send(rid, self._reply(step, b"", b.group_json(i)))
        elif step == Step.ADVERTISE:
            self.send(rid, self._reply(step, b.roster))
        elif step == Step.SHARES:
            self.send(rid, self._reply(step, b.inbox.get(i, wire.ciphertexts([]))))
        elif step == Step.UNMASK:
            self.send(rid, self._reply(step, b.request))

    # ------------------------------------------------------------------ masked inputs (CHUNK / COMMIT)
    def upload_check(self, pid: str) -> Optional[str]:
        """None if pid may stream its masked input now, else why not."""
        at = self.member.get(pid)
        if at is None:
            return "not in this round's secure groups: a secure round takes masked inputs of its members only"
        b, i = at
        if b.refused is not None:
            return f"bucket {b.number} is out of the round: {b.refused}"
        if i not in b.server.u2:
            return self.left_out.get(pid, "its shares did not reach the bucket (not in U2)")
        if i in b.server.u3:
            return "its masked input is in the bucket's sum already"
        return None

    def add_masked(self, pid: str, data: np.ndarray) -> Optional[str]:
        """A complete masked input (uint8 bytes) into its bucket's sum; None, or why it was refused."""
        why = self.upload_check(pid)
        if why is not None:
            return why
        b, i = self.member[pid]
        return b.server.add_masked(i, data.view(np.uint32))

    # ------------------------------------------------------------------ phases
    def _members_done(self, has) -> bool:
        return all(has(b, i) for b in self.buckets if b.refused is None for i in range(b.params.n)
                   if b.ids[i] not in self.left_out)

    def tick(self, now: float) -> Optional[Outcome]:
        """Advance the phase when its participants are done or its time is up; an Outcome ends the round."""
        late = now - self.phase_started >= self.cfg.phase_seconds
        if self.phase == "join":
            if len(self.joined) >= self.quorum or now - self.started >= self.deadline:
                return self._form_buckets()
            return None
        if self.phase == "advertise":
            if late or self._members_done(lambda b, i: i in b.ads):
                return self._each_bucket("share", self._rosters)
        elif self.phase == "share":
            if late or self._members_done(lambda b, i: i not in b.server.roster or i in b.shares):
                return self._each_bucket("upload", self._route)
        elif self.phase == "upload":
            if late or self._members_done(lambda b, i: i not in b.server.u2 or i in b.server.u3):
                return self._each_bucket("unmask", self._close_masked)
        elif self.phase == "unmask":
            if late or self._members_done(lambda b, i: i not in b.server.u3 or i in b.responses):
                return self._finish()
        return None

    def _open(self, phase: str, now_answered: Step) -> None:
        self.phase_started = time.monotonic()
        self.timeline[self.phase] = self.phase_started - self.started
        self.phase = phase
        for pid, (step, rid, seq) in list(self.parked.items()):
            if step == now_answered:
                del self.parked[pid]
                at = self.member.get(pid)
                if at is None:
                    self.reject(rid, "dropped", self.left_out.get(pid, "not in this round's groups"), pid, seq)
                else:
                    self._answer(rid, pid, step, *at, seq=seq)

    def _form_buckets(self) -> Optional[Outcome]:
        ids = sorted(self.joined)
        s = self.cfg.bucket_size
        if len(ids) < max(self.min_updates, s * self.min_buckets):
            return self._fail(f"{len(ids)} participants joined the secure round; it needs "
                              f"{max(self.min_updates, s * self.min_buckets)}")
        seed = os.urandom(32)
        for number, members in enumerate(buckets.assign(ids, s, seed)):
            n = len(members)
            k = self.cfg.k if self.cfg.k is None else min(self.cfg.k, n - 1)
            ring = Encoding(clip=1.0, sigma=0.0, gamma=1.0, n=n, d=self.d).padded
            params = Params.for_group(n, ring, k=k, bits=self.cfg.bits, max_dropout=self.cfg.max_dropout)
            round_id = hashlib.sha256(b"fedagg secure round" + struct.pack(">QQI", self.session, self.round, number)
                                      + seed).digest()
            graph_seed = hashlib.sha256(b"graph" + round_id).digest()
            rotation = int.from_bytes(hashlib.sha256(b"rotation" + round_id).digest()[:8], "big") >> 1
            if self.cfg.gamma is None:
                enc = Encoding.for_ring(self.cfg.clip, self.cfg.sigma, n, self.d, bits=self.cfg.bits, seed=rotation)
            else:
                enc = Encoding(clip=self.cfg.clip, sigma=self.cfg.sigma, gamma=self.cfg.gamma, n=n, d=self.d,
                               bits=self.cfg.bits, seed=rotation)
            b = Bucket(number, list(members), params, enc, graph_seed, round_id,
                       GroupServer(params, round_id, graph_seed))
            self.buckets.append(b)
            for i, pid in enumerate(members):
                self.member[pid] = (b, i)
        self._open("advertise", Step.JOIN)
        return None

    def _each_bucket(self, phase: str, step: Callable[[Bucket], None]) -> Optional[Outcome]:
        for b in self.buckets:
            if b.refused is None:
                try:
                    step(b)
                except RoundRefused as e:
                    self._refuse_bucket(b, str(e))
        alive = sum(b.refused is None for b in self.buckets)
        if alive < self.min_buckets:
            return self._fail(f"{alive} buckets left in the {self.phase} phase; the rule needs {self.min_buckets}")
        self._open(phase, {"share": Step.ADVERTISE, "upload": Step.SHARES, "unmask": Step.UNMASK}[phase])
        return None

    def _refuse_bucket(self, b: Bucket, why: str) -> None:
        b.refused = why
        log.warning("round %d: bucket %d is out of the secure round: %s", self.round, b.number, why,
                    extra={"event": "secure_bucket_refused", "round": self.round})
        for pid in b.ids:
            self.left_out.setdefault(pid, f"bucket {b.number}: {why}")

    def _drop(self, b: Bucket, kept, why: str) -> None:
        for i, pid in enumerate(b.ids):
            if i not in kept:
                self.left_out.setdefault(pid, b.server.refused.get(i, why))

    def _rosters(self, b: Bucket) -> None:
        roster = b.server.collect_advertisements(b.ads.values())
        self._drop(b, roster, "no key advertisement in time")
        b.roster = wire.roster(roster)

    def _route(self, b: Bucket) -> None:
        inbox = b.server.route_shares(b.shares)
        self._drop(b, b.server.u2, "no share ciphertexts in time")
        b.inbox = {v: wire.ciphertexts(cts) for v, cts in inbox.items()}

    def _close_masked(self, b: Bucket) -> None:
        u3 = b.server.close_masked()
        self._drop(b, u3, "no masked input in time")
        b.request = wire.unmask_request(b.server.unmask_request())

    def _finish(self) -> Outcome:
        means, counts, members = [], [], []
        eps = {}
        for b in self.buckets:
            if b.refused is not None:
                continue
            try:
                total = b.server.finish(b.responses.values())
            except RoundRefused as e:
                self._refuse_bucket(b, str(e))
                continue
            u3 = sorted(b.server.u3)
            means.append(b.encoding.decode(total, count=len(u3)).astype(np.float32))
            counts.append(len(u3))
            members.append([b.ids[i] for i in u3])
            if b.encoding.sigma > 0 and len(u3) not in eps:
                enc = Encoding(clip=b.encoding.clip, sigma=b.encoding.sigma, gamma=b.encoding.gamma, n=len(u3),
                               d=self.d, bits=b.encoding.bits)
                eps[len(u3)] = enc.epsilon(self.cfg.delta)
        if len(means) < self.min_buckets:
            return self._fail(f"{len(means)} buckets unmasked; the rule needs {self.min_buckets}")
        worst = max(eps.values()) if eps else math.inf
        privacy = {"mechanism": "distributed discrete Gaussian (per bucket sum)", "epsilon": worst,
                   "delta": self.cfg.delta, "sigma": self.cfg.sigma, "clip": self.cfg.clip, "d": self.d,
                   "gamma": max(b.encoding.gamma for b in self.buckets if b.refused is None),
                   "bucket_sizes": counts,
                   "wrap_probability": max(b.encoding.wrap_probability() for b in self.buckets if b.refused is None)}
        self.timeline["unmask"] = time.monotonic() - self.started
        return Outcome(np.stack(means), counts, members, privacy=privacy, left_out=dict(self.left_out),
                       timeline=dict(self.timeline))

    def _fail(self, why: str) -> Outcome:
        self.phase = "closing"
        for pid, (_, rid, seq) in self.parked.items():  # waiting for a phase that will not come: say why
            self.reject(rid, "secure", f"the secure round closes without a model: {why}", pid, seq)
        self.parked = {}
        return Outcome(failed=why, left_out=dict(self.left_out))
