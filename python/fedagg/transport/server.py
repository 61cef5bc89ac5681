"""The aggregation server: a ZeroMQ ROUTER that runs rounds.

Each round the server publishes the global model; participants fetch it in
chunks, train, and stream their update back in chunks that are written
straight into a preallocated buffer per participant (no whole-update copy).
The round closes at a quorum of accepted updates, or at the deadline: with at
least ``min_updates`` the pipeline (decode -> checks -> clip -> robust rule ->
noise) aggregates and the model moves by the aggregate; with fewer (or when the
pipeline fails on what arrived) the round closes without a new model and says
so. Then the next round starts. Every refusal is counted with its reason (and
logged, a few lines per kind and interval); the loop never stops for a bad
message. The rooms: how it runs (config.py), who is connected (peers.py),
receive memory and its sizing (buffers.py), where updates live and are computed
on, host or GPU (device.py), a round's accepted updates and its aggregate
(rounds.py), and what survives a crash (durable.py: commit threads acknowledge
an update only once it is on disk).
See docs/protocol.md for the messages.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections import deque
from typing import Any, Dict, List, Optional

import numpy as np

from .. import _core
from .buffers import ReceiveBuffers, Upload, round_budget
from .config import ServerConfig, is_local
from .device import open_device
from .durable import GroupCommit, RoundStore
from .malloc import keep_freed_memory
from .observe import LogThrottle
from .peers import Peer, PeerTable
from .protocol import (HEADER, Codec, Dtype, Kind, ProtocolError, VersionError, endpoint_host, json_message,
                       message, parse, parse_json, unpack_frames)
from .rounds import Job, collector_for
from .secure_round import SecureRound
from .shards import decide, group_of
from .staleness import staleness_weight

log = logging.getLogger("fedagg.server")

MAX_ID = 128  # characters of a participant id, and of a HELLO secret
MAX_REJECTED_LISTED = 1000  # refusals (and abandoned uploads) listed per round; all are counted
MAX_HISTORY = 1000  # round records kept in memory (all go to metrics.jsonl with a state_dir)
_NOBLOCK, _MORE = 1, 3  # zmq.NOBLOCK, zmq.NOBLOCK | zmq.SNDMORE as plain ints (checked in Server.__init__)


class Server:
    """Runs rounds over ZeroMQ until ``config.rounds`` are done or ``stop()`` is called."""

    def __init__(self, model: np.ndarray, config: ServerConfig, *, on_round=None, progress=None):
        import zmq

        config.check()
        keep_freed_memory()  # libzmq's per-message buffers stay faulted in (transport/malloc.py)
        self.zmq = zmq
        if (_NOBLOCK, _MORE) != (int(zmq.NOBLOCK), int(zmq.NOBLOCK | zmq.SNDMORE)):
            raise RuntimeError("this pyzmq's NOBLOCK and SNDMORE are not libzmq's 1 and 2")
        self.cfg = config
        self.on_round = on_round  # called with each round's metrics record
        self.progress = progress  # e.g. observe.ProgressView: .update(server) a few times a second
        self._shown = 0.0
        self.store = RoundStore(config.state_dir) if config.state_dir else None
        self.session = int.from_bytes(os.urandom(8), "little") >> 1
        restored = self.store.load() if self.store else None
        if restored is not None:
            self.round, model, saved = restored
        else:
            self.round, saved = 0, None
            model = np.ascontiguousarray(model, dtype=np.float32).reshape(-1)
            if model.size == 0:
                raise ValueError("the model has no parameters")
        self.shard = config.shard  # transport/shards.py: this server owns model[lo:hi] of a sharded round
        if self.shard is not None:
            lo, hi = self.shard.range
            if np.size(model) != hi - lo:
                raise ValueError(f"shard {self.shard.rank} of {self.shard.count} owns parameters [{lo}, {hi}) of "
                                 f"{self.shard.d}: its model is that slice ({hi - lo} values), got {np.size(model)}")
        self.model = np.array(model, dtype=np.float32, copy=True)
        self.d = self.model.size
        self.model_bytes = self.d * 4
        self.device = open_device(config.device, self.d, config.chunk_bytes)
        budget = round_budget(config, self.device, self.d)
        self.buffers = ReceiveBuffers(self.d, budget, self.device)
        # A shard keeps every update until the round's participants are agreed: one left out by
        # another shard must leave no trace in this shard's aggregate (a fold could not drop it).
        self.collector = collector_for(config.rule, config.rule_params, self.device, self._clip_norm,
                                       held=self.shard is not None)
        self.accepted: Dict[str, None] = {}  # ids acknowledged this round, in the collector's order
        # buffered mode (transport/staleness.py): each round is one model version's buffer
        self.buffered = config.mode == "buffered"
        self.weigh = staleness_weight(config.staleness) if self.buffered else None
        self.last_base: Dict[str, int] = {}  # id -> the version its latest accepted update was computed on
        self._based: Dict[int, List[str]] = {}  # version -> ids whose last_base it is (pruned when too stale)
        self._old_models: Dict[int, np.ndarray] = {}  # buffered: the last max_staleness versions, still served
        self._parked: Dict[str, tuple] = {}  # buffered: id -> its COMMIT waiting for the next buffer (in order)
        self.committing: Dict[str, Job] = {}  # COMMITs in the commit threads, not acknowledged yet
        self._to_commit: List[Job] = []  # this burst's COMMITs, for the commit threads
        if saved is not None and config.ledger is not None and saved["entries"]:
            # checked against the commitments of the previous session's round key: this session
            # opens another round on chain, where they committed nothing
            log.warning("round %d: %d updates accepted before the restart are dropped: their commitments belong "
                        "to the previous session; participants commit and upload again", restored[0],
                        len(saved["entries"]), extra={"event": "recovered", "round": restored[0]})
            saved = None
        if saved is not None and config.secure is not None and saved["entries"]:
            log.warning("round %d: %d plain updates saved before the restart are dropped: this server runs secure "
                        "rounds", restored[0], len(saved["entries"]), extra={"event": "recovered", "round": restored[0]})
            saved = None
        if restored is not None and self.buffered:
            for pid, base in (self.store.extra.get("last_base") or {}).items():
                self._note_base(pid, int(base))
        if saved is not None:
            if saved["kind"] != self.collector.kind:
                raise ValueError(f"{config.state_dir} holds round {self.round}'s updates for another rule "
                                 f"({saved['kind']}, this server {self.collector.kind}s them): restart with the "
                                 "same rule")
            self.collector.restore(saved)
            self.accepted = {e["id"]: None for e in self.collector.entries}
            for e in self.collector.entries:
                if "base" in e:
                    self._note_base(e["id"], int(e["base"]))
            if self.collector.keeps_updates:
                self.buffers.held += self.model_bytes * self.collector.count
        if restored is not None:
            log.info("recovered round %d with %d accepted updates from %s", self.round, len(self.accepted),
                     config.state_dir, extra={"event": "recovered", "round": self.round})
        self.committer = GroupCommit(self._apply, self._snapshot)
        self._upload_seconds = 1.0  # running mean of an upload's duration (for busy's retry_after)
        # accepted updates per second (sampled once a second, smoothed): how fast the server works
        # through what it holds, for the retry_after of a server at capacity
        self._accept_rate, self._accepted_total, self._rate_mark = 0.0, 0, (time.monotonic(), 0)
        self._first_byte = self._last_byte = 0.0  # when the round's first and last chunks arrived
        self._deferred: Dict[str, tuple] = {}  # id -> (routing id, ACCEPTED's body): durable once the close is written
        # seconds from each COMMIT's arrival to its update's acceptance, this round (its ACCEPTED goes
        # out then, or for the updates that complete a round once the close is on disk)
        self._latencies: List[float] = []
        self.uploads: Dict[str, Upload] = {}
        self.abandoned: Dict[str, None] = {}  # uploads given up this round (the first MAX_REJECTED_LISTED ids)
        self.abandoned_count = 0
        self.peers = PeerTable(config.max_peers, config.rate)
        self.rejected: List[Dict[str, Any]] = []
        self.rejected_counts: Dict[str, int] = {}
        self.messages: Dict[str, int] = {}  # well-formed messages received this round, by kind
        self.round_started = time.monotonic()
        self.bytes_in = 0
        self._failed_at = -1
        self.gate = config.ledger
        # with a ledger each round starts with a commit phase; a secure round with "join"
        self.phase = "join" if config.secure is not None else "upload"
        self.secure: Optional[SecureRound] = None  # the secure round in progress (config.secure)
        self._commit_poll = 0.0  # when to next ask the chain whether everyone has committed
        self._upload_opened = 0.0  # when the commit window closed (a buffered ledger server's deadline counts from it)
        self.history: "deque[Dict[str, Any]]" = deque(maxlen=MAX_HISTORY)  # the latest rounds' records
        self.rounds_done = 0
        self.previous: Optional[Dict[str, Any]] = None  # how the last round closed (STATE, ROUND)
        self._model_crcs: Dict[int, Dict[int, int]] = {}  # round -> {offset: CRC32C of its model's chunk}
        self._state_cache: tuple = (None, b"")  # (round key, STATE's JSON of the round's fields, unclosed)
        self._throttle = LogThrottle()
        self._swept = 0.0
        self._stop = False
        self._want_stop = False  # asked to stop: a shard stops when every shard agrees (at a tick)
        self.group = None  # the shards' fedagg.distributed.Group (set up by serve)
        self._next_tick = 0.0
        self.excluded: Dict[str, str] = {}  # the last round's participants left out by a shard, and why
        if self.store and restored is None:
            self.store.save_round(self.round, self.model, self._extra())
        if config.curve_secret_key is None and not is_local(config.bind):
            log.warning("plain mode on %s: no authentication, anyone who can reach it can submit updates under "
                        "any id (use CURVE keys: fedagg keys generate)", config.bind, extra={"event": "insecure"})
        self.ctx = zmq.Context(io_threads=config.io_threads)
        self.auth = None
        try:
            self.sock = self._socket()
        except BaseException:
            if self.auth is not None:
                self.auth.stop()
            self.ctx.term()
            self.committer.close()
            raise

    def _clip_norm(self) -> Optional[float]:
        """The clipping norm of the current round (DP's, which adaptive clipping moves between rounds)."""
        return self.cfg.dp.clip_norm if self.cfg.dp is not None else self.cfg.clip_norm

    # ---------------------------------------------------------------- sockets
    def _socket(self):
        zmq = self.zmq
        s = self.ctx.socket(zmq.ROUTER)
        if ":" in endpoint_host(self.cfg.bind):  # an IPv6 address: libzmq binds IPv4 only unless told
            s.setsockopt(zmq.IPV6, 1)
        s.setsockopt(zmq.MAXMSGSIZE, self.cfg.chunk_bytes + HEADER.size)
        s.setsockopt(zmq.RCVBUF, 2 * self.cfg.chunk_bytes)  # kernel socket buffers of two chunks
        s.setsockopt(zmq.SNDBUF, 2 * self.cfg.chunk_bytes)
        # Messages queued per peer: its credit window and a few control messages. A peer that
        # ignores its credits is not read further (libzmq stops reading its connection): at most
        # (credits + 16) chunks of memory per peer, not thousands.
        s.setsockopt(zmq.RCVHWM, self.cfg.credits + 16)
        # Replies queued per peer: a model window and control messages. A peer that stops reading
        # cannot make the server keep more (MODEL frames reference whole models of past rounds).
        s.setsockopt(zmq.SNDHWM, self.cfg.credits + 16)
        s.setsockopt(zmq.ROUTER_MANDATORY, 0)
        s.setsockopt(zmq.BACKLOG, 4096)  # thousands connecting at once (the kernel caps it at somaxconn)
        s.setsockopt(zmq.LINGER, 0)
        # Dead peers are found by the kernel's TCP keepalive, not ZMTP heartbeats: those keep timers
        # per connection in libzmq's I/O thread, and at 10,000 idle connections they alone took 0.9
        # of a core here (0 with keepalive). Probes after 5 intervals of silence, 5 unanswered: gone.
        ivl = max(1, round(self.cfg.heartbeat))
        s.setsockopt(zmq.TCP_KEEPALIVE, 1)
        s.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 5 * ivl)
        s.setsockopt(zmq.TCP_KEEPALIVE_INTVL, ivl)
        s.setsockopt(zmq.TCP_KEEPALIVE_CNT, 5)
        if self.cfg.curve_secret_key is not None:
            from zmq.auth.thread import ThreadAuthenticator

            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            allowed = {k if isinstance(k, bytes) else k.encode() for k in (self.cfg.allowed_keys or [])}

            class AllowList:
                def callback(self, domain, key):
                    return key in allowed

            self.auth.configure_curve_callback("*", AllowList())
            s.curve_server = True
            s.curve_secretkey = self.cfg.curve_secret_key
            s.curve_publickey = self.cfg.curve_public_key
        try:
            s.bind(self.cfg.bind)
        except zmq.ZMQError as e:
            s.close(0)
            raise ValueError(f"cannot bind {self.cfg.bind}: {e}") from None
        self.endpoint = s.getsockopt_string(zmq.LAST_ENDPOINT)
        return s

    def close(self) -> None:
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()
        self.committer.close()
        self.device.close()

    def stop(self) -> None:
        """Stop serving (a sharded server stops with the others, at their next agreement)."""
        self._want_stop = True

    # ---------------------------------------------------------------- replies
    def _send(self, rid: bytes, frames: List[Any]) -> None:
        try:  # zero-copy for model chunks; small control messages are cheaper copied (half the Python time)
            copy = len(frames[-1]) < 65536
            # frame by frame with int flags: a third of send_multipart's Python time (its flag enums)
            send = self.sock.send
            send(rid, _MORE)
            send(frames[0], _MORE)
            send(frames[1], _NOBLOCK, copy=copy)
        except self.zmq.Again:  # the peer's queue is full: it will ask again (STATUS)
            suppressed = self._throttle.allow("send_dropped", time.monotonic())
            if suppressed is not None:
                log.warning("send queue full, reply dropped%s", f" ({suppressed} more not logged)" if suppressed else "",
                            extra={"event": "send_dropped"})

    def _recv(self) -> List[Any]:
        """The next message's frames (zmq.Again if none): the first 8 kept, any more read and dropped
        (parse refuses the message). Frame.more instead of recv_multipart's getsockopt per frame."""
        recv = self.sock.recv
        frame = recv(_NOBLOCK, copy=False)
        frames = [frame]
        while frame.more:  # the rest of a message is there already: ZeroMQ delivers messages whole
            frame = recv(0, copy=False)
            if len(frames) < 8:
                frames.append(frame)
        return frames

    def _state_json(self, pid: Optional[str]) -> bytes:
        """STATE's JSON: the fields of the round (encoded once per round and phase), then pid's own."""
        key = (self.round, self.phase, self.rounds_done, self.cfg.rule, self.cfg.f)
        if self.secure is not None or self._state_cache[0] != key:  # a secure round's fields change within phases
            if self.shard is None:
                shards, index, d_total = [{"endpoint": self.endpoint, "lo": 0, "hi": self.d}], 0, self.d
            else:
                shards, index, d_total = self.shard.table(), self.shard.rank, self.shard.d
            common = {"round": self.round, "session": self.session, "d": self.d, "dtype": "float32",
                      "phase": self.phase, "model_bytes": self.model_bytes, "chunk_bytes": self.cfg.chunk_bytes,
                      "credits": self.cfg.credits, "rule": self.cfg.rule, "f": self.cfg.f,
                      "server_lr": self.cfg.server_lr, "previous": self.previous, "shards": shards, "shard": index,
                      "d_total": d_total, "secure": None if self.secure is None else self.secure.public(),
                      "mode": self.cfg.mode}
            if self.buffered:
                common.update(buffer=self.cfg.quorum, max_staleness=self.cfg.max_staleness,
                              staleness=self.cfg.staleness)
            self._state_cache = (key, json.dumps(common, separators=(",", ":")).encode()[:-1])
        own = {"held": self._held(pid), "excluded": self.excluded.get(pid) if pid else None,
               "accepted": pid in self.accepted and pid not in self._deferred if pid else False}
        if self.buffered:
            own["last_base"] = self.last_base.get(pid) if pid else None
        if self.secure is None and self._full(self.model_bytes) is not None:
            # a new upload would be refused busy now: wait this long before sending its first chunk
            own["busy"] = self._retry_after(full=True)
        return self._state_cache[1] + b"," + json.dumps(own, separators=(",", ":")).encode()[1:]

    def _reject(self, rid: bytes, reason: str, detail: str = "", pid: Optional[str] = None, rnd: Optional[int] = None,
                record: bool = True, seq: int = 0, retry_after: Optional[float] = None) -> None:
        """Refuse one message; the reply names the refused message's seq (0 if it could not be parsed).

        Every refusal is counted by reason; `record=False` keeps routine ones (a resumable
        `order` or `checksum`, an `unknown` connection) out of the round's listed refusals.
        """
        suppressed = self._throttle.allow(("rejected", reason), time.monotonic())
        if suppressed is not None:
            log.info("rejected %s: %s %s%s", pid or rid.hex(), reason, detail,
                     f" ({suppressed} more '{reason}' refusals not logged)" if suppressed else "",
                     extra={"event": "rejected", "participant": pid, "reason": reason, "round": self.round})
        self.rejected_counts[reason] = self.rejected_counts.get(reason, 0) + 1
        if record and len(self.rejected) < MAX_REJECTED_LISTED:
            self.rejected.append({"id": pid, "reason": reason, "detail": detail, "round": rnd})
        if record and self.gate is not None and pid is not None:  # the round's bundle names each refusal
            peer = self.peers.of(pid)
            # (a buffered server's refusals are all its current version's: that is the key they committed under)
            if peer is not None and peer.address and (rnd is None or rnd == self.round or self.buffered):
                self.gate.refused(peer.address, reason, detail)
        body = {"reason": reason, "detail": detail, "held": self._held(pid), "seq": seq}
        if retry_after is not None:
            body["retry_after"] = retry_after
        self._send(rid, json_message(Kind.REJECTED, body, round=self.round, seq=seq, session=self.session))

    def _held(self, pid: Optional[str]) -> int:
        return self.uploads[pid].received if pid in self.uploads else 0

    # ---------------------------------------------------------------- the loop
    def serve(self) -> List[Dict[str, Any]]:
        """Run rounds; returns the per-round metrics (the latest MAX_HISTORY rounds)."""
        zmq = self.zmq
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.committer.fileno(), zmq.POLLIN)  # the commit threads finished a group
        target = None if self.cfg.rounds is None else self.cfg.rounds
        self.group = group_of(self.shard)
        self.round_started = time.monotonic()  # the deadline and commit phase count from here, not __init__
        self._start_ledger_round()
        self._start_secure_round()
        linger_until = None
        try:
            while not self._stop:
                if self._want_stop and (self.group is None or linger_until is not None):
                    break
                if target is not None and self.rounds_done >= target:
                    # the last round is closed: keep serving its model (STATUS, GET_MODEL) a while
                    if linger_until is None:
                        linger_until = time.monotonic() + self.cfg.linger
                        self.phase = "finished"
                        if self.cfg.linger > 0:
                            log.info("last round closed: serving the final model for %s s", self.cfg.linger,
                                     extra={"event": "lingering", "round": self.round})
                    if time.monotonic() >= linger_until:
                        break
                if poller.poll(50):
                    for _ in range(256):  # bounded burst, then check the round
                        try:
                            frames = self._recv()
                        except zmq.Again:
                            break
                        self._handle(frames)
                if self._to_commit:
                    self.committer.submit(self._to_commit)
                    self._to_commit = []
                if self.committing:
                    self._acknowledge(self.committer.completed())
                if linger_until is None:
                    self._maybe_close()
                if self.progress is not None and time.monotonic() - self._shown > 0.25:
                    self._shown = time.monotonic()
                    self.progress.update(self)
        finally:
            try:
                if self.progress is not None:
                    self.progress.close()
            finally:
                # a second for the last replies (the final ROUND, MODEL chunks asked for) to leave
                self.sock.setsockopt(zmq.LINGER, 1000)
                self.close()
        return list(self.history)

    def _handle(self, frames) -> None:
        """One message; nothing a participant sends may stop the loop."""
        try:
            self._dispatch(frames)
        except Exception as e:  # noqa: BLE001 - a bug or an input we did not foresee: log it, keep serving
            log.exception("internal error on a message: %s", e, extra={"event": "internal_error"})
            try:
                self._send(frames[0].bytes, json_message(Kind.REJECTED, {"reason": "internal", "detail": str(e)[:200],
                                                                         "held": 0, "seq": 0},
                                                         round=self.round, session=self.session))
            except Exception:  # noqa: BLE001
                pass

    def _dispatch(self, frames) -> None:
        rid = frames[0].bytes
        now = time.monotonic()
        peer = self.peers.get(rid)
        if peer is not None and peer.key and frames[1].get("User-Id") != peer.key:
            peer = None  # a routing id reused by another connection: it is not that participant
        if peer is not None and not self.peers.charge(peer, now):  # over its rate: dropped
            self.rejected_counts["rate"] = self.rejected_counts.get("rate", 0) + 1
            suppressed = self._throttle.allow("rate_limited", now)
            if suppressed is not None:
                log.warning("rate limit: dropped a message from %s%s", peer.pid,
                            f" ({suppressed} more dropped messages not logged)" if suppressed else "",
                            extra={"event": "rate_limited", "participant": peer.pid})
            return
        try:
            head, body = parse(frames[1:], self.cfg.chunk_bytes, verify=False)
            if head.kind != Kind.CHUNK and _core.crc32c(body) != head.checksum:  # chunks: checked while copied
                raise ProtocolError("checksum mismatch")
        except VersionError as e:  # answered in the client's own version, which it can read
            self.rejected_counts["version"] = self.rejected_counts.get("version", 0) + 1
            self._send(rid, json_message(Kind.REJECTED, {"reason": "version", "detail": str(e), "held": 0, "seq": 0},
                                         round=self.round, session=self.session, version=e.version))
            return
        except ProtocolError as e:
            self._reject(rid, "malformed", str(e), peer.pid if peer else None, record=peer is not None)
            return
        self.messages[head.kind.name] = self.messages.get(head.kind.name, 0) + 1
        if head.kind == Kind.HELLO:
            self._hello(rid, frames[1], head, body, now)
            return
        if peer is None:
            self._reject(rid, "unknown", "send HELLO first (this connection is new to the server, or its entry "
                         "was dropped)", record=False, seq=head.seq)
            return
        if head.seq <= peer.last_seq:
            self._reject(rid, "replayed", f"seq {head.seq} <= {peer.last_seq}", peer.pid, head.round, seq=head.seq)
            return
        peer.last_seq = head.seq
        if head.kind == Kind.CHUNK:
            self._chunk(rid, peer, head, body)
        elif head.kind == Kind.COMMIT:
            self._commit(rid, peer, head, body)
        elif head.kind == Kind.GET_MODEL:
            self._get_model(rid, peer, head)
        elif head.kind == Kind.SECAGG:
            if self.phase == "finished":
                self._reject(rid, "finished", "the server ran its last round; fetch the final model", peer.pid,
                             head.round, record=False, seq=head.seq)
            elif self.secure is None:
                self._reject(rid, "secure", "this server runs plain rounds (no SECAGG steps)", peer.pid, head.round,
                             seq=head.seq)
            else:
                self.secure.on_message(rid, peer.pid, head, body)
        elif head.kind in (Kind.STATUS, Kind.HEARTBEAT):
            if head.kind == Kind.STATUS:
                self._send(rid, message(Kind.STATE, self._state_json(peer.pid), round=self.round,
                                        session=self.session))
        else:
            self._reject(rid, "malformed", f"{head.kind.name} is not sent by participants", peer.pid, seq=head.seq)

    def _hello(self, rid: bytes, head_frame, head, body, now: float) -> None:
        try:
            obj = parse_json(body)
            pid, secret = obj["id"], obj.get("secret")
            for name, v in (("id", pid), ("secret", secret)):
                if not (v is None and name == "secret") and (
                        not isinstance(v, str) or not 1 <= len(v) <= MAX_ID or not v.isprintable()):
                    raise ProtocolError(f"{name} must be 1..{MAX_ID} printable characters")
        except (ProtocolError, KeyError, TypeError, AttributeError) as e:
            self._reject(rid, "malformed", f"HELLO: {e}", record=False, seq=head.seq)
            return
        key = ""
        if self.cfg.curve_secret_key is not None:
            key = head_frame.get("User-Id") or ""
            if pid != key:  # an update is accepted only from the key it claims
                self._reject(rid, "identity", "id must be the participant's CURVE public key (z85)", record=False,
                             seq=head.seq)
                return
        address = None
        if self.gate is not None:
            address = obj.get("address", pid) if self.cfg.admission == "both" else pid
            try:
                why = self.gate.admit(address)
            except (ValueError, TypeError):
                why = "unregistered"  # not even an address
            if why:
                self._reject(rid, why, f"{address!r} is not admitted by the ledger", pid, seq=head.seq)
                return
        if len(rid) != 5 or rid[0] != 0:  # libzmq's own routing ids: 5 bytes, the first 0 (never user-set)
            self._reject(rid, "identity", "the connection set its own ZMQ_ROUTING_ID: leave it to libzmq",
                         record=False, seq=head.seq)
            return
        peer, why, detail, abandon = self.peers.hello(rid, pid, key, secret, head.seq, address, now,
                                                      self._upload_owner)
        if peer is None:
            self._reject(rid, why, detail, pid, seq=head.seq)
            return
        for gone in abandon:  # this connection spoke for another id, or an entry made room
            self._abandon(gone)
        suppressed = self._throttle.allow("hello", now)
        if suppressed is not None:
            log.info("hello from %s%s", pid, f" ({suppressed} more not logged)" if suppressed else "",
                     extra={"event": "hello", "participant": pid})
        self._send(rid, message(Kind.STATE, self._state_json(pid), round=self.round, session=self.session))

    def _note_base(self, pid: str, base: int) -> None:
        """pid's latest accepted update was computed on version `base` (an older one is a duplicate)."""
        if base > self.last_base.get(pid, -1):
            self.last_base[pid] = base
            self._based.setdefault(base, []).append(pid)

    def _forget_stale_bases(self) -> None:
        """Bases older than max_staleness are refused as stale anyway: their entries go (amortized: each
        accepted update is noted once and forgotten once)."""
        oldest = self.round - self.cfg.max_staleness
        for version in [v for v in self._based if v < oldest]:
            for pid in self._based.pop(version):
                if self.last_base.get(pid) == version:
                    del self.last_base[pid]

    def _extra(self) -> Dict[str, Any]:
        """What a state directory keeps across versions besides the model (buffered: who sent what)."""
        return {"last_base": dict(self.last_base)} if self.buffered else {}

    def _upload_owner(self, pid: str):
        up = self.uploads.get(pid)
        return (False, None) if up is None else (True, up.secret)

    def _abandon(self, pid: str) -> None:
        """Give up pid's upload in progress: its bytes leave the budget, a raw buffer goes back to the pool."""
        up = self.uploads.pop(pid, None)
        if up is not None:
            self._free(up)
            self.abandoned_count += 1
            if len(self.abandoned) < MAX_REJECTED_LISTED:
                self.abandoned[pid] = None

    def _free(self, up: Upload) -> None:
        self.buffers.release(up.charge)
        if self.secure is not None:  # a masked input's bytes: the next one reuses them
            self.buffers.recycle_bytes(up.buf)
        elif up.codec == Codec.RAW:
            self.buffers.recycle([up.buf])

    def _sweep(self, now: float) -> None:
        """Once a second: uploads that received nothing for upload_timeout are abandoned (not those whose
        COMMIT waits for the next buffer: they are complete)."""
        if now - self._swept < 1.0:
            return
        t, count = self._rate_mark
        self._accept_rate += 0.5 * ((self._accepted_total - count) / (now - t) - self._accept_rate)
        self._rate_mark = (now, self._accepted_total)
        self._swept = now
        for pid, up in list(self.uploads.items()):
            if now - up.last_chunk > self.cfg.upload_timeout and pid not in self._parked:
                log.info("upload of %s abandoned: nothing received for %.0f s", pid, now - up.last_chunk,
                         extra={"event": "abandoned", "participant": pid, "round": self.round})
                self._abandon(pid)

    def _get_model(self, rid: bytes, peer: Peer, head) -> None:
        model = self.model if head.round == self.round else self._old_models.get(head.round)
        if model is None:  # (buffered: a download begun before the last versions were published finishes)
            served = (f"versions {min(self._old_models, default=self.round)} to {self.round} are served"
                      if self.buffered else f"the model of round {self.round} is served")
            self._reject(rid, "round", f"{served}, not {head.round}", peer.pid, head.round, record=False,
                         seq=head.seq)
            return
        step = self.cfg.chunk_bytes
        if head.offset % step or head.offset >= self.model_bytes:
            self._reject(rid, "malformed", "GET_MODEL offset must be a chunk boundary inside the model",
                         peer.pid, record=False, seq=head.seq)
            return
        view = memoryview(model).cast("B")  # all peers share this buffer: no per-peer copy
        crcs = self._model_crcs.setdefault(head.round, {})  # each chunk's checksum, once per model
        count = max(1, min(int(head.aux), self.cfg.credits))
        for off in range(head.offset, min(self.model_bytes, head.offset + count * step), step):
            part = view[off:off + step]
            crc = crcs.get(off)
            if crc is None:
                crc = crcs[off] = _core.crc32c(part)
            self._send(rid, message(Kind.MODEL, part, checksum=crc, round=head.round, offset=off,
                                    total=self.model_bytes, dtype=Dtype.FLOAT32, session=self.session))

    def _chunk(self, rid: bytes, peer: Peer, head, body) -> None:
        pid = peer.pid
        if self._off_version(rid, pid, head):
            return
        if head.session != self.session:
            self._reject(rid, "session", "the server restarted: resume from 'held'", pid, head.round,
                         record=False, seq=head.seq)
            return
        if self.phase == "finished":
            self._reject(rid, "finished", "the server ran its last round; fetch the final model", pid,
                         head.round, record=False, seq=head.seq)
            return
        if self.phase != "upload":
            self._reject(rid, "phase", f"uploads are taken in the upload phase; the round is in its {self.phase} "
                         "phase" + (" (commit your update on chain first)" if self.phase == "commit" else ""), pid,
                         head.round, record=False, seq=head.seq)
            return
        if self.secure is not None:
            why = self.secure.upload_check(pid)
            if why is None and (head.codec != Codec.RAW or head.dtype != Dtype.UINT32
                                or head.total != self.secure.ring_bytes):
                why = (f"a secure round takes masked inputs: raw uint32, {self.secure.ring_bytes} bytes; got "
                       f"{head.total} bytes of {head.dtype.name} (codec {head.codec.name})")
            if why is not None:
                self._abandon(pid)
                self._reject(rid, "secure", why, pid, head.round, seq=head.seq)
                return
        if pid in self.committing or pid in self._deferred:
            self._busy(rid, pid, head, "your update is being made durable: ask again (STATUS) in a moment")
            return
        if self.buffered and self.last_base.get(pid, -1) >= head.round:
            self._reject(rid, "duplicate", f"an update of this participant computed on version "
                         f"{self.last_base[pid]} is accepted already (one update per participant per version)",
                         pid, head.round, seq=head.seq)
            return
        if pid in self.accepted and not self.buffered:  # buffered: it may stream its next one (COMMIT waits)
            self._reject(rid, "duplicate", "an update of this participant is already in the round", pid,
                         head.round, seq=head.seq)
            return
        if head.length == 0 or head.total == 0:
            self._reject(rid, "malformed", "a chunk carries at least one byte", pid, head.round, seq=head.seq)
            return
        if head.codec == Codec.RAW and self.secure is None:
            if head.dtype != Dtype.FLOAT32 or head.total != self.model_bytes:
                self._abandon(pid)
                self._reject(rid, "size", f"a raw update is {self.model_bytes} float32 bytes, got {head.total} "
                             f"bytes of {head.dtype.name}", pid, head.round, seq=head.seq)
                return
        elif head.total > self.model_bytes + (1 << 16):  # a compressed update is never bigger than raw
            self._reject(rid, "size", f"compressed update of {head.total} bytes exceeds the raw size", pid,
                         head.round, seq=head.seq)
            return
        if head.codec == Codec.RAW and head.length % 4:
            self._reject(rid, "malformed", "raw chunks hold whole float32 values", pid, head.round, seq=head.seq)
            return
        up = self.uploads.get(pid)
        if up is None or up.codec != head.codec or up.total != head.total or up.base != head.round:
            if head.offset != 0:
                self._reject(rid, "order", "an upload starts at offset 0", pid, head.round, record=False, seq=head.seq)
                return
            if up is not None:  # restarted with another codec or size: the old one is given up
                self._free(self.uploads.pop(pid))
            # a compressed upload holds at least a decoded update's worth: it becomes one at COMMIT
            need = self.model_bytes if head.codec == Codec.RAW else max(head.total, self.model_bytes)
            if self.secure is not None:  # a masked input: host bytes, added to its bucket's sum at COMMIT
                need = head.total
            full = self._full(need)
            if full is not None:
                self._busy(rid, pid, head, full, full=True)
                return
            if head.codec == Codec.RAW and self.secure is None:
                buf = self.buffers.take_raw()
            else:
                buf = self.buffers.take_bytes(head.total, need)
            up = self.uploads[pid] = Upload(head.codec, buf, head.total, need, peer.secret, base=head.round)
            if self.gate is not None:  # a buffered server's hash covers the version it was computed on
                from ..ledger.crypto import hasher

                up.sha256 = hasher(head.round if self.buffered else None)
        if head.offset != up.received:
            self._reject(rid, "order", f"expected offset {up.received}, got {head.offset}", pid, head.round,
                         record=False, seq=head.seq)
            return
        raw = up.codec == Codec.RAW and self.secure is None
        if raw:  # into the update's buffer on the server's device
            crc, finite = self.device.write(up.buf, up.received, body, True)
        else:
            crc, finite = _core.copy_crc32c(up.buf[up.received:up.received + head.length], body, False)
        if crc != head.checksum:
            if up.received == 0:  # nothing held yet: no buffer is kept for it either
                self._free(self.uploads.pop(pid))
            self._reject(rid, "checksum", f"chunk at offset {head.offset} is corrupt", pid, head.round,
                         record=False, seq=head.seq)  # not counted as received: the client resends it
            return
        up.finite = up.finite and finite  # raw float32: checked on the way in, no pass at COMMIT
        if up.sha256 is not None:  # hashed while the upload streams, not at COMMIT
            t0 = time.monotonic()
            up.sha256.update(body)
            self.gate.cost.hash_seconds += time.monotonic() - t0
        up.received += head.length
        up.last_chunk = self._last_byte = time.monotonic()
        if not self._first_byte:
            self._first_byte = self._last_byte
        self.bytes_in += head.length
        self._send(rid, message(Kind.CREDIT, b"", aux=1, offset=up.received, total=up.total, round=self.round,
                                session=self.session))

    def _ledger_check(self, peer: Peer, body, up: Upload) -> Optional[str]:
        """Registration, stake, signature and commitment of an uploaded update (None: admissible)."""
        try:
            sig = bytes.fromhex(parse_json(body)["signature"])
        except (ProtocolError, KeyError, TypeError, ValueError):
            return "signature"
        return self.gate.check(peer.address, up.sha256.digest(), sig, session=self.session)

    def _off_version(self, rid: bytes, pid: str, head) -> bool:
        """Refuse a CHUNK or COMMIT for a round (a buffered server: a model version) not taken now."""
        if head.round == self.round:
            return False
        if not self.buffered:
            why, detail = "late" if head.round < self.round else "future", ""
        elif head.round > self.round:
            why, detail = "future", ""
        elif head.round >= self.round - self.cfg.max_staleness:
            return False
        else:
            why, detail = "stale", (f": computed on version {head.round}, {self.round - head.round} versions old; "
                                    f"max_staleness is {self.cfg.max_staleness} (fetch the model again)")
        self._reject(rid, why, f"round {head.round}, the server is in round {self.round}{detail}", pid, head.round,
                     seq=head.seq)
        return True

    def _commit(self, rid: bytes, peer: Peer, head, body=b"", first: Optional[float] = None) -> None:
        """A COMMIT (`first`: when it first arrived, for one that waited for its buffer)."""
        pid = peer.pid
        if self._off_version(rid, pid, head):
            return
        if pid in self.committing or pid in self._deferred:
            self._busy(rid, pid, head, "your update is being made durable: ask again (STATUS) in a moment")
            return
        if self.buffered and self.last_base.get(pid, -1) >= head.round:
            self._reject(rid, "duplicate", f"an update of this participant computed on version "
                         f"{self.last_base[pid]} is accepted already (one update per participant per version)",
                         pid, head.round, seq=head.seq)
            return
        if (self.buffered and self.gate is None
                and (pid in self.accepted or len(self.accepted) + len(self.committing) >= self.cfg.quorum)):
            # the buffer is full, or holds this participant's previous update (one row per participant per
            # buffer): the COMMIT waits, its bytes held, and is taken up again when the next buffer opens
            waiting = self._parked.get(pid)  # a resent COMMIT keeps its place and its arrival time
            self._parked[pid] = (rid, peer, head, body,
                                 waiting[4] if waiting else first if first is not None else time.monotonic())
            return
        if pid in self.accepted:
            self._reject(rid, "duplicate", "an update of this participant is already in the round", pid,
                         head.round, seq=head.seq)
            return
        if self.phase == "finished":
            self._reject(rid, "finished", "the server ran its last round; fetch the final model", pid,
                         head.round, record=False, seq=head.seq)
            return
        up = self.uploads.get(pid)
        if (up is None or up.received != up.total or head.session != self.session or head.total != up.total
                or up.base != head.round):
            self._reject(rid, "incomplete", f"holding {self._held(pid)} of {up.total if up else '?'} bytes", pid,
                         head.round, record=False, seq=head.seq)
            return
        del self.uploads[pid]
        if self.secure is not None:  # into its bucket's sum now; the buffer is free at once
            why = self.secure.add_masked(pid, up.buf)
            self._free(up)
            if why is not None:
                self._reject(rid, "secure", why, pid, head.round, seq=head.seq)
                return
            self.accepted[pid] = None
            self._send(rid, json_message(Kind.ACCEPTED, {"round": self.round, "id": pid}, round=self.round,
                                         session=self.session))
            return
        why, detail = None, ""
        if self.gate is not None:
            try:
                why = self._ledger_check(peer, body, up)
            except BaseException:  # the chain failed: the upload stays, COMMIT can be sent again
                self.uploads[pid] = up
                raise
            detail = "the ledger does not vouch for this update"
        if why is None and up.codec == Codec.RAW and not up.finite:
            why, detail = "nonfinite", "the update holds NaN or Inf"
        if why is not None:
            self._free(up)
            self._reject(rid, why, detail, pid, head.round, seq=head.seq)
            return
        weight = 1.0
        if self.gate is not None and self.gate.stake_weighted:
            weight = float(self.gate.weights([peer.address])[0])
        # Decoding, the fold (or keeping the update) and the disk happen in the commit threads;
        # ACCEPTED goes out when it hands the job back (_acknowledge).
        job = Job(pid, rid, peer.address or pid, weight, up, seq=head.seq, started=up.started,
                  committed=time.monotonic() if first is None else first)
        if self.buffered:
            job.base, job.staleness = head.round, self.round - head.round
            job.scale = float(self.weigh(job.staleness))
        self.committing[pid] = job
        self._to_commit.append(job)  # handed to the commit threads after this burst of messages, together

    def _full(self, need: int) -> Optional[str]:
        """Why a new upload of `need` bytes is refused `busy` now (None: it is taken)."""
        inflight = len(self.uploads) + len(self.committing)
        if inflight >= self.cfg.max_inflight:
            return f"{inflight} uploads in flight, max_inflight {self.cfg.max_inflight}"
        if self.buffered and len(self._parked) >= self.cfg.quorum:  # a whole next buffer waits already:
            # more would only wait longer and grow staler (overload: shed it here, before it is held)
            return f"{len(self._parked)} complete updates wait for the next buffer"
        if not self.buffers.room(need):
            return (f"receive memory full: {self.buffers.held} of {self.buffers.budget} bytes held by "
                    f"{len(self.uploads)} uploads and {len(self.accepted)} accepted updates")
        return None

    def _retry_after(self, full: bool = False) -> float:
        wait = self._upload_seconds / 2
        if full:  # the uploads it holds (streaming, being made durable, waiting) at its acceptance rate
            backlog = len(self.uploads) + len(self.committing) + len(self._parked)
            wait = max(wait, backlog / max(self._accept_rate, 1.0))
        return round(min(10.0, max(0.05, wait)), 3)

    def _busy(self, rid: bytes, pid: str, head, detail: str, full: bool = False) -> None:
        """Refuse for now: retry_after (seconds) is about half an upload's recent duration, or, for a
        server at capacity (`full`), the time it needs to work through the uploads it holds at
        its recent acceptance rate (retrying sooner only costs it another refusal: under a load
        beyond what it takes, quick retries would spend its time refusing); 0.05 to 10 s."""
        self._reject(rid, "busy", detail, pid, head.round, seq=head.seq, record=False,
                     retry_after=self._retry_after(full))

    # ---------------------------------------------------------------- the commit threads' side
    def _apply(self, jobs: List[Job]) -> None:
        """In the applier thread: each update as dense float32 on the device, then all into the round's
        collector at once (the mean folds them in one pass over its sum). Refusals set job.error."""
        with self.device.computing():
            for job in jobs:
                up = job.upload
                if self.gate is not None:  # the bytes the participant committed to, for the round's bundle
                    data = None  # not fetched from the device when the bundle keeps no updates
                    if self.gate.keep_updates:
                        data = self.device.host_view(up.buf) if up.codec == Codec.RAW else up.buf
                        data = memoryview(data).cast("B")[:up.total]
                    self.gate.keep(job.address, data, "float32" if up.codec == Codec.RAW else "payload")
                if up.codec == Codec.RAW:
                    job.update = up.buf
                    continue
                try:
                    job.update = self._decode(up)
                except Exception as e:  # noqa: BLE001 - whatever a hostile payload makes a codec raise
                    job.error = ("payload", f"{type(e).__name__}: {e}"[:300])
                    continue
                if not self.device.finite(job.update):
                    job.error = ("nonfinite", "the update holds NaN or Inf")
            self.collector.add([job for job in jobs if job.error is None])

    def _snapshot(self, group: List[Job]):
        """In the applier thread, once per group: what the writer thread puts on disk (None: nothing).

        A group that brings the round to its quorum is not written: the round closes on it, and
        the new model written then (server.json's next round) is what makes it durable; its
        ACCEPTEDs wait for that write (``deferred``). Should the round not close after all, the
        server writes the snapshot itself before acknowledging (``_persist_deferred``).
        """
        if self.store is None:
            return None
        if self.collector.count >= self.cfg.quorum:
            for job in group:
                job.deferred = True
            return None
        return self.collector.snapshot(self.store, self.round)

    def _persist_deferred(self) -> None:
        """The round stays open with deferred updates: write its state now, then acknowledge them."""
        if self._deferred:
            self.collector.snapshot(self.store, self.round)()
            self._ack_deferred(self.round)

    def _ack_deferred(self, rnd: int) -> None:
        for rid, body in self._deferred.values():
            self._send(rid, json_message(Kind.ACCEPTED, body, round=rnd, session=self.session))
        self._deferred = {}

    def _acknowledge(self, jobs: List[Job]) -> None:
        """Jobs the commit threads are done with: ACCEPTED (durable now), or the refusal it found."""
        now = time.monotonic()
        for job in jobs:
            self.committing.pop(job.pid, None)
            up = job.upload
            if job.error is not None:
                self._free(up)
                self._reject(job.rid, job.error[0], job.error[1], job.pid, self.round, seq=job.seq)
                continue
            if job.spent:  # folded into the sum: its buffer and bytes are free now
                self._free(up)
            elif up.codec != Codec.RAW:  # the payload's bytes are spent; the decoded update is held instead
                self.buffers.release(up.charge)
                self.buffers.held += self.model_bytes
            self.accepted[job.pid] = None
            self._accepted_total += 1
            self._upload_seconds += 0.1 * (now - job.started - self._upload_seconds)
            body = {"round": self.round, "id": job.pid}
            if job.base is not None:  # buffered: the version it was computed on, and how it counts
                self._note_base(job.pid, job.base)
                body.update(round=job.base, version=self.round, staleness=job.staleness, scale=job.scale)
            self._latencies.append(now - job.committed)
            if job.deferred:  # durable with the round's close: ACCEPTED then (_ack_deferred)
                self._deferred[job.pid] = (job.rid, body)
                continue
            if self._throttle.allow("accepted", now) is not None:
                log.info("accepted %s (%d this round)", job.pid, len(self.accepted),
                         extra={"event": "accepted", "participant": job.pid, "round": self.round})
            self._send(job.rid, json_message(Kind.ACCEPTED, body, round=self.round, session=self.session))

    def _decode(self, up: Upload):
        from ..compress import Payload, decode

        p = Payload.from_frames(unpack_frames(memoryview(up.buf)))
        if p.d != self.d:
            raise ValueError(f"compressed update has d = {p.d}, the model has {self.d}")
        return decode(p, like=self.device.like)

    # ---------------------------------------------------------------- closing a round
    def _start_ledger_round(self) -> None:
        if self.gate is None:
            return
        self.phase = "commit"
        try:
            self.gate.start_round(self.round, self.session)
        except Exception as e:  # noqa: BLE001 - the chain is down: uploads cannot be verified yet
            log.error("round %d: the ledger could not open the round: %s", self.round, e,
                      extra={"event": "ledger_error", "round": self.round})
            return
        self._follow_policy()

    def _follow_policy(self) -> None:
        """Run this round with the rule and f of the chain's policy, when it sets them (the round
        starts empty, so the collector can change with the rule; min_updates and quorum rise to what
        the rule needs). A policy this server cannot run is logged and the configured rule kept: the
        round's bundle shows the difference, and the audit fails its policy check."""
        p = self.gate.policy
        if not p.rule or (p.rule, int(p.f)) == (self.cfg.rule, self.cfg.f) or self.collector.count:
            return
        from ..rules import RULES as SPECS

        try:  # a round never closes with fewer updates than the voted rule needs
            need = max(self.cfg.min_updates, SPECS[p.rule].min_n(int(p.f)))
            cfg = dataclasses.replace(self.cfg, rule=p.rule, f=int(p.f), min_updates=need,
                                      quorum=max(self.cfg.quorum, need),
                                      rule_params=self.cfg.rule_params if p.rule == self.cfg.rule else {})
            cfg.check()
        except (KeyError, ValueError) as e:
            log.error("round %d: the chain's policy (%s, f = %d) cannot run here: %s; keeping %s", self.round,
                      p.rule, p.f, e, self.cfg.rule, extra={"event": "ledger_error", "round": self.round})
            return
        log.info("round %d: the chain's policy sets the rule to %s with f = %d", self.round, p.rule, p.f,
                 extra={"event": "policy", "round": self.round})
        self.cfg = cfg
        self.collector = collector_for(cfg.rule, cfg.rule_params, self.device, self._clip_norm)

    def _maybe_close(self) -> None:
        if self.secure is not None:
            self._secure_tick()
            return
        if self.phase == "commit":
            now = time.monotonic()
            if now < self._commit_poll:  # the chain is asked at most every poll_seconds
                return
            self._commit_poll = now + self.gate.poll_seconds
            done = now - self.round_started >= self.gate.commit_seconds
            try:
                if self.buffered:  # a buffer's worth of commitments closes the window; the timer, min_updates
                    count = self.gate.commit_count()
                    done = count >= self.cfg.quorum or (done and count >= self.cfg.min_updates)
                elif not done:  # everyone committed: no need to wait the window out
                    done = self.gate.all_committed()
            except Exception as e:  # noqa: BLE001 - the chain hiccuped: the timer still ends the phase
                log.warning("round %d: reading the commitments failed: %s", self.round, e,
                            extra={"event": "ledger_error", "round": self.round})
            if done:
                try:
                    self.gate.close_commits()
                    self.phase = "upload"
                    self._upload_opened = now
                    log.info("round %d: commit phase over, %d commitments", self.round,
                             len(self.gate.commitments or {}), extra={"event": "upload_phase", "round": self.round})
                except Exception as e:  # noqa: BLE001 - try again, after a pause
                    self._commit_poll = now + 1.0
                    log.error("round %d: closing the commit window failed: %s", self.round, e,
                              extra={"event": "ledger_error", "round": self.round})
            return
        # The round's decision: transport/shards.py's, on this server's view alone, or (a shard) on
        # every shard's, gathered over their group every `tick` seconds.
        now = time.monotonic()
        if self.group is not None:
            if now < self._next_tick:
                return
            self._next_tick = now + self.shard.tick
        self._sweep(now)
        quorum, late = self.cfg.quorum, not self.buffered and now - self.round_started >= self.cfg.deadline
        if self.buffered and self.gate is not None:
            # a version takes the reveals of those that committed in its window (every one of them,
            # even past K: each is bound to this version's key), until the deadline from the window's close
            quorum = max(1, len(self.gate.commitments or {}))
            late = now - self._upload_opened >= self.cfg.deadline
        if self.committing and (late or len(self.accepted) + len(self.committing) >= quorum):
            # COMMITs in the commit threads belong to the round: the ones not yet durable become
            # durable with the close's write (a snapshot being written for them is given up)
            self._acknowledge(self.committer.settle())
        view = {"round": self.round, "accepted": list(self.accepted), "late": late, "stop": self._want_stop}
        views = [view] if self.group is None else self.group.gather(view)
        decision = decide(views, quorum, self.cfg.min_updates, self._failed_at)
        if decision.action == "stop":
            self._stop = True
            return
        if decision.action == "wait":
            if self._deferred:  # settled for a close that did not happen: their own write, now
                self._persist_deferred()
            return
        if self.committing:  # a shard: nothing may be in the commit threads while the round closes
            self._acknowledge(self.committer.settle())
        excluded = dict(decision.incomplete)
        for pid in self.accepted:  # accepted here after the views were gathered: too late for this round
            if pid not in excluded and pid not in set(decision.participants):
                excluded[pid] = "accepted by this shard after the shards agreed to close the round: left out of it"
        for pid, why in excluded.items():
            waiting = self._deferred.pop(pid, None)
            if waiting is not None:  # its ACCEPTED was waiting for the close: it is not in the round
                self._send(waiting[0], json_message(Kind.REJECTED, {"reason": "excluded", "detail": why, "held": 0,
                                                             "seq": 0}, round=self.round, session=self.session))
        if decision.action == "close":
            self._close_round(decision.reason, decision.participants, excluded)
        else:
            self._close_without_model(decision.reason, excluded)

    def _close_round(self, reason: str, participants: Optional[List[str]] = None,
                     left_out: Optional[Dict[str, str]] = None) -> None:
        """Aggregate the round: all accepted updates, or (a shard) the agreed `participants` in their order."""
        t0 = time.monotonic()
        entries = self.collector.entries
        order = None
        if participants is not None and participants != [e["id"] for e in entries]:
            where = {e["id"]: i for i, e in enumerate(entries)}
            order = [where[p] for p in participants]
            entries = [entries[i] for i in order]
        ids = [e["id"] for e in entries]
        addresses = [e["address"] for e in entries]
        weights = None
        if self.gate is not None and self.gate.stake_weighted:
            weights = np.array([e["weight"] for e in entries], dtype=np.float64)
        try:
            with self.device.computing():
                agg, info = self.collector.aggregate(self.cfg, weights, order=order, group=self.group)
        except Exception as e:  # noqa: BLE001 - keep serving; the round stays open for more updates
            log.error("round %d: the pipeline failed on %d updates: %s", self.round, len(ids), e,
                      extra={"event": "aggregate_failed", "round": self.round})
            self._failed_at = len(ids)
            self._persist_deferred()
            return
        # The updates are spent: their receive buffers go back to the pool, and the new model
        # is written into one of them on a CPU server (its pages are faulted in already). Never
        # into the old model's buffer: MODEL frames still queued keep referencing it. The
        # aggregate comes back from the server's device once, straight into that buffer.
        self._drop_accepted()
        prev_model = self.model
        failed = self._move_model(agg)
        del agg
        t_agg = time.monotonic() - t0
        excluded = [ids[i] for i in info.excluded]
        if info.selected is not None:
            chosen = {int(i) for i in info.selected}
            excluded += [ids[i] for i in range(len(ids)) if i not in chosen]
        record = self._record(reason, ids, failed, left_out)
        if self.buffered:  # each accepted update's version, staleness and weight, in the order of "accepted"
            record.update({"bases": [e["base"] for e in entries], "staleness": [e["staleness"] for e in entries],
                           "scales": [e["scale"] for e in entries]})
        record.update({"excluded_by_rule": sorted(set(excluded)), "aggregate_seconds": t_agg,
                       "last_byte_to_model_seconds": time.monotonic() - self._last_byte if self._last_byte else None,
                       "receive_seconds": self._last_byte - self._first_byte if self._last_byte else None,
                       "privacy": None if info.privacy is None else info.privacy.as_dict()})
        if self.gate is not None:
            scores = _scores(info, len(ids))
            published = None
            if failed is None:
                address_of = dict(zip(ids, addresses))
                try:
                    run = self._run(info, weights, record.get("bases"), record.get("scales"))
                    published = self.gate.record(self.model, prev_model, addresses, scores,
                                                 [address_of[i] for i in set(excluded)], run)
                except Exception as e:  # noqa: BLE001 - the round stands; its record is missing and says so
                    record["ledger_error"] = str(e)
                    log.error("round %d: recording on the ledger failed: %s", self.round, e,
                              extra={"event": "ledger_error", "round": self.round})
            record["ledger"] = {"seconds": self.gate.cost.seconds, "hash_seconds": self.gate.cost.hash_seconds,
                                "gas": dict(self.gate.cost.gas), "call_seconds": dict(self.gate.cost.call_seconds),
                                "calls": self.gate.cost.calls, "addresses": addresses, "scores": scores,
                                "published": published}
        self._next_round(record)

    def _move_model(self, agg) -> Optional[str]:
        """model += server_lr * agg, unless that is not finite (then the model stays; returns why)."""
        new_model = self.buffers.spare(agg, self.model)
        self.device.to_host(agg, new_model)
        with np.errstate(over="ignore", invalid="ignore"):  # checked right below
            if self.cfg.server_lr != 1.0:
                new_model *= np.float32(self.cfg.server_lr)
            new_model += self.model
        finite = not _core.nonfinite_rows([new_model])[0]
        if self.group is not None:  # one shard's overflow keeps the model on every shard
            finite = self.group.all(finite)
        if not finite:  # e.g. finite but huge updates overflowing the sum
            failed = "the aggregate is not finite: the model is kept (set clip_norm)"
            log.error("round %d: %s", self.round, failed, extra={"event": "aggregate_failed", "round": self.round})
            return failed
        if self.buffered:  # downloads of recent versions in progress finish (uploads built on them count)
            self._old_models[self.round] = self.model
            self._old_models.pop(self.round - self.cfg.max_staleness, None)
        self.model = new_model
        return None

    # ---------------------------------------------------------------- secure rounds
    def _start_secure_round(self) -> None:
        if self.cfg.secure is None:
            return
        from ..rules import RULES as SPECS

        self.secure = SecureRound(
            self.cfg.secure, d=self.d, round=self.round, session=self.session, quorum=self.cfg.quorum,
            min_updates=self.cfg.min_updates, deadline=self.cfg.deadline,
            min_buckets=max(1, SPECS[self.cfg.rule].min_n(self.cfg.f)), started=self.round_started, send=self._send,
            reject=lambda rid, reason, detail, pid, seq: self._reject(rid, reason, detail, pid, self.round, seq=seq))
        self.phase = self.secure.phase

    def _secure_tick(self) -> None:
        now = time.monotonic()
        self._sweep(now)
        before = self.secure.phase
        outcome = self.secure.tick(now)
        self.phase = self.secure.phase
        if before == "upload" and self.phase != "upload":  # masked inputs still streaming are too late
            for pid in list(self.uploads):
                self._abandon(pid)
        if outcome is None:
            return
        if outcome.failed is not None:
            self._close_without_model(outcome.failed)
            return
        self._close_secure(outcome)

    def _close_secure(self, out) -> None:
        """The rule over the bucket means (the mean: weighted by each bucket's survivors)."""
        from .. import aggregate

        t0 = time.monotonic()
        kw = dict(self.cfg.rule_params)
        if self.cfg.rule == "mean":
            kw["weights"] = np.array(out.counts, dtype=np.float64)
        ids = [pid for members in out.members for pid in members]
        try:
            agg, info = aggregate(out.means, self.cfg.rule, self.cfg.f, return_info=True, **kw)
        except Exception as e:  # noqa: BLE001 - the round closes without a model, and says why
            self._close_without_model(f"the rule failed on {len(out.counts)} bucket means: {e}", out.left_out)
            return
        self._drop_accepted()
        failed = self._move_model(np.ascontiguousarray(agg, dtype=np.float32))
        out_buckets = set(info.excluded)
        if info.selected is not None:
            chosen = {int(i) for i in info.selected}
            out_buckets |= {b for b in range(len(out.counts)) if b not in chosen}
        record = self._record("secure", ids, failed)
        self.excluded = dict(out.left_out)  # STATE tells each why it was left out
        record.update({"left_out": dict(out.left_out), "phases_ended": out.timeline, "excluded_by_rule": sorted(p for b in out_buckets for p in out.members[b]),
                       "aggregate_seconds": time.monotonic() - t0, "privacy": out.privacy,
                       "buckets": [{"members": m, "excluded_by_rule": b in out_buckets}
                                   for b, m in enumerate(out.members)]})
        self._next_round(record)

    def _run(self, info, weights, bases=None, scales=None) -> Dict[str, Any]:
        """How this round was aggregated, for the round's bundle (what an audit recomputes)."""
        dp = self.cfg.dp
        return {"rule": self.cfg.rule, "f": self.cfg.f,
                "rule_params": json.loads(json.dumps(self.cfg.rule_params, default=str)),
                "clip_norm": self.cfg.clip_norm, "server_lr": self.cfg.server_lr,
                "dp": None if dp is None else {"mechanism": type(dp).__name__, "repr": repr(dp)[:500]},
                "privacy": None if info.privacy is None else json.loads(json.dumps(info.privacy.as_dict(), default=str)),
                "stake_weighted": weights is not None, "streamed_mean": self.collector.kind == "fold",
                "weights": None if weights is None else [float(w) for w in weights],
                **({"mode": "buffered", "staleness": self.cfg.staleness, "max_staleness": self.cfg.max_staleness,
                    "bases": bases, "scales": scales} if self.buffered else {})}

    def _close_without_model(self, why: str, excluded: Optional[Dict[str, str]] = None) -> None:
        """The deadline passed and no model can be made: the round closes, the model stays, and says why.

        Updates accepted in it are dropped (each participant learns it from ROUND's and STATE's
        "previous": model_updated false) and the next round starts from the same model.
        """
        ids = [e["id"] for e in self.collector.entries]
        self._drop_accepted()
        log.warning("round %d closed without a new model: %s", self.round, why,
                    extra={"event": "round_failed", "round": self.round})
        self._next_round(self._record("deadline", ids, f"{why}: no new model", excluded))

    def _drop_accepted(self) -> None:
        """The round's accepted updates are spent: their bytes leave the budget, their buffers go to the pool."""
        if self.collector.keeps_updates:
            self.buffers.release(self.model_bytes * self.collector.count)
            self.buffers.recycle(self.collector.rows)
        self.collector.reset()
        self.accepted = {}

    def _record(self, reason: str, ids: List[str], failed: Optional[str],
                excluded: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        self.excluded = dict(excluded or {})
        return {"round": self.round, "closed_by": reason, "accepted": ids, "rejected": self.rejected,
                "excluded_by_shards": dict(self.excluded), "excluded_by_rule": [], "rule": self.cfg.rule,
                "f": self.cfg.f,
                "seconds": time.monotonic() - self.round_started, "aggregate_seconds": 0.0,
                "bytes_in": self.bytes_in, "abandoned_count": self.abandoned_count + len(self._ending_uploads()),
                "abandoned_uploads": sorted(set(self.abandoned) | set(self._ending_uploads()[:MAX_REJECTED_LISTED])),
                "privacy": None, "rejected_counts": dict(self.rejected_counts), "messages": dict(self.messages),
                "failed": failed, "device": self.device.name, "last_byte_to_model_seconds": None, "receive_seconds": None,
                "accepted_latency_ms": _percentiles(self._latencies),
                "model_updated": failed is None}

    def _ending_uploads(self) -> List[str]:
        """Uploads in progress that the round's end gives up: all of them, or in buffered mode those whose
        version becomes too stale with the next one (the others go on streaming into the next buffer)."""
        if not self.buffered:
            return list(self.uploads)
        oldest = self.round + 1 - self.cfg.max_staleness
        return [pid for pid, up in self.uploads.items() if up.base < oldest]

    def _next_round(self, record: Dict[str, Any]) -> None:
        """Report the closed round, reset the round's state and tell every connection."""
        log.info("round %d closed (%s): %d accepted, %d refusals, excluded by the rule: %s%s", self.round,
                 record["closed_by"], len(record["accepted"]), sum(self.rejected_counts.values()),
                 record["excluded_by_rule"], "" if record["model_updated"] else "; no new model",
                 extra={"event": "round_closed", "round": self.round})
        self.history.append(record)
        self.rounds_done += 1
        try:
            if self.store:
                self.store.append_metrics(record)
            if self.on_round is not None:
                self.on_round(record)
        except Exception as e:  # noqa: BLE001 - a metrics sink must not stop the rounds
            log.error("round %d: reporting failed: %s", self.round, e, extra={"event": "report_failed"})
        self.previous = {"round": self.round, "model_updated": record["model_updated"],
                         "closed_by": record["closed_by"], "accepted": len(record["accepted"])}
        ending = self._ending_uploads()
        self.round += 1
        self._failed_at = -1
        for pid in ending:  # unfinished uploads are over: their buffers go back to the pool
            self._free(self.uploads.pop(pid))
        if self.buffered:
            self._forget_stale_bases()
            self._model_crcs = {r: c for r, c in self._model_crcs.items() if r >= self.round - self.cfg.max_staleness}
        else:
            self._model_crcs = {}
        self.rejected, self.rejected_counts, self.abandoned, self.abandoned_count = [], {}, {}, 0
        self._latencies = []
        self.messages = {}
        self.bytes_in = 0
        self._first_byte = self._last_byte = 0.0
        if self.store:
            self.store.save_round(self.round, self.model, self._extra())
        self._ack_deferred(self.round - 1)  # the closed round's last updates are durable now
        self.round_started = time.monotonic()
        if self.cfg.rounds is None or self.rounds_done < self.cfg.rounds:  # no chain round that never runs
            self._start_ledger_round()
            self._start_secure_round()
        if self.buffered:  # no broadcast: participants ask for versions when they want one (STATUS)
            parked, self._parked = self._parked, {}
            for rid, peer, head, body, first in parked.values():  # in arrival order; a full buffer parks again
                self._commit(rid, peer, head, body, first)
            return
        note = json_message(Kind.ROUND, {"round": self.round, "previous": self.previous}, round=self.round,
                            session=self.session)
        for peer in self.peers:
            self._send(peer.routing_id, note)


def _percentiles(seconds: List[float]) -> Optional[Dict[str, float]]:
    """p50, p99 and max of `seconds`, in milliseconds, and how many (None if none)."""
    if not seconds:
        return None
    ms = np.asarray(seconds) * 1e3
    return {"p50": float(np.percentile(ms, 50)), "p99": float(np.percentile(ms, 99)), "max": float(ms.max()),
            "n": int(ms.size)}


def _scores(info, n: int) -> List[int]:
    """Each accepted update's score for the round record: its weight in the aggregate x 1e6
    (selection rules: 1e6 if selected, 0 if not; coordinate-wise rules: 1e6 each)."""
    from ..ledger.gate import SCORE_SCALE

    if info.weights is not None:
        return [int(round(float(w) * SCORE_SCALE)) for w in np.nan_to_num(info.weights)]
    if info.selected is not None:
        chosen = {int(i) for i in info.selected}
        return [SCORE_SCALE if i in chosen else 0 for i in range(n)]
    return [SCORE_SCALE] * n
