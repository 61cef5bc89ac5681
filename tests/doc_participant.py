"""A participant's wire code, written from docs/protocol.md alone: the helpers of the doc-only
conformance tests (test_protocol_conformance.py, test_buffered_conformance.py).

It uses only the standard library, numpy and pyzmq and never imports fedagg: the server under
test runs as a subprocess (``python -m fedagg serve``). Every wait is bounded by a timeout and
every loop by a count.
"""

import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import zmq

# ----------------------------------------------------------------------------------------
# Wire format (docs/protocol.md, "Header")

HEADER = struct.Struct("<4sBBBBIIQQQQIIQ")
FIELDS = ("magic", "version", "kind", "dtype", "codec", "length", "aux", "round", "seq",
          "offset", "total", "checksum", "reserved", "session")
assert HEADER.size == 64

VERSION = 2  # "Header": version `2`
HELLO, GET_MODEL, CHUNK, COMMIT, HEARTBEAT, STATUS = 1, 2, 3, 4, 5, 6
STATE, MODEL, CREDIT, ACCEPTED, REJECTED, ROUND = 10, 11, 12, 13, 14, 15
KIND_NAMES = {1: "HELLO", 2: "GET_MODEL", 3: "CHUNK", 4: "COMMIT", 5: "HEARTBEAT",
              6: "STATUS", 10: "STATE", 11: "MODEL", 12: "CREDIT", 13: "ACCEPTED",
              14: "REJECTED", 15: "ROUND"}

CHUNK_MIB = "0.00390625"  # 4 KiB, the smallest chunk_bytes the document allows
CHUNK_BYTES = 4096
RECV_TIMEOUT = 10.0


# ----------------------------------------------------------------------------------------
# CRC32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven, pure Python

def _crc_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC_TABLE = _crc_table()


