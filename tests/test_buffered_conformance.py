"""Conformance test of a *buffered* (asynchronous, FedBuff) fedagg server, written from
docs/protocol.md alone ("Buffered servers (asynchronous, FedBuff)", "STATE", "A participant's
round", "Refusals during an upload", "What the server refuses").

The participant below uses only the standard library, numpy and pyzmq (its wire code is
tests/doc_participant.py, also written from the document alone); it does not import
fedagg: the server under test runs as a subprocess (``python -m fedagg serve --mode buffered``).
Every wait is bounded by a timeout and every loop by a count. The expected models are computed
here, in float64, with the FedBuff rule and the staleness weights the document gives.
"""

import math
import os
import time

import numpy as np
import pytest

from doc_participant import ctx  # noqa: F401 - a fixture
from doc_participant import (ACCEPTED, CHUNK, CHUNK_BYTES, COMMIT, CREDIT, GET_MODEL, MODEL, Peer, RECV_TIMEOUT,
                            REJECTED, ROUND, STATE, check_rejected, crc32c, is_int, raw, serve_factory, stop_servers)

CREDITS = 2
D = 3001  # 12004 bytes: 2 full chunks and a short one, two credit windows
MODEL_BYTES = 4 * D


@pytest.fixture
def serve(tmp_path):
    procs = []
    try:
        yield serve_factory(tmp_path, procs, D, CREDITS)
    finally:
        stop_servers(procs)


def is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# ----------------------------------------------------------------------------------------
# FedBuff, as "Buffered servers" gives it

def weight(spec, s):
    """The staleness weight w(s): `sqrt`: 1 / sqrt(1 + s); `constant`: 1; `poly:a`:
    (1 + s)^-a; `hinge:a:b`: 1 for s <= b, else 1 / (a (s - b) + 1)."""
    kind, *params = spec.split(":")
    if kind == "sqrt":
        return 1.0 / math.sqrt(1.0 + s)
    if kind == "constant":
        return 1.0
    if kind == "poly":
        (a,) = map(float, params)
        return (1.0 + s) ** -a
    if kind == "hinge":
        a, b = map(float, params)
        return 1.0 if s <= b else 1.0 / (a * (s - b) + 1.0)
    raise ValueError(spec)


def same_weight(reported, spec):
    """STATE's `staleness` names the weight the server was started with (its numbers may be
    written another way: "poly:2" or "poly:2.0")."""
    kind, *params = spec.split(":")
    rkind, *rparams = reported.split(":")
    return rkind == kind and len(rparams) == len(params) and all(
        math.isclose(float(x), float(y)) for x, y in zip(rparams, params))


class Reference:
    """The model versions a FedBuff server with the mean must publish, in float64:
    every K accepted updates, model <- model + server_lr * (1/K) * sum w(s_i) * update_i,
    s_i = (version current when it was accepted) - (version it was computed on)."""

    def __init__(self, model0, v0, k, lr, spec):
        self.models = {v0: np.asarray(model0, dtype=np.float64)}
        self.v = v0
        self.k = k
        self.lr = lr
        self.spec = spec
        self.buffer = []

    def accept(self, update, base):
        s = self.v - base
        self.buffer.append(weight(self.spec, s) * np.asarray(update, dtype=np.float64))
        if len(self.buffer) == self.k:
            agg = np.sum(np.stack(self.buffer), axis=0) / self.k
            self.models[self.v + 1] = self.models[self.v] + self.lr * agg
            self.v += 1
            self.buffer = []


