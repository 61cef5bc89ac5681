"""A participant: fetch the global model, submit an update, follow the rounds.

>>> c = fedagg.Client("tcp://127.0.0.1:5555", "alice")            # doctest: +SKIP
>>> rnd, model = c.model()                                         # doctest: +SKIP
>>> c.submit(model_update, rnd)                                    # doctest: +SKIP
{'round': 0, 'id': 'alice'}

The update streams in chunks under the server's credit window; a dropped
connection or a restarted server is resumed from the bytes the server says it
holds. Every wait is bounded by ``timeout``. Creating a Client sets glibc's malloc
trim and mmap thresholds for this process once (transport/malloc.py explains why;
setting MALLOC_TRIM_THRESHOLD_ in the environment keeps glibc's defaults).
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from ..compress.payload import Payload
from .malloc import keep_freed_memory
from .protocol import (Codec, Dtype, Kind, ProtocolError, endpoint_host, json_message, message, pack_frames, parse,
                       parse_json)


# Refusals a resumed upload recovers from ("unknown": the server restarted and forgot us).
_RESUMABLE = ("order", "session", "incomplete", "unknown")


class TransportError(RuntimeError):
    """The server refused an update or did not answer in time."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class Client:
    """A participant's connection to a server, or to every shard of a sharded server.

    A sharded server's STATE lists its shards (docs/protocol.md, "Sharded servers"): the Client
    then connects to each, downloads each shard's slice of the model, and streams each slice of
    an update to its shard in parallel (one thread per shard).
    """

    def __init__(self, endpoint: str, id: Optional[str] = None, *, server_key: Optional[bytes] = None,
                 public_key: Optional[bytes] = None, secret_key: Optional[bytes] = None, timeout: float = 30.0,
                 heartbeat: float = 2.0, address: Optional[str] = None, secure: bool = False,
                 _one_shard: bool = False):
        import zmq

        self.zmq = zmq
        keep_freed_memory()  # libzmq's per-message buffers stay faulted in (transport/malloc.py)
        if server_key is not None:
            if public_key is None or secret_key is None:
                raise ValueError("CURVE needs the participant's public and secret keys with the server key")
            if id is not None and id != (public_key.decode() if isinstance(public_key, bytes) else public_key):
                raise ValueError("with CURVE the participant id is its public key")
            id = public_key.decode() if isinstance(public_key, bytes) else public_key
        if not id:
            raise ValueError("a participant needs an id")
        self.endpoint, self.id, self.timeout = endpoint, id, float(timeout)
        self.secure = bool(secure)  # only ever submit through a secure round
        self.last_secure: Optional[Dict[str, Any]] = None  # the group and privacy of the last secure round
        self.address = address  # the ledger address, when the server admits by ledger and CURVE both
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        if ":" in endpoint_host(endpoint):  # an IPv6 address: libzmq connects IPv4 only unless told
            self.sock.setsockopt(zmq.IPV6, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, int(self.timeout * 1000))  # a full queue is a timeout, not a hang
        self.sock.setsockopt(zmq.SNDBUF, 8 << 20)  # two 4 MiB chunks in the kernel's socket buffer
        self.sock.setsockopt(zmq.RCVBUF, 8 << 20)
        ivl = int(heartbeat * 1000)
        self.sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        self.sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 5 * ivl)
        if server_key is not None:
            self.sock.curve_serverkey = server_key
            self.sock.curve_publickey = public_key
            self.sock.curve_secretkey = secret_key
        self.sock.connect(endpoint)
        self.seq = time.time_ns()  # strictly increasing across restarts of this participant
        self._busy_repeats = 0  # `busy` refusals in a row: the pause grows with them
        # Presented with every HELLO: a reconnection (ZeroMQ reconnects with a new identity) takes
        # over this participant's entry and upload; another connection claiming the id cannot.
        self.secret = os.urandom(16).hex()
        self._upload: Optional[Tuple[int, int, int]] = None  # (round, codec, total) of the upload the server holds
        self.state: Dict[str, Any] = {}
        self.shards: List["Client"] = []  # a sharded server: one connection per shard, in shard order
        try:
            self.hello()
            table = self.state.get("shards") or []
            if len(table) > 1 and not _one_shard:
                self._connect_shards(table, dict(server_key=server_key, public_key=public_key,
                                                 secret_key=secret_key, timeout=timeout, heartbeat=heartbeat,
                                                 address=address))
        except BaseException:
            self.close()
            raise

    def _connect_shards(self, table: List[Dict[str, Any]], kw: Dict[str, Any]) -> None:
        mine = self.state.get("shard")
        for i, entry in enumerate(table):
            if not (isinstance(entry, dict) and isinstance(entry.get("endpoint"), str)
                    and isinstance(entry.get("lo"), int) and isinstance(entry.get("hi"), int)):
                raise TransportError("protocol", f"STATE's shard {i} is not an endpoint and a range: {entry!r}")
        ranges = [(int(e["lo"]), int(e["hi"])) for e in table]
        d = self.state.get("d_total")
        if not (isinstance(d, int) and isinstance(mine, int) and 0 <= mine < len(table) and ranges[0][0] == 0
                and ranges[-1][1] == d and all(a[0] < a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
                and ranges[-1][0] < ranges[-1][1]):
            raise TransportError("protocol", f"the shards' ranges {ranges} do not cover the model's {d} values "
                                             f"in order (this is shard {mine!r})")
        self._ranges = ranges
        for i, entry in enumerate(table):
            self.shards.append(self if i == mine else Client(entry["endpoint"], self.id, _one_shard=True, **kw))

    def _each_shard(self, work) -> List[Any]:
        """work(shard index, client) on every shard at once; the first failure is raised, naming its shard."""
        results: List[Any] = [None] * len(self.shards)
        errors: List[Optional[BaseException]] = [None] * len(self.shards)

        def run(i):
            try:
                results[i] = work(i, self.shards[i])
            except BaseException as e:  # noqa: BLE001 - re-raised below, in the caller's thread
                errors[i] = e
        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(self.shards))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, e in enumerate(errors):
            if isinstance(e, TransportError):
                raise TransportError(e.reason, f"shard {i} ({self.shards[i].endpoint}): {e.detail}") from e
            if e is not None:
                raise e
        return results

    # ---------------------------------------------------------------- plumbing
    def close(self) -> None:
        for other in getattr(self, "shards", []):
            if other is not self:
                other.close()
        self.sock.close(0)
        self.ctx.term()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _next(self) -> int:
        self.seq += 1
        return self.seq

    def _send(self, frames) -> None:
        try:
            self.sock.send_multipart(frames, copy=False)
        except self.zmq.Again:
            raise TransportError("timeout", f"cannot send to {self.endpoint}: its queue is full") from None

    def _recv(self, deadline: float, until_round: Optional[int] = None):
        """The next server message before `deadline`, or None (also once a ROUND past `until_round` came)."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                return None
            frames = self.sock.recv_multipart(copy=False)
            try:
                head, body = parse(frames, 64 << 20)
            except ProtocolError:
                continue  # not from a fedagg server: ignore
            if head.kind == Kind.ROUND:
                if head.round > self.state.get("round", 0):  # a new round: nothing of ours is in it yet
                    self.state.update(accepted=False, held=0)
                self.state["round"] = max(self.state.get("round", 0), head.round)
                self.state["fresh_round"] = head.round
                try:
                    self.state["previous"] = parse_json(body).get("previous")
                except (ProtocolError, AttributeError):
                    pass
                if until_round is not None and head.round > until_round:
                    return None
                continue
            return head, body

    def _ask_state(self, kind: Kind, payload: Optional[dict] = None) -> Dict[str, Any]:
        for _ in range(3):  # after "unknown" (the server restarted): HELLO, then ask again
            try:
                return self._ask_state_once(kind, payload)
            except _Unknown:
                self._ask_state_once(Kind.HELLO, self._hello_body())
        raise TransportError("unknown", "the server keeps forgetting this participant")

    def _ask_state_once(self, kind: Kind, payload: Optional[dict]) -> Dict[str, Any]:
        deadline = time.monotonic() + self.timeout
        seq = self._next()
        frames = (json_message(kind, payload, seq=seq) if payload is not None else message(kind, b"", seq=seq))
        self._send(frames)
        while True:
            got = self._recv(deadline)
            if got is None:
                raise TransportError("timeout", f"no answer to {kind.name} from {self.endpoint}")
            head, body = got
            if head.kind == Kind.STATE:
                self.state.update(parse_json(body))
                return dict(self.state)
            if head.kind == Kind.REJECTED:
                r = parse_json(body)
                if head.seq != seq:
                    continue  # the refusal of an earlier message (a chunk in flight)
                if r.get("reason") == "unknown" and kind != Kind.HELLO:  # the server restarted
                    raise _Unknown()
                raise TransportError(r.get("reason", "rejected"), r.get("detail", ""))

    def _hello_body(self) -> Dict[str, Any]:
        body = {"id": self.id, "secret": self.secret}
        if self.address is not None:
            body["address"] = self.address
        return body

    def hello(self) -> Dict[str, Any]:
        return self._ask_state(Kind.HELLO, self._hello_body())

    def status(self) -> Dict[str, Any]:
        return self._ask_state(Kind.STATUS)

    def heartbeat(self) -> None:
        for c in self.shards or [self]:
            c._send(message(Kind.HEARTBEAT, b"", seq=c._next()))

    # ---------------------------------------------------------------- the model
    def model(self) -> Tuple[int, np.ndarray]:
        """(round, global model) of the server's current round (a sharded server's slices, joined)."""
        for _ in range(5):
            if not self.shards:
                got = self._model_once()
            else:
                parts = self._each_shard(lambda i, c: c._model_once())
                rounds = {p[0] for p in parts if p is not None}
                got = None
                if None not in parts and len(rounds) == 1:
                    got = rounds.pop(), np.concatenate([p[1] for p in parts])
            if got is not None:
                return got
        raise TransportError("round", "rounds kept closing during the model download")

    def _model_once(self) -> Optional[Tuple[int, np.ndarray]]:
        st = self.status()
        rnd, total, step, window = st["round"], st["model_bytes"], st["chunk_bytes"], st["credits"]
        out = np.empty(total // 4, dtype=np.float32)
        dst = out.view(np.uint8)
        off = 0
        while off < total:
            self._send(message(Kind.GET_MODEL, b"", round=rnd, offset=off, aux=window, seq=self._next()))
            want = min(total, off + window * step)
            deadline = time.monotonic() + self.timeout
            while off < want:
                got = self._recv(deadline)
                if got is None:
                    raise TransportError("timeout", "model download stalled")
                head, body = got
                if head.kind == Kind.REJECTED:
                    r = parse_json(body)
                    if r.get("reason") == "round":  # a new round started meanwhile: start over
                        return None
                    raise TransportError(r.get("reason", "rejected"), r.get("detail", ""))
                if head.kind != Kind.MODEL or head.round != rnd or head.offset != off or head.total != total:
                    continue
                dst[off:off + head.length] = np.frombuffer(body, dtype=np.uint8)
                off += head.length
        return rnd, out

    def wait_round(self, after: int, timeout: Optional[float] = None) -> int:
        """Block until the server is past round `after`; returns the current round.

        Whether the closed round moved the model is in ``self.state["previous"]`` afterwards
        (``model_updated``: a round that reached its deadline with too few updates keeps the model).
        """
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while time.monotonic() < deadline:
            if self.state.get("round", -1) > after:
                return self.state["round"]
            # the ROUND notice wakes us as soon as it is in; STATUS each second in case it was lost
            self._recv(min(deadline, time.monotonic() + 1.0), until_round=after)
            if self.state.get("round", -1) <= after and self.status()["round"] > after:
                return self.state["round"]
        raise TransportError("timeout", f"round {after} did not end in time")

    # ---------------------------------------------------------------- submitting
    def wait_phase(self, phase: str = "upload", timeout: Optional[float] = None) -> Dict[str, Any]:
        """Poll STATUS until the server's round is in `phase` (a ledger round starts with "commit")."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            st = self.status()
            if st.get("phase", "upload") == phase:
                return st
            if time.monotonic() > deadline:
                raise TransportError("timeout", f"the round did not reach its {phase} phase")
            time.sleep(0.1)

    def submit(self, update: Any, round: Optional[int] = None, *, chunk_delay: float = 0.0,
               signature: Optional[bytes] = None) -> Dict[str, Any]:
        """Stream `update` (float32 vector, or a fedagg.compress.Payload) for `round`; returns ACCEPTED's JSON.

        `signature`: for a ledger-validated server, the Ed25519 signature of (round, SHA-256 of the
        uploaded bytes) by the registered key (fedagg.ledger.LedgerParticipant.commit gives it); the
        upload waits for the round's commit phase to end. Raises TransportError with the server's
        reason if it is refused. A sharded server gets each range from its own thread, and the
        update is in the round if every shard accepted its range. A buffered server
        (``state["mode"] == "buffered"``) takes an update computed on any of its last
        ``max_staleness + 1`` model versions: `round` is the version (from ``model()``) it was
        computed on, and ACCEPTED says which version's buffer took it and with what weight.
        """
        if self.state.get("secure"):
            if isinstance(update, Payload) or signature is not None:
                raise TypeError("a secure round takes a raw float32 update (no compressed payload, no ledger "
                                "signature): the participant encodes and masks it itself")
            from .secure_client import submit_secure

            return submit_secure(self, update, round)
        if self.secure:
            raise TransportError("secure", f"{self.endpoint} runs plain rounds; this client was made with "
                                           "secure=True and sends no update in the clear")
        if self.shards:
            return self._submit_sharded(update, round, chunk_delay, signature)
        return self._submit_one(update, round, chunk_delay, signature)

    def _submit_sharded(self, update, round, chunk_delay, signature) -> Dict[str, Any]:
        if isinstance(update, Payload) or signature is not None:
            raise TypeError("a sharded server takes raw float32 updates from fedagg.Client (no compressed payload, "
                            "no ledger signature)")
        arr = np.ascontiguousarray(np.asarray(update), dtype=np.float32).reshape(-1)
        if arr.size != self._ranges[-1][1]:
            raise ValueError(f"the update has {arr.size} values, the model {self._ranges[-1][1]}")
        rnd = self.status()["round"] if round is None else int(round)
        self._each_shard(lambda i, c: c._submit_one(arr[self._ranges[i][0]:self._ranges[i][1]], rnd, chunk_delay,
                                                    None))
        return {"round": rnd, "id": self.id, "shards": len(self.shards)}

    def _submit_one(self, update: Any, round: Optional[int], chunk_delay: float,
                    signature: Optional[bytes]) -> Dict[str, Any]:
        if isinstance(update, Payload):
            blob = np.frombuffer(pack_frames(update.to_frames()), dtype=np.uint8)
            codec, dtype = Codec.FAGP, Dtype.NONE
        else:
            arr = np.ascontiguousarray(np.asarray(update), dtype=np.float32).reshape(-1)
            blob, codec, dtype = arr.view(np.uint8), Codec.RAW, Dtype.FLOAT32
        rnd = self.status()["round"] if round is None else int(round)
        return self._send_update(blob, codec, dtype, rnd, chunk_delay, signature)

    def _send_update(self, blob: np.ndarray, codec: Codec, dtype: Dtype, rnd: int, chunk_delay: float,
                signature: Optional[bytes]) -> Dict[str, Any]:
        """Stream the bytes of blob as the update of round rnd, resuming until ACCEPTED or a refusal."""
        total = blob.size
        attempts, backoff = 0, 0.5
        busy_until = time.monotonic() + 20 * self.timeout  # refusals `busy` are waited out this long at most
        while True:
            attempts += 1
            if attempts > 20:
                raise TransportError("gave up", "too many resumptions")
            # The first attempt goes by what the last STATE and ROUND said when they name this round (no
            # round trip): if the server holds something else (bytes, another phase or session), its
            # first refusal says so.
            fresh = attempts == 1 and "session" in self.state and self.state.get("round") == rnd
            st = dict(self.state) if fresh else self.status()
            if st.get("phase") == "finished":
                raise TransportError("finished", "the server ran its last round; it takes no more updates")
            if st.get("phase", "upload") != "upload":
                st = self.wait_phase("upload")
            if st.get("mode") == "buffered":  # any of the last max_staleness + 1 versions is taken
                if rnd > st["round"]:
                    raise TransportError("future", f"the server's model is version {st['round']}, this update is "
                                                   f"computed on {rnd}")
                if rnd < st["round"] - st["max_staleness"]:
                    raise TransportError("stale", f"the server's model is version {st['round']}; an update computed "
                                                  f"on {rnd} is older than max_staleness {st['max_staleness']}")
                done = st.get("last_base") is not None and st["last_base"] >= rnd
            elif st["round"] != rnd:
                raise TransportError("late", f"the server is in round {st['round']}, this update is for {rnd}")
            else:
                done = st.get("accepted")
            if done:
                if attempts > 1:  # our COMMIT got through; its answer was lost
                    return {"round": rnd, "id": self.id}
                raise TransportError("duplicate", "already accepted this round")
            if (rnd, int(codec), total) != self._upload:  # what the server holds is another upload
                st = dict(st, held=0)
            self._upload = (rnd, int(codec), total)
            try:
                if not fresh and st.get("busy") and not st.get("held"):  # STATE says full: no bytes sent yet
                    raise _Busy(float(st["busy"]), self._busy_repeats)
                accepted = self._stream(blob, total, rnd, codec, dtype, st, chunk_delay, signature)
                self._busy_repeats = 0
                return accepted
            except _Busy as busy:  # the server is full: wait what it asked (jittered, growing), then try again
                attempts -= 1  # a wait, not a failed attempt: bounded by busy_until instead
                pause = busy.retry_after if busy.retry_after is not None else backoff
                pause = min(pause * (1 + busy.repeats / 4), 10.0) * random.uniform(0.5, 1.5)
                if time.monotonic() + pause > busy_until:
                    raise TransportError("busy", f"the server stayed busy for {20 * self.timeout:.0f} s") from None
                self._busy_repeats += 1
                backoff = min(2 * backoff, 8.0)
                time.sleep(pause)
            except _Resume:
                continue

    def _stream(self, blob, total, rnd, codec, dtype, st, chunk_delay, signature) -> Dict[str, Any]:
        step, window, session = st["chunk_bytes"], st["credits"], st["session"]
        off = st["held"] if st["held"] <= total else 0
        inflight, committed = 0, False
        first_seq = self.seq + 1  # refusals of earlier messages (a previous attempt) are stale
        deadline = time.monotonic() + self.timeout
        while True:
            while off < total and inflight < window:
                part = blob[off:off + step]
                self._send(message(Kind.CHUNK, part, round=rnd, offset=off, total=total, seq=self._next(),
                                   dtype=dtype, codec=codec, session=session))
                off += part.size
                inflight += 1
                if chunk_delay:
                    time.sleep(chunk_delay)
            if off >= total and inflight == 0 and not committed:
                proof = b"" if signature is None else json.dumps({"signature": bytes(signature).hex()}).encode()
                self._send(message(Kind.COMMIT, proof, round=rnd, total=total, seq=self._next(), session=session))
                committed = True  # now waiting for the verdict
            got = self._recv(deadline)
            if got is None:
                raise _Resume()  # nothing heard: ask where the server stands
            head, body = got
            deadline = time.monotonic() + self.timeout
            if head.kind == Kind.CREDIT:
                inflight = max(0, inflight - head.aux)
            elif head.kind == Kind.ACCEPTED:
                return parse_json(body)
            elif head.kind == Kind.REJECTED:
                r = parse_json(body)
                if 0 < head.seq < first_seq:
                    continue
                if r.get("reason") == "busy":
                    ra = r.get("retry_after")
                    ok = isinstance(ra, (int, float)) and not isinstance(ra, bool) and 0 < ra <= 60
                    raise _Busy(float(ra) if ok else None, self._busy_repeats)
                if r.get("reason") in _RESUMABLE or r.get("reason") in ("checksum", "phase"):
                    raise _Resume()
                raise TransportError(r.get("reason", "rejected"), r.get("detail", ""))


class _Unknown(Exception):
    """The server does not know this connection (it restarted): say HELLO again."""


class _Resume(Exception):
    """Resynchronize with the server's STATE and continue the upload."""


class _Busy(_Resume):
    """The server cannot take the upload now: wait (about retry_after seconds), then resynchronize."""

    def __init__(self, retry_after: Optional[float], repeats: int):
        super().__init__()
        self.retry_after, self.repeats = retry_after, repeats
