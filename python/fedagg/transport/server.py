"""The aggregation server: a ZeroMQ ROUTER that runs rounds.

Each round the server publishes the global model; participants fetch it in
chunks, train, and stream their update back in chunks that are written
straight into a preallocated buffer per participant (no whole-update copy).
The round closes at a quorum of accepted updates, or at the deadline once
``min_updates`` are in; the pipeline (decode -> checks -> clip -> robust rule
-> noise) aggregates, the model moves by the aggregate, and the next round
starts. Every refusal is logged and counted with its reason; the loop never
stops for a bad message. See docs/protocol.md for the messages.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from .. import _core
from .malloc import keep_freed_memory
from .protocol import (DEFAULT_CHUNK, HEADER, Codec, Dtype, Kind, ProtocolError, json_message, message, parse,
                       parse_json, unpack_frames)
from .state import RoundStore

log = logging.getLogger("fedagg.server")

MAX_ID = 128
MAX_REJECTED_LISTED = 1000  # refusals listed per round (all are counted by reason)


def is_local(endpoint: str) -> bool:
    """Loopback TCP or ipc/inproc: the only places plain (unauthenticated) mode is allowed by default."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class ServerConfig:
    """How the server runs rounds. Sizes in bytes, times in seconds."""

    bind: str = "tcp://127.0.0.1:5555"
    rule: str = "mean"
    f: int = 0
    rule_params: Dict[str, Any] = field(default_factory=dict)
    quorum: int = 1  # close the round once this many updates are accepted
    deadline: float = 60.0  # ... or this long after the round started, with >= min_updates
    min_updates: int = 1
    rounds: Optional[int] = None  # stop after this many rounds (None: run until stopped)
    server_lr: float = 1.0  # model += server_lr * aggregate
    clip_norm: Optional[float] = None
    dp: Any = None  # fedagg.privacy.CentralDP
    chunk_bytes: int = DEFAULT_CHUNK
    credits: int = 8  # chunks a participant may have in flight
    max_peers: int = 1024  # connections held at once (memory: max_peers x model size at most)
    rate: float = 5000.0  # messages per second per connection (token bucket, burst = rate)
    state_dir: Optional[str] = None
    curve_secret_key: Optional[bytes] = None  # z85; with it, CURVE is on
    curve_public_key: Optional[bytes] = None
    allowed_keys: Optional[List[bytes]] = None  # z85 public keys of participants
    insecure: bool = False  # allow plain mode on a non-local endpoint (never by default)
    heartbeat: float = 2.0  # ZMTP heartbeat interval; a peer silent for 5 intervals is dropped
    io_threads: Optional[int] = None  # libzmq I/O threads; None: one per 4 cores, 1 to 4 (about 1 GB/s each)
    ledger: Any = None  # fedagg.ledger.LedgerGate: registered, staked, committed, signed updates only
    admission: Optional[str] = None  # "federated", "ledger" or "both" (default: "ledger" with a ledger)

    def check(self) -> None:
        if self.chunk_bytes < 4096 or self.chunk_bytes > (4 << 20) or self.chunk_bytes % 4:
            raise ValueError("chunk_bytes must be a multiple of 4 in [4 KiB, 4 MiB]")
        if self.io_threads is None:
            self.io_threads = max(1, min(4, (os.cpu_count() or 1) // 4))
        for name in ("quorum", "min_updates", "credits", "max_peers", "io_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.deadline <= 0 or self.rate <= 0:
            raise ValueError("deadline and rate must be positive")
        if self.rounds is not None and self.rounds < 1:
            raise ValueError("rounds must be >= 1")
        if self.curve_secret_key is None and not self.insecure and not is_local(self.bind):
            raise ValueError(f"{self.bind} is not a loopback or ipc endpoint: CURVE keys are required "
                             "(fedagg keys generate), or pass insecure=True knowingly")
        if (self.curve_secret_key is None) != (self.curve_public_key is None):
            raise ValueError("give both the server's CURVE secret and public key")
        if self.admission is None:
            self.admission = "federated" if self.ledger is None else "ledger"
        if self.admission not in ("federated", "ledger", "both"):
            raise ValueError(f"admission must be 'federated', 'ledger' or 'both', got {self.admission!r}")
        if (self.admission != "federated") != (self.ledger is not None):
            raise ValueError("admission 'ledger' and 'both' need a ledger (fedagg.ledger.LedgerGate), "
                             "'federated' takes none")
        if self.admission == "both" and self.curve_secret_key is None:
            raise ValueError("admission 'both' needs CURVE keys and an allow-list")
        if self.min_updates > self.quorum:
            raise ValueError("min_updates must be <= quorum")
        # The pipeline must work on the smallest round the server may close: try it now,
        # on zeros, rather than fail at the first close.
        from .. import aggregate

        kw = dict(self.rule_params)
        if self.clip_norm is not None:
            kw["clip_norm"] = self.clip_norm
        try:
            aggregate(np.zeros((self.min_updates, 4), dtype=np.float32), self.rule, self.f, **kw)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"the aggregation pipeline cannot run on {self.min_updates} updates: {e}") from None
        if self.dp is not None:
            self.dp.check_weights(self.rule, None)


@dataclass
class Peer:
    routing_id: bytes
    pid: str
    key: str  # the authenticated CURVE key (z85), "" in plain mode
    tokens: float
    last_refill: float
    last_seen: float
    last_seq: int = -1
    address: Optional[str] = None  # the ledger address this participant speaks for


@dataclass
class Upload:
    codec: Codec
    buf: Any  # numpy uint8 view of the destination
    total: int
    received: int = 0
    finite: bool = True
    sha256: Any = None  # with a ledger: the running hash of the bytes received, chunk by chunk
    started: float = field(default_factory=time.monotonic)


class Server:
    """Runs rounds over ZeroMQ until ``config.rounds`` are done or ``stop()`` is called."""

    def __init__(self, model: np.ndarray, config: ServerConfig, *, on_round=None, progress=None):
        import zmq

        config.check()
        keep_freed_memory()  # libzmq's per-message buffers stay faulted in (transport/malloc.py)
        self.zmq = zmq
        self.cfg = config
        self.on_round = on_round  # called with each round's metrics record
        self.progress = progress  # e.g. observe.ProgressView: .update(server) a few times a second
        self._shown = 0.0
        self.store = RoundStore(config.state_dir) if config.state_dir else None
        self.session = int.from_bytes(os.urandom(8), "little") >> 1
        restored = self.store.load() if self.store else None
        if restored is not None:
            self.round, model, accepted = restored
            log.info("recovered round %d with %d accepted updates from %s", self.round, len(accepted),
                     config.state_dir, extra={"event": "recovered", "round": self.round})
        else:
            self.round, accepted = 0, []
            model = np.ascontiguousarray(model, dtype=np.float32).reshape(-1)
            if model.size == 0:
                raise ValueError("the model has no parameters")
        self.model = np.array(model, dtype=np.float32, copy=True)
        self.d = self.model.size
        self.model_bytes = self.d * 4
        self.accepted: Dict[str, np.ndarray] = dict(accepted)
        self.uploads: Dict[str, Upload] = {}
        self.reserved: Dict[str, np.ndarray] = {}  # pid -> a float32 buffer of d, faulted in at HELLO
        self.pool: List[np.ndarray] = []  # buffers of finished rounds, reused
        self.peers: Dict[bytes, Peer] = {}
        self.by_pid: Dict[str, bytes] = {}
        self.rejected: List[Dict[str, Any]] = []
        self.rejected_counts: Dict[str, int] = {}
        self.round_started = time.monotonic()
        self.bytes_in = 0
        self._failed_at = -1
        self.gate = config.ledger
        self.phase = "upload"  # with a ledger each round starts with a commit phase
        self._commit_poll = 0.0  # when to next ask the chain whether everyone has committed
        self.history: List[Dict[str, Any]] = []
        self._stop = False
        if self.store and restored is None:
            self.store.save_round(self.round, self.model)
        self.ctx = zmq.Context(io_threads=config.io_threads)
        self.auth = None
        self.sock = self._socket()

    # ---------------------------------------------------------------- sockets
    def _socket(self):
        zmq = self.zmq
        s = self.ctx.socket(zmq.ROUTER)
        s.setsockopt(zmq.MAXMSGSIZE, self.cfg.chunk_bytes + HEADER.size)
        s.setsockopt(zmq.RCVBUF, 2 * self.cfg.chunk_bytes)  # kernel socket buffers of two chunks
        s.setsockopt(zmq.SNDBUF, 2 * self.cfg.chunk_bytes)
        # Messages queued per peer: its credit window and a few control messages. A peer that
        # ignores its credits is not read further (libzmq stops reading its connection): at most
        # (credits + 16) chunks of memory per peer, not thousands.
        s.setsockopt(zmq.RCVHWM, self.cfg.credits + 16)
        s.setsockopt(zmq.SNDHWM, 1024)
        s.setsockopt(zmq.ROUTER_MANDATORY, 0)
        s.setsockopt(zmq.LINGER, 0)
        ivl = int(self.cfg.heartbeat * 1000)
        s.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        s.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5 * ivl)
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
        s.bind(self.cfg.bind)
        self.endpoint = s.getsockopt_string(zmq.LAST_ENDPOINT)
        return s

    def close(self) -> None:
        self.sock.close(0)
        if self.auth is not None:
            self.auth.stop()
        self.ctx.term()

    def stop(self) -> None:
        self._stop = True

    # ---------------------------------------------------------------- replies
    def _send(self, rid: bytes, frames: List[Any]) -> None:
        try:
            self.sock.send_multipart([rid, *frames], copy=False, flags=self.zmq.NOBLOCK)
        except self.zmq.Again:  # the peer's queue is full: it will ask again (STATUS)
            log.warning("send queue full, reply dropped", extra={"event": "send_dropped"})

    def _state(self, pid: Optional[str]) -> Dict[str, Any]:
        held = self.uploads[pid].received if pid in self.uploads else 0
        return {"round": self.round, "session": self.session, "d": self.d, "dtype": "float32", "phase": self.phase,
                "model_bytes": self.model_bytes, "chunk_bytes": self.cfg.chunk_bytes, "credits": self.cfg.credits,
                "held": held, "accepted": pid in self.accepted if pid else False}

    def _reject(self, rid: bytes, reason: str, detail: str = "", pid: Optional[str] = None, rnd: Optional[int] = None,
                record: bool = True, seq: int = 0) -> None:
        """Refuse one message; the reply names the refused message's seq (0 if it could not be parsed)."""
        log.info("rejected %s: %s %s", pid or rid.hex(), reason, detail,
                 extra={"event": "rejected", "participant": pid, "reason": reason, "round": self.round})
        if record:
            self.rejected_counts[reason] = self.rejected_counts.get(reason, 0) + 1
            if len(self.rejected) < MAX_REJECTED_LISTED:
                self.rejected.append({"id": pid, "reason": reason, "detail": detail, "round": rnd})
        self._send(rid, json_message(Kind.REJECTED, {"reason": reason, "detail": detail, "held": self._held(pid),
                                                     "seq": seq}, round=self.round, seq=seq, session=self.session))

    def _held(self, pid: Optional[str]) -> int:
        return self.uploads[pid].received if pid in self.uploads else 0

    # ---------------------------------------------------------------- the loop
    def serve(self) -> List[Dict[str, Any]]:
        """Run rounds; returns the per-round metrics."""
        zmq = self.zmq
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        target = None if self.cfg.rounds is None else self.cfg.rounds
        self.round_started = time.monotonic()  # the deadline and commit phase count from here, not __init__
        self._start_ledger_round()
        try:
            while not self._stop and (target is None or len(self.history) < target):
                if poller.poll(50):
                    for _ in range(256):  # bounded burst, then check the round
                        try:
                            frames = self.sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(frames)
                self._maybe_close()
                if self.progress is not None and time.monotonic() - self._shown > 0.25:
                    self._shown = time.monotonic()
                    self.progress.update(self)
        finally:
            if self.progress is not None:
                self.progress.close()
            self.close()
        return self.history

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
        if peer is not None:  # token bucket
            peer.tokens = min(self.cfg.rate, peer.tokens + (now - peer.last_refill) * self.cfg.rate)
            peer.last_refill = now
            if peer.tokens < 1:
                log.warning("rate limit: dropped a message from %s", peer.pid,
                            extra={"event": "rate_limited", "participant": peer.pid})
                return
            peer.tokens -= 1
            peer.last_seen = now
        try:
            head, body = parse(frames[1:], self.cfg.chunk_bytes, verify=False)
            if head.kind != Kind.CHUNK and _core.crc32c(body) != head.checksum:  # chunks: checked while copied
                raise ProtocolError("checksum mismatch")
        except ProtocolError as e:
            self._reject(rid, "malformed", str(e), peer.pid if peer else None, record=peer is not None)
            return
        if head.kind == Kind.HELLO:
            self._hello(rid, frames[1], head, body, now)
            return
        if peer is None:
            self._reject(rid, "unknown", "send HELLO first", record=False, seq=head.seq)
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
            self._get_model(rid, head)
        elif head.kind in (Kind.STATUS, Kind.HEARTBEAT):
            if head.kind == Kind.STATUS:
                self._send(rid, json_message(Kind.STATE, self._state(peer.pid), round=self.round,
                                             session=self.session))
        else:
            self._reject(rid, "malformed", f"{head.kind.name} is not sent by participants", peer.pid, seq=head.seq)

    def _hello(self, rid: bytes, head_frame, head, body, now: float) -> None:
        try:
            obj = parse_json(body)
            pid = obj["id"]
            if not isinstance(pid, str) or not 1 <= len(pid) <= MAX_ID or not pid.isprintable():
                raise ProtocolError(f"id must be 1..{MAX_ID} printable characters")
        except (ProtocolError, KeyError, TypeError) as e:
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
        if rid not in self.peers and len(self.peers) >= self.cfg.max_peers:
            self._drop_idle(now)
            if len(self.peers) >= self.cfg.max_peers:
                self._reject(rid, "busy", f"{self.cfg.max_peers} participants connected", record=False, seq=head.seq)
                return
        prev = self.peers.get(rid)
        if prev is not None and prev.pid != pid:  # a connection speaks for one participant at a time
            self.uploads.pop(prev.pid, None)
            self.reserved.pop(prev.pid, None)
            self.by_pid.pop(prev.pid, None)
        old = self.by_pid.get(pid)
        last_seq, tokens, refill = -1, self.cfg.rate, now
        if old is not None and old != rid and old in self.peers:  # reconnected: the new connection takes over
            gone = self.peers.pop(old)
            last_seq, tokens, refill = gone.last_seq, gone.tokens, gone.last_refill
        if prev is not None:  # a HELLO does not refill the rate limit
            last_seq, tokens, refill = max(last_seq, prev.last_seq), prev.tokens, prev.last_refill
        if head.seq <= last_seq:
            self._reject(rid, "replayed", f"seq {head.seq} <= {last_seq}", pid, record=False, seq=head.seq)
            return
        self.peers[rid] = Peer(rid, pid, key, tokens, refill, now, head.seq, address)
        self.by_pid[pid] = rid
        self._reserve(pid)
        log.info("hello from %s", pid, extra={"event": "hello", "participant": pid})
        self._send(rid, json_message(Kind.STATE, self._state(pid), round=self.round, session=self.session))

    def _reserve(self, pid: str) -> None:
        """A receive buffer for pid's raw update, its pages touched now, not while the update streams in.

        (First-touch page faults cost up to ~10 us per 4 KiB page on some VMs: far more
        than copying the bytes.) At most max_peers buffers exist at once.
        """
        if pid in self.reserved or pid in self.accepted or pid in self.uploads or self._buffers() >= self.cfg.max_peers:
            return
        buf = self.pool.pop() if self.pool else np.empty(self.d, dtype=np.float32)
        buf.view(np.uint8)[::4096] = 0  # one write per page faults it in
        self.reserved[pid] = buf

    def _address_of(self, pid: str) -> str:
        rid = self.by_pid.get(pid)
        peer = self.peers.get(rid) if rid is not None else None
        return peer.address if peer is not None and peer.address else pid

    def _buffers(self) -> int:
        """Receive buffers held for this round: reserved, uploading and accepted (at most max_peers)."""
        return len(self.reserved) + len(self.uploads) + len(self.accepted)

    def _drop_idle(self, now: float) -> None:
        for rid, p in list(self.peers.items()):
            if now - p.last_seen > 5 * self.cfg.heartbeat and p.pid not in self.uploads:
                del self.peers[rid]
                if self.by_pid.get(p.pid) == rid:
                    del self.by_pid[p.pid]

    def _get_model(self, rid: bytes, head) -> None:
        if head.round != self.round:
            self._reject(rid, "round", f"the model of round {self.round} is served, not {head.round}",
                         self.peers[rid].pid, head.round, record=False, seq=head.seq)
            return
        step = self.cfg.chunk_bytes
        if head.offset % step or head.offset >= self.model_bytes:
            self._reject(rid, "malformed", "GET_MODEL offset must be a chunk boundary inside the model",
                         self.peers[rid].pid, record=False, seq=head.seq)
            return
        view = memoryview(self.model).cast("B")  # all peers share this buffer: no per-peer copy
        count = max(1, min(int(head.aux), self.cfg.credits))
        for off in range(head.offset, min(self.model_bytes, head.offset + count * step), step):
            part = view[off:off + step]
            self._send(rid, message(Kind.MODEL, part, round=self.round, offset=off, total=self.model_bytes,
                                    dtype=Dtype.FLOAT32, session=self.session))

    def _chunk(self, rid: bytes, peer: Peer, head, body) -> None:
        pid = peer.pid
        if head.round != self.round:
            why = "late" if head.round < self.round else "future"
            self._reject(rid, why, f"round {head.round}, the server is in round {self.round}", pid,
                         head.round, seq=head.seq)
            return
        if head.session != self.session:
            self._reject(rid, "session", "the server restarted: resume from 'held'", pid, head.round,
                         record=False, seq=head.seq)
            return
        if self.phase != "upload":
            self._reject(rid, "phase", "commit your update on chain; uploads open after the commit phase", pid,
                         head.round, record=False, seq=head.seq)
            return
        if pid in self.accepted:
            self._reject(rid, "duplicate", "an update of this participant is already in the round", pid,
                         head.round, seq=head.seq)
            return
        if head.codec == Codec.RAW:
            if head.dtype != Dtype.FLOAT32 or head.total != self.model_bytes:
                self.uploads.pop(pid, None)
                self._reject(rid, "size", f"a raw update is {self.model_bytes} float32 bytes, got {head.total} "
                             f"bytes of {head.dtype.name}", pid, head.round, seq=head.seq)
                return
        elif head.total > self.model_bytes + (1 << 16):  # a compressed update is never bigger than raw
            self._reject(rid, "size", f"compressed update of {head.total} bytes exceeds the raw size", pid,
                         head.round, seq=head.seq)
            return
        up = self.uploads.get(pid)
        if up is None or up.codec != head.codec or up.total != head.total:
            if head.offset != 0:
                self._reject(rid, "order", "an upload starts at offset 0", pid, head.round, record=False, seq=head.seq)
                return
            if up is None and pid not in self.reserved and self._buffers() >= self.cfg.max_peers:
                self._reject(rid, "busy", f"{self.cfg.max_peers} updates held this round", pid, head.round,
                             seq=head.seq)
                return
            if head.codec == Codec.RAW:
                held = self.reserved.pop(pid, None)
                buf = (held if held is not None else np.empty(self.d, dtype=np.float32)).view(np.uint8)
            else:
                buf = np.empty(head.total, dtype=np.uint8)
            up = self.uploads[pid] = Upload(head.codec, buf, head.total)
            if self.gate is not None:
                up.sha256 = hashlib.sha256()
        if up.codec == Codec.RAW and head.length % 4:
            self._reject(rid, "malformed", "raw chunks hold whole float32 values", pid, head.round, seq=head.seq)
            return
        if head.offset != up.received:
            self._reject(rid, "order", f"expected offset {up.received}, got {head.offset}", pid, head.round,
                         record=False, seq=head.seq)
            return
        raw = up.codec == Codec.RAW
        crc, finite = _core.copy_crc32c(up.buf[up.received:up.received + head.length], body, raw)
        if crc != head.checksum:
            self._reject(rid, "checksum", f"chunk at offset {head.offset} is corrupt", pid, head.round,
                         record=False, seq=head.seq)  # not counted as received: the client resends it
            return
        up.finite = up.finite and finite  # raw float32: checked on the way in, no pass at COMMIT
        if up.sha256 is not None:  # hashed while the upload streams, not at COMMIT
            t0 = time.monotonic()
            up.sha256.update(body)
            self.gate.cost.hash_seconds += time.monotonic() - t0
        up.received += head.length
        self.bytes_in += head.length
        self._send(rid, message(Kind.CREDIT, b"", aux=1, offset=up.received, total=up.total, round=self.round,
                                session=self.session))

    def _ledger_check(self, peer: Peer, body, up: Upload) -> Optional[str]:
        """Registration, stake, signature and commitment of an uploaded update (None: admissible)."""
        try:
            sig = bytes.fromhex(parse_json(body)["signature"])
        except (ProtocolError, KeyError, TypeError, ValueError):
            return "signature"
        return self.gate.check(peer.address, up.sha256.digest(), sig)

    def _commit(self, rid: bytes, peer: Peer, head, body=b"") -> None:
        pid = peer.pid
        if head.round != self.round:
            self._reject(rid, "late" if head.round < self.round else "future",
                         f"round {head.round}, the server is in round {self.round}", pid, head.round, seq=head.seq)
            return
        if pid in self.accepted:
            self._reject(rid, "duplicate", "an update of this participant is already in the round", pid,
                         head.round, seq=head.seq)
            return
        up = self.uploads.get(pid)
        if up is None or up.received != up.total or head.session != self.session:
            self._reject(rid, "incomplete", f"holding {self._held(pid)} of {up.total if up else '?'} bytes", pid,
                         head.round, record=False, seq=head.seq)
            return
        del self.uploads[pid]
        if self.gate is not None:
            why = self._ledger_check(peer, body, up)
            if why:
                self._reject(rid, why, "the ledger does not vouch for this update", pid, head.round, seq=head.seq)
                return
        try:
            update = self._decode(up)
        except Exception as e:  # noqa: BLE001 - whatever a hostile payload makes a codec raise
            self._reject(rid, "payload", f"{type(e).__name__}: {e}"[:300], pid, head.round, seq=head.seq)
            return
        if not up.finite if up.codec == Codec.RAW else _core.nonfinite_rows([update])[0]:
            self._reject(rid, "nonfinite", "the update holds NaN or Inf", pid, head.round, seq=head.seq)
            return
        self.accepted[pid] = update
        if self.store:
            self.store.save_update(self.round, list(self.accepted), update)
        log.info("accepted %s", pid, extra={"event": "accepted", "participant": pid, "round": self.round})
        self._send(rid, json_message(Kind.ACCEPTED, {"round": self.round, "id": pid}, round=self.round,
                                     session=self.session))

    def _decode(self, up: Upload) -> np.ndarray:
        if up.codec == Codec.RAW:
            return up.buf.view(np.float32)
        from ..compress import Payload, decode

        p = Payload.from_frames(unpack_frames(memoryview(up.buf)))
        if p.d != self.d:
            raise ValueError(f"compressed update has d = {p.d}, the model has {self.d}")
        return decode(p)

    # ---------------------------------------------------------------- closing a round
    def _start_ledger_round(self) -> None:
        if self.gate is None:
            return
        self.phase = "commit"
        try:
            self.gate.start_round(self.round)
        except Exception as e:  # noqa: BLE001 - the chain is down: uploads cannot be verified yet
            log.error("round %d: the ledger could not open the round: %s", self.round, e,
                      extra={"event": "ledger_error", "round": self.round})

    def _maybe_close(self) -> None:
        if self.phase == "commit":
            now = time.monotonic()
            if now < self._commit_poll:  # the chain is asked at most every poll_seconds
                return
            self._commit_poll = now + self.gate.poll_seconds
            done = now - self.round_started >= self.gate.commit_seconds
            if not done:  # everyone committed: no need to wait the window out
                try:
                    done = self.gate.all_committed()
                except Exception as e:  # noqa: BLE001 - the chain hiccuped: the timer still ends the phase
                    log.warning("round %d: reading the commitments failed: %s", self.round, e,
                                extra={"event": "ledger_error", "round": self.round})
            if done:
                try:
                    self.gate.close_commits()
                    self.phase = "upload"
                    log.info("round %d: commit phase over, %d commitments", self.round,
                             len(self.gate.commitments or {}), extra={"event": "upload_phase", "round": self.round})
                except Exception as e:  # noqa: BLE001 - try again, after a pause
                    self._commit_poll = now + 1.0
                    log.error("round %d: closing the commit window failed: %s", self.round, e,
                              extra={"event": "ledger_error", "round": self.round})
            return
        n = len(self.accepted)
        if n == self._failed_at:  # the pipeline failed on exactly these updates: wait for more
            return
        late = time.monotonic() - self.round_started >= self.cfg.deadline
        if n >= self.cfg.quorum or (late and n >= self.cfg.min_updates):
            self._close_round(reason="quorum" if n >= self.cfg.quorum else "deadline")

    def _close_round(self, reason: str) -> None:
        from .. import aggregate

        t0 = time.monotonic()
        ids = list(self.accepted)
        rows = [self.accepted[i] for i in ids]
        kw = dict(self.cfg.rule_params)
        if self.cfg.dp is not None:
            kw["dp"] = self.cfg.dp
        elif self.cfg.clip_norm is not None:
            kw["clip_norm"] = self.cfg.clip_norm
        addresses = [self._address_of(i) for i in ids]
        if self.gate is not None and self.gate.stake_weighted:
            kw["weights"] = self.gate.weights(addresses)
        try:
            agg, info = aggregate(rows, self.cfg.rule, self.cfg.f, return_info=True, **kw)
        except Exception as e:  # noqa: BLE001 - keep serving; the round stays open for more updates
            log.error("round %d: the pipeline failed on %d updates: %s", self.round, len(ids), e,
                      extra={"event": "aggregate_failed", "round": self.round})
            self._failed_at = len(ids)
            return
        t_agg = time.monotonic() - t0
        # The updates are spent: their receive buffers go back to the pool, and the new model
        # is written into one of them (its pages are faulted in already). Never into the old
        # model's buffer: MODEL frames still queued keep referencing it.
        agg = np.asarray(agg, dtype=np.float32)
        self._recycle(rows)
        del rows
        new_model = self._spare(agg)
        with np.errstate(over="ignore", invalid="ignore"):  # checked right below
            if self.cfg.server_lr == 1.0:
                np.add(self.model, agg, out=new_model)
            else:
                np.multiply(agg, np.float32(self.cfg.server_lr), out=new_model)
                np.add(self.model, new_model, out=new_model)
        failed = None
        if _core.nonfinite_rows([new_model])[0]:  # e.g. finite but huge updates overflowing the sum
            failed = "the aggregate is not finite: the model is kept (set clip_norm)"
            log.error("round %d: %s", self.round, failed, extra={"event": "aggregate_failed", "round": self.round})
            self._recycle([new_model])
        else:
            self.model = new_model
        excluded = [ids[i] for i in info.excluded]
        if info.selected is not None:
            chosen = {int(i) for i in info.selected}
            excluded += [ids[i] for i in range(len(ids)) if i not in chosen]
        record = {
            "round": self.round, "closed_by": reason, "accepted": ids, "rejected": self.rejected,
            "excluded_by_rule": sorted(set(excluded)), "rule": self.cfg.rule, "f": self.cfg.f,
            "seconds": time.monotonic() - self.round_started, "aggregate_seconds": t_agg,
            "bytes_in": self.bytes_in, "abandoned_uploads": sorted(self.uploads),
            "privacy": None if info.privacy is None else info.privacy.as_dict(),
            "rejected_counts": dict(self.rejected_counts), "failed": failed,
        }
        if self.gate is not None:
            scores = _scores(info, len(ids))
            if failed is None:
                try:
                    self.gate.record(self.model, addresses, scores)
                except Exception as e:  # noqa: BLE001 - the round stands; its record is missing and says so
                    record["ledger_error"] = str(e)
                    log.error("round %d: recording on the ledger failed: %s", self.round, e,
                              extra={"event": "ledger_error", "round": self.round})
            record["ledger"] = {"seconds": self.gate.cost.seconds, "hash_seconds": self.gate.cost.hash_seconds,
                                "gas": dict(self.gate.cost.gas), "call_seconds": dict(self.gate.cost.call_seconds),
                                "calls": self.gate.cost.calls, "addresses": addresses, "scores": scores}
        log.info("round %d closed (%s): %d accepted, %d rejected, excluded by the rule: %s", self.round, reason,
                 len(ids), len(self.rejected), record["excluded_by_rule"],
                 extra={"event": "round_closed", "round": self.round})
        self.history.append(record)
        try:
            if self.store:
                self.store.append_metrics(record)
            if self.on_round is not None:
                self.on_round(record)
        except Exception as e:  # noqa: BLE001 - a metrics sink must not stop the rounds
            log.error("round %d: reporting failed: %s", self.round, e, extra={"event": "report_failed"})
        self.round += 1
        self._failed_at = -1
        # Unfinished uploads' buffers go back to the pool too; all are handed out again at the
        # participants' next HELLO or first chunk.
        self._recycle([u.buf.view(np.float32) for u in self.uploads.values() if u.codec == Codec.RAW])
        self.accepted, self.uploads, self.rejected, self.rejected_counts = {}, {}, [], {}
        for pid in list(self.by_pid):
            self._reserve(pid)
        self.bytes_in = 0
        if self.store:
            self.store.save_round(self.round, self.model)
        self.round_started = time.monotonic()
        if self.cfg.rounds is None or len(self.history) < self.cfg.rounds:  # no chain round that never runs
            self._start_ledger_round()
        note = json_message(Kind.ROUND, {"round": self.round}, round=self.round, session=self.session)
        for rid in list(self.peers):
            self._send(rid, note)

    def _recycle(self, arrays) -> None:
        """Receive buffers (float32 of d, owned by this server) back into the pool, each once."""
        for arr in arrays:
            if (arr.size == self.d and arr.dtype == np.float32 and arr.base is not None and arr.flags.writeable
                    and len(self.pool) < self.cfg.max_peers
                    and not any(np.may_share_memory(arr, b) for b in self.pool)):
                self.pool.append(arr)

    def _spare(self, avoid: np.ndarray) -> np.ndarray:
        """A float32 buffer of d for the next model: from the pool unless it overlaps `avoid`."""
        for i in range(len(self.pool) - 1, -1, -1):
            if not np.may_share_memory(self.pool[i], avoid) and not np.may_share_memory(self.pool[i], self.model):
                return self.pool.pop(i)
        return np.empty(self.d, dtype=np.float32)


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