def check_state(m, *, k, s, spec, lr, d=D, credits=CREDITS):
    """STATE's fields and types (the "STATE" table), for a buffered server with the mean."""
    assert m.kind == STATE, m
    st = m.json()
    assert isinstance(st, dict)
    for key in ("round", "session", "phase", "d", "dtype", "model_bytes", "chunk_bytes",
                "credits", "held", "accepted", "rule", "f", "server_lr", "previous", "shards",
                "shard", "d_total", "excluded", "mode", "buffer", "max_staleness", "staleness",
                "last_base"):
        assert key in st, f"STATE lacks {key!r}: {st}"
    assert is_int(st["round"]) and st["round"] == m.h["round"]
    assert is_int(st["session"]) and st["session"] == m.h["session"]
    assert 0 < m.h["session"] < 2 ** 63
    assert st["phase"] == "upload", st
    assert st["d"] == d and st["d_total"] == d and st["dtype"] == "float32"
    assert st["model_bytes"] == 4 * d
    assert st["chunk_bytes"] == CHUNK_BYTES and st["credits"] == credits
    assert is_int(st["held"]) and st["held"] >= 0
    assert isinstance(st["accepted"], bool)
    assert st["rule"] == "mean" and st["f"] == 0
    assert is_number(st["server_lr"]) and st["server_lr"] == pytest.approx(lr)
    assert len(st["shards"]) == 1 and st["shard"] == 0
    assert st["shards"][0]["lo"] == 0 and st["shards"][0]["hi"] == d
    # Buffered fields.
    assert st["mode"] == "buffered", st
    assert is_int(st["buffer"]) and st["buffer"] == k, st
    assert is_int(st["max_staleness"]) and st["max_staleness"] == s, st
    assert isinstance(st["staleness"], str) and same_weight(st["staleness"], spec), st
    assert st["last_base"] is None or is_int(st["last_base"]), st
    prev = st["previous"]
    if prev is not None:
        assert isinstance(prev, dict)
        assert is_int(prev["round"]) and isinstance(prev["model_updated"], bool)
        assert is_int(prev["accepted"])
        # The STATE table lists `closed_by`'s values: "quorum", "deadline" or "secure".
        # A buffer closes at K updates and has no deadline: "quorum" is the one that fits.
        assert prev["closed_by"] in ("quorum", "deadline", "secure"), prev
    return st


