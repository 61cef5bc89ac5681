"""The ZeroMQ transport: protocol parsing, the server's rules, and rounds with real processes.

Servers bind to 127.0.0.1 on a free port; every wait is bounded.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from fedagg import _core, compress  # noqa: E402
from fedagg.transport import Client, Server, ServerConfig, TransportError  # noqa: E402
from fedagg.transport import participant  # noqa: E402
from fedagg.transport.protocol import (Codec, Dtype, Header, Kind, ProtocolError, json_message,  # noqa: E402
                                       message, pack_frames, parse, parse_json, unpack_frames)
from fedagg.transport.server import is_local  # noqa: E402
from helpers import Running, free_port  # noqa: E402


def join_cmd(endpoint, pid, behaviour="honest", rounds=1, **kw):
    cmd = [sys.executable, "-m", "fedagg", "join", "--connect", endpoint, "--id", pid, "--behaviour", behaviour,
           "--rounds", str(rounds), "--timeout", str(kw.pop("timeout", 20))]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def spawn(cmd, **kw):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def wait_for(pred, timeout=30.0, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# ---------------------------------------------------------------- the protocol
def test_message_roundtrip_and_checksum():
    payload = np.arange(1000, dtype=np.float32)
    frames = message(Kind.CHUNK, payload, round=3, seq=9, offset=4000, total=8000, dtype=Dtype.FLOAT32)
    head, body = parse(frames, 1 << 20)
    assert (head.kind, head.round, head.seq, head.offset, head.total, head.length) == (Kind.CHUNK, 3, 9, 4000, 8000,
                                                                                       4000)
    assert head.checksum == _core.crc32c(payload) and bytes(body) == payload.tobytes()
    assert parse_json(parse(json_message(Kind.HELLO, {"id": "a"}), 100)[1]) == {"id": "a"}


def test_crc32c_known_values():
    assert _core.crc32c(b"123456789") == 0xE3069283  # the CRC32C check value
    assert _core.crc32c(b"") == 0
    x = np.random.default_rng(0).integers(0, 256, 300_001, dtype=np.uint8)
    assert _core.crc32c(x[1000:], _core.crc32c(x[:1000])) == _core.crc32c(x)
    for n in (1, 7, 8, 9, 100, 30_000):
        assert _core.crc32c(x[:n]) == _crc_reference(x[:n].tobytes())
    with pytest.raises(ValueError, match="contiguous"):
        _core.crc32c(np.zeros(10)[::2])


def _crc_reference(data: bytes) -> int:
    """CRC32C bit by bit, as the definition reads."""
    c = 0xFFFFFFFF
    for b in data:
        c ^= b
        for _ in range(8):
            c = (c >> 1) ^ (0x82F63B78 if c & 1 else 0)
    return c ^ 0xFFFFFFFF


def _crc_impls():
    impls = []
    for name in ("software", "sse4.2", "vpclmulqdq"):
        try:
            _core.crc32c_with(name, b"")
        except ValueError:
            continue  # this CPU lacks it
        impls.append(name)
    return impls


def test_every_crc32c_implementation_matches_the_bitwise_reference():
    impls = _crc_impls()
    assert "software" in impls and _core.crc32c_best() in impls
    x = np.random.default_rng(1).integers(0, 256, 1 << 20, dtype=np.uint8)
    # Around the folding steps (128-byte strides, 256-byte start) and the 24 KiB interleaved stripes.
    lengths = [0, 1, 15, 16, 127, 128, 129, 255, 256, 257, 383, 384, 385, 511, 512, 513, 1000, 2048]
    for n in lengths:
        for off in (0, 1, 7, 31):
            for init in (0, 0xFFFFFFFF, 0x1234ABCD):
                part = x[off:off + n]
                want = _crc_reference(part.tobytes()) if init == 0 else None
                got = {name: _core.crc32c_with(name, part, init) for name in impls}
                assert len(set(got.values())) == 1, (n, off, init, got)
                if want is not None:
                    assert got["software"] == want, (n, off)
                assert _core.crc32c(part, init) == got["software"]
    # Long inputs: the reference is too slow, the implementations must still agree with each other,
    # and a split computation must equal the whole.
    for n in (3 * 8192 - 1, 3 * 8192, 3 * 8192 + 129, 65537, 1 << 20):
        got = {name: _core.crc32c_with(name, x[:n]) for name in impls}
        assert len(set(got.values())) == 1, (n, got)
        cut = n // 3
        assert _core.crc32c(x[cut:n], _core.crc32c(x[:cut])) == got["software"]
    with pytest.raises(ValueError, match="not supported"):
        _core.crc32c_with("md5", b"abc")


@pytest.mark.parametrize("n", [0, 4, 124, 128, 132, 16384, 16388, 40000 * 4 + 12])
@pytest.mark.parametrize("shift", [0, 4, 12, 28])
def test_copy_crc32c_copies_checksums_and_checks_finiteness(n, shift):
    rng = np.random.default_rng(n + shift)
    src = rng.standard_normal(n // 4).astype(np.float32)
    src[:3] = [-0.0, np.float32(1e-45), np.finfo(np.float32).max][: src.size]  # finite extremes
    raw = src.view(np.uint8)
    room = np.zeros(n + 64, dtype=np.uint8)
    dst = room[shift:shift + n]  # misaligned for the streaming stores unless shift is a multiple of 32
    crc, finite = _core.copy_crc32c(dst, raw, True)
    assert crc == _core.crc32c(raw) and finite
    assert bytes(dst) == bytes(raw) and not room[:shift].any() and not room[shift + n:].any()
    if n == 0:
        return
    # One NaN or Inf anywhere (the aligned head, the vector loop, the tail) is seen.
    for pos in sorted({p for p in (0, 1, src.size // 2, src.size - 1) if p < src.size}):
        for bad in (np.nan, np.inf, -np.inf):
            y = src.copy()
            y[pos] = bad
            crc, finite = _core.copy_crc32c(dst, y.view(np.uint8), True)
            assert not finite and crc == _core.crc32c(y.view(np.uint8)) and bytes(dst) == y.tobytes()


def test_copy_crc32c_on_any_byte_alignment():
    raw = np.random.default_rng(3).integers(0, 256, 70001, dtype=np.uint8)
    room = np.zeros(70001 + 8, dtype=np.uint8)
    for shift in range(4):
        dst = room[shift:shift + raw.size]
        crc, finite = _core.copy_crc32c(dst, raw)  # no float grid: any alignment, any length
        assert crc == _core.crc32c(raw) and bytes(dst) == raw.tobytes()
    f = np.array([1.0, np.nan, 2.0], np.float32).view(np.uint8)
    room = np.zeros(f.size + 1, np.uint8)
    crc, finite = _core.copy_crc32c(room[1:], f, True)  # float grid off dst's 4-byte alignment
    assert not finite and bytes(room[1:]) == f.tobytes()
    with pytest.raises(ValueError, match="whole float32s"):
        _core.copy_crc32c(np.zeros(5, np.uint8), np.zeros(5, np.uint8), True)
    with pytest.raises(ValueError, match="sizes differ"):
        _core.copy_crc32c(np.zeros(8, np.uint8), np.zeros(4, np.uint8))


def test_malloc_tuning_is_applied_once_and_respects_the_environment():
    from fedagg.transport import malloc

    code = "from fedagg.transport import malloc; print(malloc.keep_freed_memory(), malloc.keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    import platform

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert out.split() == [str(glibc)] * 2
    env["MALLOC_TRIM_THRESHOLD_"] = "1000000"  # the user's own setting wins
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]
    assert malloc.keep_freed_memory() in (True, False)

def good():
    return message(Kind.CHUNK, b"abcd", round=1, seq=1, offset=0, total=8, dtype=Dtype.FLOAT32)


@pytest.mark.parametrize("mutate,match", [
    (lambda f: f[:1], "exactly 2 frames"),
    (lambda f: f + [b""], "exactly 2 frames"),
    (lambda f: [f[0][:63], f[1]], "64 bytes"),
    (lambda f: [b"XXXX" + f[0][4:], f[1]], "magic"),
    (lambda f: [f[0][:4] + bytes([1]) + f[0][5:], f[1]], "version"),
    (lambda f: [f[0][:5] + bytes([99]) + f[0][6:], f[1]], "unknown"),
    (lambda f: [f[0], b"abc"], "payload bytes"),
    (lambda f: [f[0], b"abce"], "checksum"),
    (lambda f: [f[0][:52] + b"\x01\x00\x00\x00" + f[0][56:], f[1]], "reserved"),
    (lambda f: message(Kind.CHUNK, b"abcd", offset=6, total=8), "runs past"),
    (lambda f: message(Kind.CHUNK, b"x" * 200), "exceeds the limit"),
])
def test_malformed_messages_raise_protocol_errors(mutate, match):
    with pytest.raises(ProtocolError, match=match):
        parse(mutate(good()), 100)


def test_compressed_blob_framing():
    p = compress.TopK(ratio=0.1).encode(np.arange(100, dtype=np.float32))
    blob = pack_frames(p.to_frames())
    back = compress.Payload.from_frames(unpack_frames(memoryview(blob)))
    np.testing.assert_array_equal(compress.decode(back), compress.decode(p))
    for bad in (b"", blob[:-1], blob + b"x", b"\x00\x00\x00\x00", b"\xff\xff\xff\xff" + blob[4:]):
        with pytest.raises(ProtocolError):
            unpack_frames(memoryview(bad))


def test_is_local():
    assert is_local("tcp://127.0.0.1:5") and is_local("tcp://localhost:5") and is_local("ipc:///tmp/x")
    assert is_local("tcp://[::1]:5") and not is_local("tcp://0.0.0.0:5") and not is_local("tcp://10.0.0.1:5")
    with pytest.raises(ValueError, match="CURVE keys are required"):
        ServerConfig(bind="tcp://0.0.0.0:5555").check()


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(max_examples=3000, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=0, max_size=4))
def test_fuzzed_frames_only_raise_protocol_errors(frames):
    try:
        parse(frames, 128)
    except ProtocolError:
        pass


@settings(max_examples=1500, deadline=None)
@given(st.integers(0, 255), st.integers(0, 20), st.binary(min_size=0, max_size=64),
       st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1))
def test_fuzzed_headers_with_valid_magic(kind, field, body, a, b, c):
    raw = bytearray(Header(Kind.CHUNK, round=a, offset=b, total=c, length=len(body),
                           checksum=_core.crc32c(body)).pack())
    raw[5] = kind
    raw[8 + field] ^= 0xFF if field < 8 else 0  # corrupt length / aux bytes sometimes
    try:
        head, out = parse([bytes(raw), body], 64)
        assert out.nbytes == head.length <= 64
    except ProtocolError:
        pass


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(st.binary(max_size=80), min_size=0, max_size=4), min_size=1, max_size=10))
def test_server_survives_fuzzed_messages(running_server, batches):
    ep = running_server.endpoint
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(ep)
    try:
        for frames in batches:
            if frames:
                s.send_multipart(frames)
        hello = json_message(Kind.HELLO, {"id": "fuzzer"}, seq=time.time_ns())
        hello_crafted = [hello[0], bytes(hello[1])]
        s.send_multipart(hello_crafted)  # the server still answers
        end = time.monotonic() + 5
        while time.monotonic() < end:
            assert s.poll(5000), "the server stopped answering"
            head, body = parse(s.recv_multipart(), 1 << 20)
            if head.kind == Kind.STATE:
                break
        else:
            raise AssertionError("no STATE")
    finally:
        s.close(0)
    assert running_server.thread.is_alive()


@pytest.fixture(scope="module")
def running_server():
    r = Running(d=100)
    yield r
    r.stop()


# ---------------------------------------------------------------- the server's rules, in process
def test_round_with_clients_in_threads(running):
    r = running(d=5000, quorum=3, rounds=1, rule="mean")
    results = {}

    def go(i):
        with Client(r.endpoint, f"p{i}", timeout=10) as c:
            rnd, model = c.model()
            assert rnd == 0 and not model.any()
            results[i] = c.submit(np.full(5000, float(i), np.float32), rnd)

    ts = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    [t.start() for t in ts]
    [t.join(30) for t in ts]
    r.thread.join(10)
    assert all(results[i] == {"round": 0, "id": f"p{i}"} for i in range(3))
    np.testing.assert_allclose(r.server.model, np.full(5000, 1.0))
    assert r.server.history[0]["closed_by"] == "quorum"



def test_models_over_rounds_reuse_receive_buffers_without_aliasing(running):
    """The next model is written into a spent receive buffer: rounds must not leak into each other."""
    d, n, rounds = 3000, 3, 4
    r = running(d=d, quorum=n, rounds=rounds, rule="mean", server_lr=0.5)
    rng = np.random.default_rng(7)
    ups = rng.standard_normal((rounds, n, d)).astype(np.float32)
    seen = {}

    def go(i):
        with Client(r.endpoint, f"p{i}", timeout=20) as c:
            for k in range(rounds):
                rnd, model = c.model()
                seen[(i, k)] = model
                c.submit(ups[k, i], rnd)
                if k < rounds - 1:  # the server stops after the last round
                    c.wait_round(rnd)

    ts = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    r.thread.join(20)
    assert len(r.server.history) == rounds
    want = np.zeros(d, np.float32)
    for k in range(rounds):
        for i in range(n):  # every participant downloaded the model of round k intact
            np.testing.assert_array_equal(seen[(i, k)], want, err_msg=f"participant {i}, round {k}")
        # The server folds each update into a float64 sum as it is accepted (transport/rounds.py):
        # recomputed here plainly, in acceptance order, it must match bit for bit, round after
        # round, through recycled buffers.
        acc = np.zeros(d)
        for pid in r.server.history[k]["accepted"]:  # summation order matters
            acc += 1.0 * ups[k][int(pid[1:])].astype(np.float64)
        want = want + np.float32(0.5) * (acc / n).astype(np.float32)
    np.testing.assert_array_equal(r.server.model, want)
    assert not any(np.may_share_memory(r.server.model, b) for b in r.server.buffers.pool)

def test_refusals_late_duplicate_replay_size_nonfinite(running):
    r = running(d=3000, quorum=5, rounds=None, chunk_bytes=4096)
    x = np.ones(3000, np.float32)
    bad = x.copy()
    bad[5] = np.nan
    with Client(r.endpoint, "a", timeout=10) as c:
        assert c.submit(x, 0)["id"] == "a"
        with pytest.raises(TransportError, match="duplicate"):  # the client knows from STATE
            c.submit(x, 0)
        st = c.status()  # and the server refuses a second upload anyway
        c._send(message(Kind.CHUNK, x[:1024], round=0, offset=0, total=12000, seq=c._next(), dtype=Dtype.FLOAT32,
                        session=st["session"]))
        reply = c._recv(time.monotonic() + 5)
        assert parse_json(reply[1])["reason"] == "duplicate"
    for pid, update, rnd, match in [("b", np.ones(3001, np.float32), 0, "size"), ("c", bad, 0, "nonfinite"),
                                    ("d", x, 7, "late|future")]:
        with Client(r.endpoint, pid, timeout=10) as c, pytest.raises(TransportError, match=match):
            c.submit(update, rnd)
    # a replayed message (an old sequence number) is refused
    with Client(r.endpoint, "e", timeout=10) as e:
        e._send(message(Kind.HEARTBEAT, b"", seq=5))
        reply = e._recv(time.monotonic() + 5)
    assert reply[0].kind == Kind.REJECTED and parse_json(reply[1])["reason"] == "replayed"
    reasons = {x["id"]: x["reason"] for x in r.server.rejected}
    assert reasons["a"] == "duplicate" and reasons["b"] == "size" and reasons["c"] == "nonfinite"
    assert reasons["e"] == "replayed"
    assert list(r.server.accepted) == ["a"]


def test_compressed_updates_are_decoded(running):
    r = running(d=4000, quorum=2, rounds=1)
    x = np.random.default_rng(1).standard_normal(4000).astype(np.float32)
    p = compress.TopK(ratio=0.05, error_feedback=False).encode(x)
    q = compress.Uniform(8).encode(x, seed=3)
    with Client(r.endpoint, "sparse", timeout=10) as a, Client(r.endpoint, "quant", timeout=10) as b:
        a.submit(p, 0)
        b.submit(q, 0)
    r.thread.join(10)
    want = (compress.decode(p).astype(np.float64) + compress.decode(q)) / 2
    np.testing.assert_allclose(r.server.model, want, rtol=1e-6, atol=1e-6)


def test_rate_limit_drops_floods_but_keeps_serving(running, caplog):
    r = running(d=100, quorum=2, rate=50.0)
    with Client(r.endpoint, "flood", timeout=10) as c:
        for _ in range(400):
            c.heartbeat()
        time.sleep(0.5)
        assert any(getattr(rec, "event", "") == "rate_limited" for rec in caplog.records)
        time.sleep(1.0)  # tokens refill
        assert c.status()["round"] == 0


def test_curve_allow_list_binds_updates_to_keys(running, tmp_path):
    from zmq.auth import create_certificates, load_certificate

    spub, ssec = load_certificate(create_certificates(str(tmp_path), "server")[1])
    apub, asec = load_certificate(create_certificates(str(tmp_path), "alice")[1])
    bpub, bsec = load_certificate(create_certificates(str(tmp_path), "bob")[1])
    r = running(d=500, quorum=1, rounds=1, curve_secret_key=ssec, curve_public_key=spub, allowed_keys=[apub])
    with pytest.raises(TransportError, match="timeout"):  # not on the allow-list: ZAP refuses the handshake
        Client(r.endpoint, server_key=spub, public_key=bpub, secret_key=bsec, timeout=2)
    # an allowed key claiming another identity is refused
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.curve_serverkey, s.curve_publickey, s.curve_secretkey = spub, apub, asec
    s.connect(r.endpoint)
    s.send_multipart(json_message(Kind.HELLO, {"id": "mallory"}, seq=1))
    assert s.poll(5000)
    head, body = parse(s.recv_multipart(), 1 << 16)
    assert head.kind == Kind.REJECTED and parse_json(body)["reason"] == "identity"
    s.close(0)
    with Client(r.endpoint, server_key=spub, public_key=apub, secret_key=asec, timeout=10) as c:
        assert c.id == apub.decode()
        assert c.submit(np.ones(500, np.float32), 0)["id"] == apub.decode()
    r.thread.join(10)
    assert r.server.history[0]["accepted"] == [apub.decode()]


# ---------------------------------------------------------------- rounds with participant processes
def test_byzantine_participants_and_a_killed_upload(running):
    d = 200_000
    # Closed by the deadline (the quorum is out of reach), so every verdict is in before it closes.
    r = running(d=d, quorum=100, min_updates=7, rounds=1, rule="median", f=2, chunk_bytes=64 << 10, deadline=12)
    ep = r.endpoint
    slow = spawn(join_cmd(ep, "killed", chunk_delay=0.2, seed=7))  # killed while its upload streams
    wait_for(lambda: r.server.uploads.get("killed") is not None and r.server.uploads["killed"].received > 0,
             what="the slow upload to start")
    slow.send_signal(signal.SIGKILL)
    slow.communicate(timeout=10)
    procs = {"dies": spawn(join_cmd(ep, "dies", behaviour="die"))}  # exits by itself mid-upload
    procs["dies"].communicate(timeout=30)
    procs.update({f"h{i}": spawn(join_cmd(ep, f"h{i}", seed=i)) for i in range(5)})
    for b in ("signflip", "noise", "nan", "wrongsize"):
        procs[b] = spawn(join_cmd(ep, b, behaviour=b, seed=99))
    out = {k: p.communicate(timeout=60) for k, p in procs.items()}
    r.thread.join(30)
    assert not r.thread.is_alive(), "the round did not close"
    rec = r.server.history[0]
    assert sorted(rec["accepted"]) == sorted([f"h{i}" for i in range(5)] + ["signflip", "noise"])
    reasons = {x["id"]: x["reason"] for x in rec["rejected"]}
    assert reasons["nan"] == "nonfinite" and reasons["wrongsize"] == "size"
    assert "killed" not in rec["accepted"] and "dies" not in rec["accepted"]
    assert {"killed", "dies"} <= set(rec["abandoned_uploads"])  # partial uploads stayed out of the aggregate
    assert procs["dies"].returncode == 3 and procs["h0"].returncode == 0
    # the honest result: the median of 5 honest and 2 Byzantine updates stays with the honest ones
    goal = participant.target(d, 0)
    assert np.abs(r.server.model - goal).max() < 0.1
    assert "signflip" in rec["excluded_by_rule"] or rec["rule"] == "median"
    assert all("Traceback" not in e for _, e in out.values())


def test_server_killed_and_restarted_mid_round_loses_nothing(tmp_path):
    d, port = 50_000, free_port()
    ep = f"tcp://127.0.0.1:{port}"
    state = tmp_path / "state"
    serve = [sys.executable, "-m", "fedagg", "serve", "--bind", ep, "--d", str(d), "--quorum", "4", "--rounds", "1",
             "--state-dir", str(state), "--no-progress", "--chunk-mib", "0.0625"]
    srv = spawn(serve)
    try:
        first = [spawn(join_cmd(ep, f"early{i}", seed=i)) for i in range(2)]
        for p in first:
            p.communicate(timeout=60)
            assert p.returncode == 0
        fold = json.loads((state / "round-0" / "fold.json").read_text())  # the mean's durable running sum
        assert sorted(e["id"] for e in fold["accepted"]) == ["early0", "early1"]
        # 4 chunks each at 0.5 s apart: still uploading when the server is killed
        late = [spawn(join_cmd(ep, f"late{i}", seed=10 + i, timeout=5, chunk_delay=0.5)) for i in range(2)]
        time.sleep(1.0)
        srv.send_signal(signal.SIGKILL)  # mid-round, with uploads in flight
        srv.communicate(timeout=10)
        srv = spawn(serve)  # same state directory, same port
        for p in late:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err
        out, err = srv.communicate(timeout=60)
        assert srv.returncode == 0, err
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate(timeout=10)
    rec = [json.loads(line) for line in (state / "metrics.jsonl").read_text().splitlines()]
    assert len(rec) == 1 and sorted(rec[0]["accepted"]) == ["early0", "early1", "late0", "late1"]
    assert "recovered round 0 with 2 accepted" in err


# ---------------------------------------------------------------- observability
def test_json_logs_and_the_progress_view(running):
    import io
    import logging

    from rich.console import Console

    from fedagg.transport.observe import JsonFormatter, ProgressView

    rec = logging.LogRecord("fedagg.server", logging.INFO, __file__, 1, "accepted %s", ("a",), None)
    rec.event, rec.participant, rec.round = "accepted", "a", 3
    line = json.loads(JsonFormatter().format(rec))
    assert line["message"] == "accepted a" and line["event"] == "accepted" and line["round"] == 3
    r = running(d=1000, quorum=2)
    out = io.StringIO()
    view = ProgressView(Console(file=out, width=120, force_terminal=False))
    with Client(r.endpoint, "watched", timeout=10) as c:
        c.submit(np.ones(1000, np.float32), 0)
    view.update(r.server)
    view.close()
    text = out.getvalue()
    assert "round 0" in text and "accepted" in text and "1" in text


def test_cli_keys(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fedagg", "keys", "generate", str(tmp_path), "alice"],
                         capture_output=True, text=True, check=True).stdout
    key = json.loads(out)["key"]
    assert (tmp_path / "alice.key_secret").stat().st_mode & 0o077 == 0
    listed = subprocess.run([sys.executable, "-m", "fedagg", "keys", "list", str(tmp_path)],
                            capture_output=True, text=True, check=True).stdout
    assert listed.strip() == f"alice\t{key}"
    bad = subprocess.run([sys.executable, "-m", "fedagg", "serve", "--bind", "tcp://0.0.0.0:1", "--d", "3"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "CURVE keys are required" in bad.stderr


# ---------------------------------------------------------------- hostile inputs found in review
def _raw_peer(endpoint, pid="x"):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _answer(s):
    assert s.poll(5000), "no answer"
    return parse(s.recv_multipart(), 1 << 20)


def test_hostile_json_and_payloads_are_refused_not_fatal(running):
    r = running(d=256, quorum=5, chunk_bytes=8192)
    s = _raw_peer(r.endpoint)
    try:
        for body in (b"[" * 1100 + b"]" * 1100, b'{"id":"a","n":' + b"7" * 4400 + b"}"):
            s.send_multipart(message(Kind.HELLO, body, seq=time.time_ns()))
            head, reply = _answer(s)
            assert head.kind == Kind.REJECTED and parse_json(reply)["reason"] == "malformed"
        s.send_multipart(json_message(Kind.HELLO, {"id": "hostile"}, seq=time.time_ns()))
        head, reply = _answer(s)
        st = parse_json(reply)
        # a compressed upload whose FAGP header is deeply nested JSON
        bad = b"FAGP" + (1).to_bytes(2, "little") + (2200).to_bytes(4, "little") + b"[" * 1100 + b"]" * 1100
        blob = pack_frames([bad])
        s.send_multipart(message(Kind.CHUNK, blob, round=0, offset=0, total=len(blob), seq=time.time_ns(),
                                 codec=Codec.FAGP, session=st["session"]))
        head, _ = _answer(s)
        assert head.kind == Kind.CREDIT
        s.send_multipart(message(Kind.COMMIT, b"", round=0, total=len(blob), seq=time.time_ns(),
                                 session=st["session"]))
        head, reply = _answer(s)
        assert head.kind == Kind.REJECTED and parse_json(reply)["reason"] == "payload"
    finally:
        s.close(0)
    assert r.thread.is_alive()
    with Client(r.endpoint, "honest", timeout=10) as c:
        assert c.submit(np.ones(256, np.float32), 0)["id"] == "honest"


def test_pipeline_is_checked_at_start_and_huge_updates_do_not_poison_the_model(running):
    with pytest.raises(ValueError, match="cannot run on 1 updates"):
        ServerConfig(rule="krum", f=1, quorum=1).check()
    with pytest.raises(ValueError, match="cannot run"):
        ServerConfig(rule="nope").check()
    r = running(d=64, quorum=2, rounds=1, server_lr=2.0)  # 2 x 3e38 overflows float32
    for pid in ("big1", "big2"):
        with Client(r.endpoint, pid, timeout=10) as c:
            c.submit(np.full(64, 3e38, np.float32), 0)
    r.thread.join(10)
    rec = r.server.history[0]
    assert rec["failed"] and "not finite" in rec["failed"]
    assert np.isfinite(r.server.model).all()


def test_refusals_are_counted_but_listed_boundedly(running):
    from fedagg.transport.server import MAX_REJECTED_LISTED

    r = running(d=64, quorum=5, rate=1e9)
    with Client(r.endpoint, "noisy", timeout=10) as c:
        st = c.status()
        for _ in range(MAX_REJECTED_LISTED + 200):
            c._send(message(Kind.CHUNK, b"\x00" * 8, round=5, offset=0, total=256, seq=c._next(),
                            dtype=Dtype.FLOAT32, session=st["session"]))
        wait_for(lambda: r.server.rejected_counts.get("future", 0) == MAX_REJECTED_LISTED + 200,
                 what="every refusal counted")
    assert len(r.server.rejected) == MAX_REJECTED_LISTED


def test_client_never_hangs_when_the_server_is_gone(running):
    r = running(d=64, quorum=5)
    c = Client(r.endpoint, "orphan", timeout=1.0)
    r.stop()
    t0 = time.monotonic()
    with pytest.raises(TransportError, match="timeout"):
        for _ in range(100_000):
            c.heartbeat()
        c.status()
    assert time.monotonic() - t0 < 30
    c.close()


def test_untrusted_json_bounds():
    from fedagg import _json

    assert _json.loads(b'{"a": "[[[[\\"]]]", "b": [[1]]}', 100) == {"a": '[[[["]]]', "b": [[1]]}
    with pytest.raises(_json.UntrustedJSONError, match="deeper than 32"):
        _json.loads(b"[" * 33 + b"]" * 33, 1000)
    assert _json.loads(b"[" * 32 + b"]" * 32, 1000)
    # brackets inside strings count toward the quick bound but not the depth
    assert _json.loads(b'{"a": "' + b"[{" * 40 + b'"}', 1000) == {"a": "[{" * 40}
    with pytest.raises(_json.UntrustedJSONError, match="at most 10"):
        _json.loads(b"[1,2,3,4,5,6]", 10)
    for bad in (b"\xff", b"{", b"1" * 5000):
        with pytest.raises(_json.UntrustedJSONError):
            _json.loads(bad, 10_000)


def test_a_peer_ignoring_its_credits_is_not_read_further():
    """Bounded memory per peer: libzmq queues at most credits + 16 messages of one connection;
    the rest waits in TCP buffers and in the sender's own queue."""
    chunk, credits, sent = 4 << 20, 4, 100

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    server = Server(np.zeros(sent * chunk // 4, np.float32),
                    ServerConfig(bind="tcp://127.0.0.1:0", chunk_bytes=chunk, credits=credits, rate=1e9))
    try:  # not serving: nothing reads the socket, so libzmq alone decides what it takes in
        flood = _raw_peer(server.endpoint)
        body = np.ones(chunk, np.uint8)
        before = rss()
        for k in range(sent):  # 400 MiB, zero-copy from one buffer
            flood.send_multipart(message(Kind.CHUNK, body, round=0, seq=k + 1, offset=k * chunk,
                                         total=sent * chunk, dtype=Dtype.FLOAT32), copy=False)
        time.sleep(3.0)  # time for libzmq to take in all it will
        grown = rss() - before
        assert grown <= (credits + 16 + 6) * chunk, f"{grown / chunk:.1f} chunks held for one peer"
        assert server.sock.poll(1000)  # and it did take in some
        flood.close(0)
    finally:
        server.close()