def crc32c(data):
    c = 0xFFFFFFFF
    table = _CRC_TABLE
    for b in bytes(data):
        c = table[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


# ----------------------------------------------------------------------------------------
# A participant

class Msg:
    def __init__(self, header, payload):
        self.h = header
        self.payload = payload

    @property
    def kind(self):
        return self.h["kind"]

    def json(self):
        return json.loads(self.payload.decode("utf-8"))

    def __repr__(self):
        body = self.payload[:200] if self.kind not in (MODEL,) else b"<model bytes>"
        return f"<{KIND_NAMES.get(self.kind, self.kind)} {self.h} {body!r}>"


_OPEN_SOCKETS = []  # closed by the ctx fixture


class Peer:
    """One DEALER connection speaking the protocol."""

    def __init__(self, ctx, endpoint, pid=None, secret=None, seq=None):
        self.sock = ctx.socket(zmq.DEALER)
        _OPEN_SOCKETS.append(self.sock)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.pid = pid
        self.secret = secret
        # "Start from a clock ... and add 1 per message."
        self.seq = time.time_ns() if seq is None else seq
        self.backlog = []  # received messages not consumed yet
        self.rounds = []  # every ROUND message received
        self.session = None
        self.state = None

    def close(self):
        self.sock.close(0)

    def next_seq(self):
        self.seq += 1
        return self.seq

    def send(self, kind, payload=b"", *, round=0, offset=0, total=0, aux=0, dtype=0,
             codec=0, session=0, seq=None, checksum=None, extra_frames=(), version=VERSION):
        if seq is None:
            seq = self.next_seq()
        payload = bytes(payload)
        crc = crc32c(payload) if checksum is None else checksum
        header = HEADER.pack(b"FAGW", version, kind, dtype, codec, len(payload), aux, round, seq,
                             offset, total, crc, 0, session)
        self.sock.send_multipart([header, payload, *extra_frames])
        return seq

    def _recv_one(self, timeout):
        if not self.sock.poll(max(0, int(timeout * 1000))):
            return None
        frames = self.sock.recv_multipart()
        assert len(frames) == 2, f"server message of {len(frames)} frames"
        assert len(frames[0]) == 64
        h = dict(zip(FIELDS, HEADER.unpack(frames[0])))
        payload = frames[1]
        assert h["magic"] == b"FAGW"
        if h["version"] != VERSION:  # "Versions": only a refusal of another version's message
            assert h["kind"] == REJECTED and json.loads(payload)["reason"] == "version", h
        assert h["kind"] in KIND_NAMES and h["kind"] >= 10, h
        assert h["length"] == len(payload), h
        assert h["checksum"] == crc32c(payload), h
        assert h["reserved"] == 0
        if h["kind"] != REJECTED:
            assert h["seq"] == 0, f"server message other than REJECTED with seq != 0: {h}"
        m = Msg(h, payload)
        if m.kind == ROUND:
            self.rounds.append(m)
        return m

    def recv(self, match, timeout=RECV_TIMEOUT):
        """The first message (kind or kinds or predicate) that matches; others wait in
        the backlog."""
        if isinstance(match, int):
            kinds = (match,)
            match = lambda m: m.kind in kinds  # noqa: E731
        elif isinstance(match, tuple):
            kinds = match
            match = lambda m: m.kind in kinds  # noqa: E731
        for i, m in enumerate(self.backlog):
            if match(m):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        for _ in range(100000):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            m = self._recv_one(left)
            if m is None:
                break
            if match(m):
                return m
            self.backlog.append(m)
        raise AssertionError(f"no matching message within {timeout} s; "
                             f"backlog: {self.backlog[-5:]}")

    def drain(self, timeout=0.3):
        """Receive whatever arrives within timeout into the backlog."""
        deadline = time.monotonic() + timeout
        for _ in range(100000):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            m = self._recv_one(left)
            if m is None:
                return
            self.backlog.append(m)

    def hello(self, expect_state=True):
        body = {"id": self.pid}
        if self.secret is not None:
            body["secret"] = self.secret
        seq = self.send(HELLO, json.dumps(body).encode())
        m = self.recv((STATE, REJECTED))
        if expect_state:
            assert m.kind == STATE, m
            self.session = m.h["session"]
            self.state = m.json()
        return seq, m

    def status(self):
        self.send(STATUS)
        m = self.recv((STATE, REJECTED))
        assert m.kind == STATE, m
        self.session = m.h["session"]
        self.state = m.json()
        return m


def is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


def check_rejected(m, reason, seq):
    """A REJECTED with this reason; its header seq is the refused message's seq."""
    assert m.kind == REJECTED, m
    body = m.json()
    assert body["reason"] == reason, body
    assert isinstance(body["detail"], str)
    assert is_int(body["held"]) and body["held"] >= 0
    assert is_int(body["seq"])
    assert m.h["seq"] == seq, (m.h, seq)
    assert body["seq"] == m.h["seq"]
    return body


def raw(update):
    return np.ascontiguousarray(update, dtype="<f4").tobytes()




# ----------------------------------------------------------------------------------------
# The server under test

class Server:
    def __init__(self, proc, endpoint, info, stderr_path):
        self.proc = proc
        self.endpoint = endpoint
        self.info = info
        self.stderr_path = stderr_path
        self.lines = []

    def stderr(self):
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read()[-4000:].decode("utf-8", "replace")
        except OSError:
            return ""


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _read_line(proc, timeout):
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    try:
        for _ in range(10000):
            left = deadline - time.monotonic()
            if left <= 0:
                return None, buf
            if not sel.select(left):
                return None, buf
            piece = os.read(proc.stdout.fileno(), 1)
            if not piece:
                return None, buf
            buf += piece
            if piece == b"\n":
                return buf, b""
        return None, buf
    finally:
        sel.close()


@pytest.fixture
def ctx():
    c = zmq.Context()
    try:
        yield c
    finally:
        for _ in range(len(_OPEN_SOCKETS)):
            _OPEN_SOCKETS.pop().close(0)
        c.destroy(linger=0)


def serve_factory(tmp_path, procs, d_default, credits):
    """start(*serve_args, d=..., model=...) -> Server: `fedagg serve` on a free loopback port."""

    def start(*args, d=d_default, model=None):
        src = ["--d", str(d)]
        if model is not None:
            path = tmp_path / f"model{len(procs)}.npy"
            np.save(path, np.asarray(model, dtype=np.float32))
            src = ["--model", str(path)]
        for attempt in range(3):
            endpoint = f"tcp://127.0.0.1:{_free_port()}"
            err_path = tmp_path / f"server{len(procs)}.stderr"
            err = open(err_path, "wb")
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedagg", "serve", "--bind", endpoint, *src,
                 "--chunk-mib", CHUNK_MIB, "--credits", str(credits), *args],
                stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
            err.close()
            procs.append(proc)
            line, _ = _read_line(proc, 30.0)
            if line is not None:
                info = json.loads(line)
                assert "listening" in info, info
                server = Server(proc, endpoint, info, err_path)

                def pump():
                    for _ in range(100000):
                        out = proc.stdout.readline()
                        if not out:
                            return
                        server.lines.append(out)

                threading.Thread(target=pump, daemon=True).start()
                return server
            proc.kill()
            proc.wait(5)
            msg = err_path.read_text(errors="replace")[-3000:]
            if attempt == 2:
                raise AssertionError(f"server did not start: {msg}")
        raise AssertionError("unreachable")

    return start


def stop_servers(procs):
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