def download(peer, rnd, aux=CREDITS, *, model_bytes=MODEL_BYTES, chunk_bytes=CHUNK_BYTES,
             credits=CREDITS):
    """The model of version rnd through GET_MODEL windows of aux chunks."""
    buf = bytearray(model_bytes)
    offset = 0
    for _ in range(model_bytes // chunk_bytes + 2):
        if offset >= model_bytes:
            break
        peer.send(GET_MODEL, round=rnd, offset=offset, aux=aux)
        left = math.ceil((model_bytes - offset) / chunk_bytes)
        n = min(max(aux, 1), credits, left)
        wanted = {offset + i * chunk_bytes for i in range(n)}
        for _ in range(n):
            m = peer.recv((MODEL, REJECTED))
            assert m.kind == MODEL, m
            h = m.h
            # "Every server message carries the current round": for an older version the
            # header may carry the current version rather than the one asked for.
            assert h["round"] >= rnd and h["session"] == peer.session, h
            assert h["dtype"] == 1 and h["total"] == model_bytes
            assert h["offset"] in wanted, (h["offset"], sorted(wanted))
            wanted.discard(h["offset"])
            size = min(chunk_bytes, model_bytes - h["offset"])
            assert len(m.payload) == size
            buf[h["offset"]:h["offset"] + size] = m.payload
        offset += n * chunk_bytes
    else:
        raise AssertionError("download did not end")
    return np.frombuffer(bytes(buf), dtype="<f4").copy()


def upload(peer, data, rnd, *, start=0, stop=None, credits=CREDITS, chunk_bytes=CHUNK_BYTES):
    """Send data[start:stop] in raw CHUNKs naming version rnd, within the credit window.

    Returns ("held", bytes held) when every chunk is credited, or ("rejected", message,
    refused chunk's seq) at the first REJECTED (the rest of the window is left to settle())."""
    data = bytes(data)
    total = len(data)
    stop = len(data) if stop is None else stop
    offset = start
    inflight = []
    held = start
    for _ in range(4 * (len(data) // chunk_bytes + 2)):
        while len(inflight) < credits and offset < stop:
            piece = data[offset:min(offset + chunk_bytes, stop)]
            seq = peer.send(CHUNK, piece, round=rnd, session=peer.session, offset=offset,
                            total=total, dtype=1)
            inflight.append((seq, offset + len(piece)))
            offset += len(piece)
        if not inflight:
            return ("held", held)
        m = peer.recv((CREDIT, REJECTED))
        seq, end = inflight.pop(0)
        if m.kind == REJECTED:
            return ("rejected", m, seq)
        h = m.h
        assert h["aux"] == 1 and h["session"] == peer.session and h["total"] == total, h
        assert h["offset"] == end, (h, end)
        held = h["offset"]
    raise AssertionError("upload did not end")


def settle(peer, timeout=0.3):
    """Let the answers to a refused window's other chunks arrive, and forget them."""
    peer.drain(timeout)
    peer.backlog = [m for m in peer.backlog if m.kind not in (CREDIT, REJECTED)]


def wait_version(peer, v, timeout=RECV_TIMEOUT):
    """STATUS until STATE's round (the model version) is v; returns that STATE message."""
    deadline = time.monotonic() + timeout
    m = None
    for _ in range(1000):
        m = peer.status()
        if peer.state["round"] >= v or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert peer.state["round"] == v, (peer.state["round"], v)
    return m


def train(model, rng, target):
    """A participant's update, computed on the model it downloaded: a step towards target."""
    return (0.3 * (target - model) + 0.05 * rng.standard_normal(model.shape)).astype(np.float32)


def check_accepted(m, peer, base, version, spec):
    """ACCEPTED is {"id", "round": base, "version": the buffer's version, "staleness": s,
    "scale": w(s)}."""
    assert m.kind == ACCEPTED, m
    body = m.json()
    assert set(body) == {"id", "round", "version", "staleness", "scale"}, body
    assert body["id"] == peer.pid, body
    assert is_int(body["round"]) and body["round"] == base, (body, base)
    assert is_int(body["version"]) and body["version"] == version, (body, version)
    assert is_int(body["staleness"]) and body["staleness"] == version - base, body
    assert is_number(body["scale"]), body
    assert body["scale"] == pytest.approx(weight(spec, version - base), rel=1e-6), body
    assert m.h["session"] == peer.session
    # "Every server message carries the current round": the buffer's version, or the next one
    # when this update completed the buffer.
    assert m.h["round"] in (version, version + 1), (m.h, body)
    return body


def submit(peer, update, base, ref):
    """CHUNKs and COMMIT naming version `base`; the update must be accepted into the current
    buffer (the reference's version), which the reference then takes too."""
    assert upload(peer, raw(update), base) == ("held", MODEL_BYTES)
    peer.send(COMMIT, round=base, session=peer.session, total=MODEL_BYTES)
    m = peer.recv((ACCEPTED, REJECTED))
    body = check_accepted(m, peer, base, ref.v, ref.spec)
    ref.accept(update, base)
    return body


def expect_refusal(peer, update, base, reason):
    """An update naming version `base` is refused `reason`, at a chunk or at COMMIT."""
    res = upload(peer, raw(update), base)
    if res[0] == "rejected":
        body = check_rejected(res[1], reason, res[2])
        settle(peer)
        return "chunk", body
    assert res == ("held", MODEL_BYTES), res
    seq = peer.send(COMMIT, round=base, session=peer.session, total=MODEL_BYTES)
    return "commit", check_rejected(peer.recv((ACCEPTED, REJECTED)), reason, seq)


def assert_close(got, expected):
    # float32 model vs float64 reference
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def initial_model(seed, d=D):
    return np.random.default_rng(seed).standard_normal(d).astype(np.float32)


@pytest.fixture
def buffered(serve):
    """buffered(k, s, staleness, lr, model) -> the server, started with --mode buffered."""

    def start(k, s, spec, lr, model):
        return serve("--mode", "buffered", "--buffer", str(k), "--max-staleness", str(s),
                     "--staleness", spec, "--server-lr", str(lr), "--no-progress",
                     model=model)

    return start


def hello_all(ctx, srv, names, **kw):
    peers = []
    for name in names:
        p = Peer(ctx, srv.endpoint, name, f"secret-{name}-{os.urandom(8).hex()}")
        _, m = p.hello()
        st = check_state(m, **kw)
        assert st["last_base"] is None and st["held"] == 0, st
        peers.append(p)
    assert len({p.session for p in peers}) == 1
    return peers


def no_round_broadcast(peers):
    """ "No ROUND is broadcast": none arrived on any connection."""
    for p in peers:
        p.drain(0.2)
        assert not p.rounds, f"{p.pid} received ROUND: {p.rounds[:3]}"
        assert not [m for m in p.backlog if m.kind == ROUND]


# ----------------------------------------------------------------------------------------
# Tests

def test_crc32c_check_values():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_buffered_sqrt_versions_waiting_commit_and_refusals(buffered, ctx):
    K, S, SPEC, LR = 2, 2, "sqrt", 0.5
    conf = dict(k=K, s=S, spec=SPEC, lr=LR)
    model0 = initial_model(1)
    target = initial_model(2).astype(np.float64)
    srv = buffered(K, S, SPEC, LR, model0)
    p1, p2, p3, p4, p5 = peers = hello_all(ctx, srv, [f"buf-{i}" for i in range(1, 6)], **conf)
    v0 = p1.state["round"]
    assert p1.state["previous"] is None
    ref = Reference(model0, v0, K, LR, SPEC)
    rng = np.random.default_rng(3)

    # Everyone downloads the current version (GET_MODEL with round = v0).
    m0 = {}
    for p, aux in zip(peers, (0, 1, 2, 1000, 2)):
        m0[p.pid] = download(p, v0, aux)
        assert np.array_equal(m0[p.pid], model0)

    # p5 starts an upload computed on v0 and leaves it there (one chunk held).
    u5 = train(m0[p5.pid], rng, target)
    assert upload(p5, raw(u5), v0, stop=CHUNK_BYTES) == ("held", CHUNK_BYTES)

    # -- version v0's buffer: two fresh updates.
    submit(p1, train(m0[p1.pid], rng, target), v0, ref)
    st = check_state(p1.status(), **conf)
    assert st["round"] == v0 and st["last_base"] == v0, st  # the buffer is not full yet
    submit(p2, train(m0[p2.pid], rng, target), v0, ref)
    assert ref.v == v0 + 1
    st = check_state(wait_version(p2, v0 + 1), **conf)
    assert st["last_base"] == v0
    prev = st["previous"]
    assert prev is not None and prev["round"] == v0 and prev["model_updated"] is True, prev
    assert prev["accepted"] == K, prev
    assert_close(download(p3, v0 + 1), ref.models[v0 + 1])

    # -- version v0+1's buffer: an update computed on v0 (staleness 1), one on v0+1.
    v1 = v0 + 1
    submit(p3, train(m0[p3.pid], rng, target), v0, ref)  # p3 downloaded v0 at the start
    m1 = download(p1, v1)
    assert_close(m1, ref.models[v1])
    submit(p1, train(m1, rng, target), v1, ref)
    v2 = v1 + 1
    assert ref.v == v2
    check_state(wait_version(p1, v2), **conf)
    assert_close(download(p4, v2), ref.models[v2])

    # GET_MODEL of a version within max_staleness still works after newer ones were published.
    assert np.array_equal(download(p2, v0), model0)  # v2 - v0 = 2 = S
    assert_close(download(p2, v1), ref.models[v1])

    # -- version v2's buffer: p4's update computed on v0 (staleness 2 = S, still taken) ...
    submit(p4, train(m0[p4.pid], rng, target), v0, ref)
    st = check_state(p4.status(), **conf)
    assert st["round"] == v2 and st["last_base"] == v0, st
    # ... then p4's next update, on v2: its COMMIT finds the buffer holding p4's previous
    # update, and waits unanswered (its bytes stay held) until the next buffer opens.
    m2 = download(p4, v2)
    u4c = train(m2, rng, target)
    assert upload(p4, raw(u4c), v2) == ("held", MODEL_BYTES)
    p4.send(COMMIT, round=v2, session=p4.session, total=MODEL_BYTES)
    p4.drain(1.0)
    answers = [m for m in p4.backlog if m.kind in (ACCEPTED, REJECTED)]
    assert not answers, f"a COMMIT that should wait was answered: {answers}"
    st = check_state(p4.status(), **conf)
    assert st["round"] == v2 and st["held"] == MODEL_BYTES, st
    # "Sending the COMMIT again keeps its place."
    p4.send(COMMIT, round=v2, session=p4.session, total=MODEL_BYTES)
    p4.drain(0.3)
    assert not [m for m in p4.backlog if m.kind in (ACCEPTED, REJECTED)]

    # p2 fills v2's buffer with an update on v1 (staleness 1): version v3 is published, and
    # p4's waiting COMMIT is taken into v3's buffer, with the staleness of that moment (1).
    m21 = download(p2, v1)
    assert_close(m21, ref.models[v1])
    submit(p2, train(m21, rng, target), v1, ref)
    v3 = v2 + 1
    assert ref.v == v3
    m = p4.recv((ACCEPTED, REJECTED))
    first = check_accepted(m, p4, v2, v3, SPEC)
    ref.accept(u4c, v2)
    # Whatever answers the second COMMIT (the document does not say), the update counts once:
    # v4's model checks that.
    p4.drain(0.3)
    extra = [m for m in p4.backlog if m.kind in (ACCEPTED, REJECTED)]
    for m in extra:
        assert m.kind == ACCEPTED and m.json() == first, extra
    p4.backlog = [m for m in p4.backlog if m not in extra]
    st = check_state(wait_version(p4, v3), **conf)
    assert st["last_base"] == v2 and st["held"] == 0, st

    # p5's upload in progress on v0 is now more than S versions old: given up, resume gets
    # `stale` ("Refusals during an upload": resume with STATUS, from `held`).
    st = check_state(p5.status(), **conf)
    seq = p5.send(CHUNK, raw(u5)[st["held"]:st["held"] + CHUNK_BYTES], round=v0,
                  session=p5.session, offset=st["held"], total=MODEL_BYTES, dtype=1)
    check_rejected(p5.recv((CREDIT, REJECTED)), "stale", seq)

    # -- version v3's buffer: p4's (waited) update and p3's on v3.
    m3 = download(p3, v3)
    assert_close(m3, ref.models[v3])
    submit(p3, train(m3, rng, target), v3, ref)
    v4 = v3 + 1
    assert ref.v == v4
    st = check_state(wait_version(p3, v4), **conf)
    assert st["last_base"] == v3
    assert st["previous"]["round"] == v3 and st["previous"]["accepted"] == K, st["previous"]
    assert_close(download(p3, v4), ref.models[v4])

    # The versions S back are served, older ones refused `round`.
    assert_close(download(p5, v2), ref.models[v2])
    assert_close(download(p5, v3), ref.models[v3])
    for old in (v1, v0):
        seq = p5.send(GET_MODEL, round=old, offset=0, aux=1)
        check_rejected(p5.recv((MODEL, REJECTED)), "round", seq)
    # A version not published yet: the reason table gives `future` ("a buffered server: future,
    # a version it has not published") and restricts `round` to "a version more than
    # max_staleness old", while "A participant's round" says "a round other than the current
    # one is refused round". Either is taken here (see the report on this file).
    seq = p5.send(GET_MODEL, round=v4 + 1, offset=0, aux=1)
    m = p5.recv((MODEL, REJECTED))
    assert m.kind == REJECTED and m.json()["reason"] in ("future", "round"), m
    check_rejected(m, m.json()["reason"], seq)

    # p1's latest accepted update was on v1: none in the last S versions any more.
    st = check_state(p1.status(), **conf)
    assert st["round"] == v4 and st["last_base"] is None, st

    # Refusals. stale: a version more than S old (v1 = v4 - 3), at its first chunk.
    u = train(ref.models[v4], rng, target)
    seq = p2.send(CHUNK, raw(u)[:CHUNK_BYTES], round=v1, session=p2.session, offset=0,
                  total=MODEL_BYTES, dtype=1)
    check_rejected(p2.recv((CREDIT, REJECTED)), "stale", seq)
    # future: a version the server has not published.
    seq = p2.send(CHUNK, raw(u)[:CHUNK_BYTES], round=v4 + 1, session=p2.session, offset=0,
                  total=MODEL_BYTES, dtype=1)
    check_rejected(p2.recv((CREDIT, REJECTED)), "future", seq)
    # duplicate: the same participant, the same version again (p3: last_base v3) ...
    expect_refusal(p3, u, v3, "duplicate")
    # ... or an older one than its accepted update's (p3 on v2; p4 on v2 again, now at v4).
    expect_refusal(p3, u, v2, "duplicate")
    expect_refusal(p4, u, v2, "duplicate")
    # None of this moved anything: still v4, its buffer empty; a good update is taken.
    submit(p5, train(ref.models[v3], rng, target), v3, ref)
    st = check_state(p5.status(), **conf)
    assert st["round"] == v4 and st["last_base"] == v3, st
    submit(p4, train(ref.models[v4], rng, target), v4, ref)
    v5 = v4 + 1
    check_state(wait_version(p4, v5), **conf)
    assert_close(download(p4, v5), ref.models[v5])

    no_round_broadcast(peers)
    for p in peers:
        p.close()


@pytest.mark.parametrize("spec", ["poly:1.5", "hinge:2:1"])
def test_buffered_staleness_weights(buffered, ctx, spec):
    """Updates of staleness 0 to S = 3 in buffers of K = 3, weighted by `poly:a` or `hinge:a:b`."""
    K, S, LR = 3, 3, 1.5
    conf = dict(k=K, s=S, spec=spec, lr=LR)
    model0 = initial_model(11)
    target = initial_model(12).astype(np.float64)
    srv = buffered(K, S, spec, LR, model0)
    peers = hello_all(ctx, srv, [f"w-{i}" for i in range(8)], **conf)
    v0 = peers[0].state["round"]
    ref = Reference(model0, v0, K, LR, spec)
    rng = np.random.default_rng(13)
    # (participant, version its update is computed on, relative to v0), buffer after buffer.
    script = [
        [(0, 0), (1, 0), (2, 0)],  # v0: staleness 0, 0, 0
        [(3, 0), (4, 1), (0, 1)],  # v1: 1, 0, 0
        [(5, 0), (1, 1), (2, 2)],  # v2: 2, 1, 0
        [(6, 0), (3, 1), (4, 2)],  # v3: 3, 2, 1
    ]
    seen = set()
    for i, buffer in enumerate(script):
        assert ref.v == v0 + i
        for who, rel in buffer:
            p, base = peers[who], v0 + rel
            model = download(p, base)  # any of the last S + 1 versions is served
            assert_close(model, ref.models[base])
            body = submit(p, train(model, rng, target), base, ref)
            seen.add(body["staleness"])
        st = check_state(wait_version(peers[7], v0 + i + 1), **conf)
        assert st["previous"]["round"] == v0 + i and st["previous"]["accepted"] == K, st
        assert st["previous"]["model_updated"] is True
    assert seen == {0, 1, 2, 3}
    v4 = v0 + 4
    assert_close(download(peers[7], v4), ref.models[v4])
    assert_close(download(peers[7], v4 - S), ref.models[v4 - S])
    seq = peers[7].send(GET_MODEL, round=v0, offset=0, aux=1)
    check_rejected(peers[7].recv((MODEL, REJECTED)), "round", seq)
    seq = peers[7].send(CHUNK, b"\0" * CHUNK_BYTES, round=v0, session=peers[7].session,
                        offset=0, total=MODEL_BYTES, dtype=1)
    check_rejected(peers[7].recv((CREDIT, REJECTED)), "stale", seq)
    no_round_broadcast(peers)
    for p in peers:
        p.close()
