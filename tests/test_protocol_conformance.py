"""Conformance test of the fedagg wire protocol, written from docs/protocol.md alone.

The participant below (and its wire code, tests/doc_participant.py) uses only the standard
library, numpy and pyzmq: it does not import fedagg (the server under test runs as a
subprocess, ``python -m fedagg serve``). Every wait is bounded by a timeout and every loop by
a count.
"""

import json
import math
import os
import struct
import time

import numpy as np
import pytest

from doc_participant import ctx  # noqa: F401 - a fixture
from doc_participant import (ACCEPTED, CHUNK, CHUNK_BYTES, COMMIT, CREDIT, FIELDS, GET_MODEL, HEADER, HELLO, MODEL,
                            Peer, RECV_TIMEOUT, REJECTED, ROUND, STATE, STATUS, VERSION, check_rejected, crc32c,
                            is_int, raw, serve_factory, stop_servers)

CREDITS = 3
D = 6001  # 24004 bytes: 5 full chunks and a short one, two credit windows
MODEL_BYTES = 4 * D


@pytest.fixture
def serve(tmp_path):
    procs = []
    try:
        yield serve_factory(tmp_path, procs, D, CREDITS)
    finally:
        stop_servers(procs)


def check_state(m, *, d=D, rule="mean", f=0, server_lr=1.0, credits=CREDITS):
    """STATE's fields and types as the document's STATE table gives them."""
    assert m.kind == STATE
    st = m.json()
    assert isinstance(st, dict)
    for key in ("round", "session", "phase", "d", "dtype", "model_bytes", "chunk_bytes",
                "credits", "held", "accepted", "rule", "f", "server_lr", "previous", "shards", "shard",
                "d_total", "excluded"):
        assert key in st, f"STATE lacks {key!r}: {st}"
    # An unsharded server: one shard, this server, owning the whole model.
    assert isinstance(st["shards"], list) and len(st["shards"]) == 1, st["shards"]
    only = st["shards"][0]
    assert set(only) == {"endpoint", "lo", "hi"} and isinstance(only["endpoint"], str)
    assert only["endpoint"].startswith("tcp://") and only["lo"] == 0 and only["hi"] == d
    assert st["shard"] == 0 and st["d_total"] == d
    assert st["excluded"] is None or isinstance(st["excluded"], str)
    assert is_int(st["round"]) and st["round"] == m.h["round"]
    assert is_int(st["session"]) and st["session"] == m.h["session"]
    assert 0 < m.h["session"] < 2 ** 63  # "a 63-bit random number"
    assert st["phase"] in ("upload", "commit", "finished")
    assert is_int(st["d"]) and st["d"] == d
    assert st["dtype"] == "float32"
    assert is_int(st["model_bytes"]) and st["model_bytes"] == 4 * d
    assert is_int(st["chunk_bytes"]) and st["chunk_bytes"] == CHUNK_BYTES
    assert st["chunk_bytes"] % 4 == 0 and 4096 <= st["chunk_bytes"] <= 4 * 2 ** 20
    assert is_int(st["credits"]) and st["credits"] == credits
    assert is_int(st["held"]) and st["held"] >= 0
    assert isinstance(st["accepted"], bool)
    assert isinstance(st["rule"], str) and st["rule"] == rule
    assert is_int(st["f"]) and st["f"] == f
    assert isinstance(st["server_lr"], (int, float)) and not isinstance(st["server_lr"], bool)
    assert st["server_lr"] == pytest.approx(server_lr)
    prev = st["previous"]
    if prev is not None:
        check_previous(prev)
    return st


def check_previous(prev):
    assert isinstance(prev, dict)
    assert is_int(prev["round"])
    assert isinstance(prev["model_updated"], bool)
    assert prev["closed_by"] in ("quorum", "deadline")
    assert is_int(prev["accepted"])


def download(peer, rnd, aux, *, model_bytes=MODEL_BYTES, chunk_bytes=CHUNK_BYTES,
             credits=CREDITS):
    """The model of round rnd through GET_MODEL windows of aux chunks."""
    buf = bytearray(model_bytes)
    offset = 0
    for _ in range(model_bytes // chunk_bytes + 2):
        if offset >= model_bytes:
            break
        peer.send(GET_MODEL, round=rnd, offset=offset, aux=aux)
        left = math.ceil((model_bytes - offset) / chunk_bytes)
        n = min(max(aux, 1), credits, left)  # "min(max(aux, 1), credits)", fewer at the end
        wanted = {offset + i * chunk_bytes for i in range(n)}
        for _ in range(n):
            m = peer.recv((MODEL, REJECTED))
            assert m.kind == MODEL, m
            h = m.h
            assert h["round"] == rnd and h["session"] == peer.session
            assert h["dtype"] == 1 and h["total"] == model_bytes
            assert h["offset"] in wanted, (h["offset"], sorted(wanted))
            wanted.discard(h["offset"])
            size = min(chunk_bytes, model_bytes - h["offset"])
            assert len(m.payload) == size, (len(m.payload), size)
            buf[h["offset"]:h["offset"] + size] = m.payload
        offset += n * chunk_bytes
    else:
        raise AssertionError("download did not end")
    # No further MODEL message (each GET_MODEL got exactly its window).
    peer.drain(0.3)
    extra = [m for m in peer.backlog if m.kind == MODEL]
    assert not extra, f"{len(extra)} MODEL messages beyond the asked window"
    return np.frombuffer(bytes(buf), dtype="<f4").copy()


def upload(peer, data, rnd, *, dtype=1, codec=0, total=None, start=0, stop=None,
           credits=CREDITS, chunk_bytes=CHUNK_BYTES):
    """Send data[start:stop] in CHUNKs within the credit window.

    Returns ("held", bytes held) when every chunk is credited, or ("rejected", message,
    refused chunk's seq) at the first REJECTED.
    """
    data = bytes(data)
    total = len(data) if total is None else total
    stop = len(data) if stop is None else stop
    offset = start
    inflight = []  # (seq, end offset) of unanswered chunks, in sending order
    held = start
    for _ in range(4 * (len(data) // chunk_bytes + 2)):
        while len(inflight) < credits and offset < stop:
            piece = data[offset:min(offset + chunk_bytes, stop)]
            seq = peer.send(CHUNK, piece, round=rnd, session=peer.session, offset=offset,
                            total=total, dtype=dtype, codec=codec)
            inflight.append((seq, offset + len(piece)))
            offset += len(piece)
        assert len(inflight) <= credits
        if not inflight:
            return ("held", held)
        m = peer.recv((CREDIT, REJECTED))
        seq, end = inflight.pop(0)
        if m.kind == REJECTED:
            return ("rejected", m, seq)
        h = m.h
        assert h["aux"] == 1, h
        assert h["round"] == rnd and h["session"] == peer.session
        assert h["total"] == total, h
        assert h["offset"] == end, (h, end)  # bytes held after this chunk
        held = h["offset"]
    raise AssertionError("upload did not end")


def commit(peer, rnd, total):
    seq = peer.send(COMMIT, round=rnd, session=peer.session, total=total)
    return seq, peer.recv((ACCEPTED, REJECTED))


def full_upload(peer, data, rnd, **kw):
    res = upload(peer, data, rnd, **kw)
    assert res[0] == "held" and res[1] == len(data), res
    _, m = commit(peer, rnd, len(data))
    assert m.kind == ACCEPTED, m
    body = m.json()
    assert body == {"round": rnd, "id": peer.pid}, body
    assert m.h["round"] == rnd and m.h["session"] == peer.session
    return m


def initial_model(seed=0, d=D):
    return np.random.default_rng(seed).standard_normal(d).astype(np.float32)


def wait_round(peer, after, timeout=RECV_TIMEOUT):
    """The ROUND that starts the round after `after`."""
    m = peer.recv(lambda m: m.kind == ROUND and m.h["round"] > after, timeout)
    body = m.json()
    assert is_int(body["round"]) and body["round"] == m.h["round"] == after + 1, body
    assert m.h["session"] == peer.session
    check_previous(body["previous"])
    return body


# ----------------------------------------------------------------------------------------
# Tests

def test_crc32c_check_values():
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def test_full_round(serve, ctx):
    """HELLO -> STATE, GET_MODEL windows, CHUNKs within the credits, COMMIT -> ACCEPTED,
    ROUND with a new model equal to model + server_lr * mean(updates)."""
    lr = 0.5
    model0 = initial_model(1)
    srv = serve("--quorum", "3", "--deadline", "60", "--server-lr", str(lr), "--rule", "mean",
                model=model0)
    peers = [Peer(ctx, srv.endpoint, f"peer-{i}", f"secret-{i}-{os.urandom(8).hex()}")
             for i in range(3)]
    states = []
    for p in peers:
        _, m = p.hello()
        st = check_state(m, server_lr=lr)
        assert st["phase"] == "upload"
        assert st["held"] == 0 and st["accepted"] is False
        states.append(st)
    rnd = states[0]["round"]
    assert {st["round"] for st in states} == {rnd}
    assert len({p.session for p in peers}) == 1

    # aux = 0 counts as 1; aux = 2; aux above credits gives credits.
    for p, aux in zip(peers, (0, 2, 1000)):
        got = download(p, rnd, aux)
        assert np.array_equal(got, model0), f"aux={aux}: downloaded model differs"

    rng = np.random.default_rng(2)
    updates = [(0.1 * rng.standard_normal(D)).astype(np.float32) for _ in peers]
    for i, (p, u) in enumerate(zip(peers, updates)):
        full_upload(p, raw(u), rnd)
        if i < 2:  # quorum not reached yet: still the same round, accepted
            st = check_state(p.status(), server_lr=lr)
            assert st["round"] == rnd and st["accepted"] is True
            # `held` after acceptance is not asserted: the document does not say whether
            # an accepted update still counts as "held" (this server answers 0).

    for p in peers:
        body = wait_round(p, rnd)
        assert body["previous"] == {"round": rnd, "model_updated": True,
                                    "closed_by": "quorum", "accepted": 3}, body

    st = check_state(peers[1].status(), server_lr=lr)
    assert st["round"] == rnd + 1 and st["held"] == 0 and st["accepted"] is False
    assert st["previous"]["model_updated"] is True

    new = download(peers[0], rnd + 1, 2)
    expected = model0.astype(np.float64) + lr * np.mean(
        np.stack([u.astype(np.float64) for u in updates]), axis=0)
    np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)

    # GET_MODEL for the previous round: refused `round`.
    seq = peers[2].send(GET_MODEL, round=rnd, offset=0, aux=1)
    check_rejected(peers[2].recv((MODEL, REJECTED)), "round", seq)
    for p in peers:
        p.close()


def _upload_refusal(peer, data, rnd, reason, **kw):
    """Upload data and COMMIT, expecting `reason` at a chunk or at COMMIT (the document
    does not say at which point `size` or `nonfinite` is detected)."""
    total = kw.pop("total", len(data))
    res = upload(peer, data, rnd, total=total, **kw)
    if res[0] == "rejected":
        _, m, seq = res
        return "chunk", check_rejected(m, reason, seq)
    seq, m = commit(peer, rnd, total)
    return "commit", check_rejected(m, reason, seq)


def test_version_1_is_refused_in_version_1(serve, ctx):
    """ "A server answers any message of another version ... with REJECTED reason `version` in the
    sender's version, and takes nothing from it." """
    srv = serve("--quorum", "100", "--deadline", "60")
    old = Peer(ctx, srv.endpoint, "old-client", "secret-old")
    old.sock.send_multipart([HEADER.pack(b"FAGW", 1, HELLO, 0, 0, 0, 0, 0, old.next_seq(), 0, 0,
                                         crc32c(b'{"id":"old-client"}'), 0, 0), b'{"id":"old-client"}'])
    assert old.sock.poll(int(RECV_TIMEOUT * 1000)), "no answer to a version 1 HELLO"
    frames = old.sock.recv_multipart()
    h = dict(zip(FIELDS, HEADER.unpack(frames[0])))
    assert h["magic"] == b"FAGW" and h["version"] == 1 and h["kind"] == REJECTED, h
    assert h["checksum"] == crc32c(frames[1])
    body = json.loads(frames[1])
    assert body["reason"] == "version" and "version 2" in body["detail"], body
    # ... and took nothing from it: the connection is still unknown.
    seq = old.send(STATUS)
    check_rejected(old.recv((STATE, REJECTED)), "unknown", seq)
    old.close()


def test_refusals(serve, ctx):
    srv = serve("--quorum", "100", "--deadline", "60")
    ep = srv.endpoint

    # unknown: a message before HELLO
    u = Peer(ctx, ep)
    seq = u.send(STATUS)
    check_rejected(u.recv((STATE, REJECTED)), "unknown", seq)

    a = Peer(ctx, ep, "ref-a", "secret-a")
    _, m = a.hello()
    st = check_state(m)
    rnd = st["round"]

    # replayed: a seq equal to, then below, the last one
    last = a.seq
    seq = a.send(STATUS, seq=last)
    check_rejected(a.recv((STATE, REJECTED)), "replayed", last)
    seq = a.send(STATUS, seq=last - 10)
    check_rejected(a.recv((STATE, REJECTED)), "replayed", last - 10)
    a.status()  # a larger seq is taken again

    rng = np.random.default_rng(3)
    data = raw(rng.standard_normal(D).astype(np.float32))

    # order: first chunk not at 0; then a gap after a held chunk
    c = Peer(ctx, ep, "ref-c", "secret-c")
    c.hello()
    seq = c.send(CHUNK, data[CHUNK_BYTES:2 * CHUNK_BYTES], round=rnd, session=c.session,
                 offset=CHUNK_BYTES, total=MODEL_BYTES, dtype=1)
    assert check_rejected(c.recv((CREDIT, REJECTED)), "order", seq)["held"] == 0

    b = Peer(ctx, ep, "ref-b", "secret-b")
    b.hello()
    assert upload(b, data, rnd, stop=CHUNK_BYTES) == ("held", CHUNK_BYTES)
    seq = b.send(CHUNK, data[2 * CHUNK_BYTES:3 * CHUNK_BYTES], round=rnd, session=b.session,
                 offset=2 * CHUNK_BYTES, total=MODEL_BYTES, dtype=1)
    assert check_rejected(b.recv((CREDIT, REJECTED)), "order", seq)["held"] == CHUNK_BYTES

    # checksum: a corrupt chunk is not held; resent intact it is
    piece = data[CHUNK_BYTES:2 * CHUNK_BYTES]
    seq = b.send(CHUNK, piece, round=rnd, session=b.session, offset=CHUNK_BYTES,
                 total=MODEL_BYTES, dtype=1, checksum=crc32c(piece) ^ 0x1)
    assert check_rejected(b.recv((CREDIT, REJECTED)), "checksum", seq)["held"] == CHUNK_BYTES
    assert upload(b, data, rnd, start=CHUNK_BYTES, stop=2 * CHUNK_BYTES) == \
        ("held", 2 * CHUNK_BYTES)

    # incomplete: COMMIT before every byte is held
    seq, m = commit(b, rnd, MODEL_BYTES)
    assert check_rejected(m, "incomplete", seq)["held"] == 2 * CHUNK_BYTES

    # session: a chunk carrying another session id
    seq = b.send(CHUNK, data[2 * CHUNK_BYTES:3 * CHUNK_BYTES], round=rnd,
                 session=b.session ^ 1, offset=2 * CHUNK_BYTES, total=MODEL_BYTES, dtype=1)
    assert check_rejected(b.recv((CREDIT, REJECTED)), "session", seq)["held"] == 2 * CHUNK_BYTES

    # GET_MODEL off a chunk boundary, or past the end: malformed
    for off in (4, MODEL_BYTES + CHUNK_BYTES):
        seq = b.send(GET_MODEL, round=rnd, offset=off, aux=1)
        check_rejected(b.recv((MODEL, REJECTED)), "malformed", seq)

    # duplicate: a second update of an accepted participant in the same round
    du = Peer(ctx, ep, "ref-dup", "secret-d")
    du.hello()
    full_upload(du, data, rnd)
    res = upload(du, data, rnd, stop=CHUNK_BYTES)
    assert res[0] == "rejected", res
    check_rejected(res[1], "duplicate", res[2])

    # future: a chunk for the next round
    fu = Peer(ctx, ep, "ref-future", "secret-f")
    fu.hello()
    seq = fu.send(CHUNK, data[:CHUNK_BYTES], round=rnd + 1, session=fu.session, offset=0,
                  total=MODEL_BYTES, dtype=1)
    check_rejected(fu.recv((CREDIT, REJECTED)), "future", seq)

    # size: a raw update 4 bytes short
    sz = Peer(ctx, ep, "ref-size", "secret-s")
    sz.hello()
    _upload_refusal(sz, data[:-4], rnd, "size")

    # nonfinite: NaN in the third chunk; +Inf in the last one
    for name, index, value in (("ref-nan", 2 * 1024 + 5, np.nan), ("ref-inf", D - 1, np.inf)):
        nf = Peer(ctx, ep, name, "secret-n")
        nf.hello()
        bad = np.frombuffer(data, dtype="<f4").copy()
        bad[index] = value
        _upload_refusal(nf, raw(bad), rnd, "nonfinite")

    # malformed: a 3-frame message. The document says REJECTED's seq is the refused
    # message's, "0 if it could not be parsed": whether a 3-frame message counts as parsed
    # is not said, so both are accepted here.
    g = Peer(ctx, ep, "ref-g", "secret-g")
    g.hello()
    seq = g.send(STATUS, extra_frames=(b"extra",))
    m = g.recv((STATE, REJECTED))
    assert m.kind == REJECTED, m
    assert m.json()["reason"] == "malformed"
    assert m.h["seq"] in (0, seq) and m.json()["seq"] == m.h["seq"]
    # ... and a 1-frame message
    g.sock.send_multipart([HEADER.pack(b"FAGW", VERSION, STATUS, 0, 0, 0, 0, 0, g.next_seq(), 0, 0,
                                       0, 0, 0)])
    m = g.recv((STATE, REJECTED))
    assert m.kind == REJECTED and m.json()["reason"] == "malformed", m

    # No refusal changed what the server holds for b; the round is still the same.
    st = check_state(b.status())
    assert st["round"] == rnd and st["held"] == 2 * CHUNK_BYTES and st["accepted"] is False
    for p in (u, a, b, c, fu, sz, g):
        p.close()


def test_reconnection(serve, ctx):
    model0 = initial_model(4)
    srv = serve("--quorum", "1", "--deadline", "60", model=model0)
    secret = "reconnect-" + os.urandom(8).hex()
    a = Peer(ctx, srv.endpoint, "rc", secret)
    _, m = a.hello()
    rnd = check_state(m)["round"]
    update = (0.25 * np.random.default_rng(5).standard_normal(D)).astype(np.float32)
    data = raw(update)
    sent = 3 * CHUNK_BYTES
    assert upload(a, data, rnd, stop=sent) == ("held", sent)

    # A new connection with the same id and secret takes the entry over.
    b = Peer(ctx, srv.endpoint, "rc", secret, seq=a.seq)
    _, m = b.hello()
    st = check_state(m)
    assert st["round"] == rnd and st["held"] == sent and st["accepted"] is False

    # Claims of the id without the right secret, while its upload is in progress.
    c = Peer(ctx, srv.endpoint, "rc", "another-secret")
    seq, m = c.hello(expect_state=False)
    check_rejected(m, "claimed", seq)
    e = Peer(ctx, srv.endpoint, "rc", None)
    seq, m = e.hello(expect_state=False)
    check_rejected(m, "claimed", seq)

    # Finish from the new connection, from `held`.
    assert upload(b, data, rnd, start=st["held"]) == ("held", MODEL_BYTES)
    _, m = commit(b, rnd, MODEL_BYTES)
    assert m.kind == ACCEPTED and m.json() == {"round": rnd, "id": "rc"}, m
    body = wait_round(b, rnd)
    assert body["previous"] == {"round": rnd, "model_updated": True, "closed_by": "quorum",
                                "accepted": 1}
    new = download(b, rnd + 1, 3)
    np.testing.assert_allclose(new, model0.astype(np.float64) + update, rtol=1e-6, atol=1e-6)
    for p in (a, b, c, e):
        p.close()


def topk_blob(d, indices, values, pad=0):
    """A codec-1 payload built from the document's "Compressed updates" section."""
    indices = np.ascontiguousarray(indices, dtype="<u4")
    values = np.ascontiguousarray(values, dtype="<f4")
    k = len(indices)
    meta = {"codec": "topk", "d": d, "dtype": "float32", "params": {"k": k},
            "buffers": [{"name": "indices", "dtype": "uint32", "count": k},
                        {"name": "values", "dtype": "float32", "count": k}]}
    js = json.dumps(meta).replace('"codec": ', '"codec": ' + " " * pad, 1).encode("utf-8")
    frames = [b"FAGP" + struct.pack("<HI", 1, len(js)) + js, indices.tobytes(),
              values.tobytes()]
    return (struct.pack("<I", len(frames)) + b"".join(struct.pack("<Q", len(f)) for f in frames)
            + b"".join(frames))


def test_compressed_topk(serve, ctx):
    lr = 2.0
    model0 = initial_model(6)
    srv = serve("--quorum", "1", "--deadline", "60", "--server-lr", str(lr), model=model0)
    p = Peer(ctx, srv.endpoint, "zip", "secret-zip")
    _, m = p.hello()
    rnd = check_state(m, server_lr=lr)["round"]
    rng = np.random.default_rng(7)
    k = 1501
    indices = np.sort(rng.choice(D, size=k, replace=False)).astype(np.uint32)
    values = rng.standard_normal(k).astype(np.float32)
    # JSON whitespace chosen so that the blob's size is not a multiple of 4: its last chunk
    # then is not either ("chunk payloads need not be multiples of 4").
    for pad in range(4):
        blob = topk_blob(D, indices, values, pad=pad)
        if len(blob) % 4:
            break
    assert len(blob) > 2 * CHUNK_BYTES and len(blob) % 4 != 0
    res = upload(p, blob, rnd, dtype=0, codec=1)
    assert res == ("held", len(blob)), res
    _, m = commit(p, rnd, len(blob))
    assert m.kind == ACCEPTED, m
    body = wait_round(p, rnd)
    assert body["previous"]["model_updated"] is True
    decoded = np.zeros(D, dtype=np.float64)
    decoded[indices] = values
    new = download(p, rnd + 1, 1000)
    np.testing.assert_allclose(new, model0.astype(np.float64) + lr * decoded,
                               rtol=1e-6, atol=1e-6)
    p.close()


def test_deadline_without_new_model(serve, ctx):
    deadline = 4.0
    model0 = initial_model(8)
    srv = serve("--quorum", "3", "--min-updates", "2", "--deadline", str(deadline),
                model=model0)
    p = Peer(ctx, srv.endpoint, "lonely", "secret-l")
    t0 = time.monotonic()
    _, m = p.hello()
    rnd = check_state(m)["round"]
    full_upload(p, raw(np.ones(D, dtype=np.float32)), rnd)
    body = wait_round(p, rnd, timeout=deadline + 10)
    assert time.monotonic() - t0 < deadline + 10
    assert body["previous"] == {"round": rnd, "model_updated": False,
                                "closed_by": "deadline", "accepted": 1}, body
    st = check_state(p.status())
    assert st["round"] == rnd + 1 and st["previous"] == body["previous"]
    assert st["held"] == 0 and st["accepted"] is False
    new = download(p, rnd + 1, 3)
    assert np.array_equal(new, model0)
    p.close()


def test_linger_serves_final_model(serve, ctx):
    model0 = initial_model(9)
    srv = serve("--quorum", "1", "--deadline", "60", "--rounds", "1", "--linger", "30",
                model=model0)
    p = Peer(ctx, srv.endpoint, "last", "secret-last")
    _, m = p.hello()
    rnd = check_state(m)["round"]
    update = (0.5 * np.random.default_rng(10).standard_normal(D)).astype(np.float32)
    full_upload(p, raw(update), rnd)

    # The document does not say whether a ROUND follows the last round: poll STATUS.
    st = None
    for _ in range(50):
        st = check_state(p.status())
        if st["phase"] == "finished":
            break
        time.sleep(0.1)
    assert st["phase"] == "finished", st
    assert st["previous"] is not None and st["previous"]["model_updated"] is True
    assert st["previous"]["round"] == rnd
    final_round = st["round"]

    expected = model0.astype(np.float64) + update
    got = download(p, final_round, 2)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)

    seq = p.send(CHUNK, raw(update)[:CHUNK_BYTES], round=final_round, session=p.session,
                 offset=0, total=MODEL_BYTES, dtype=1)
    check_rejected(p.recv((CREDIT, REJECTED)), "finished", seq)

    # A participant arriving after the end can still say HELLO and fetch the final model.
    q = Peer(ctx, srv.endpoint, "latecomer", "secret-late")
    _, m = q.hello()
    st = check_state(m)
    assert st["phase"] == "finished"
    np.testing.assert_allclose(download(q, st["round"], 0), expected, rtol=1e-6, atol=1e-6)
    p.close()
    q.close()


def test_busy_carries_retry_after_and_the_upload_resumes_after_it(serve, ctx):
    """ "busy ... The body carries retry_after, seconds (0.05 to 10) ...: wait about that long,
    jittered, then resume with STATUS" (Refusals during an upload, and the reason table)."""
    srv = serve("--quorum", "2", "--deadline", "60", "--max-inflight", "1")
    a = Peer(ctx, srv.endpoint, "holder", f"secret-a-{os.urandom(8).hex()}")
    b = Peer(ctx, srv.endpoint, "waiter", f"secret-b-{os.urandom(8).hex()}")
    rnd = check_state(a.hello()[1])["round"]
    check_state(b.hello()[1])
    rng = np.random.default_rng(5)
    ua, ub = (rng.standard_normal(D).astype(np.float32) for _ in range(2))
    # a's first chunk takes the only upload slot
    assert upload(a, raw(ua), rnd, stop=CHUNK_BYTES) == ("held", CHUNK_BYTES)
    # "busy ... present when the server would refuse a new upload's first CHUNK busy now" (STATE)
    said = check_state(b.status()).get("busy")
    assert isinstance(said, (int, float)) and 0.05 <= said <= 10, said
    res = upload(b, raw(ub), rnd)
    assert res[0] == "rejected", res
    body = check_rejected(res[1], "busy", res[2])
    wait = body["retry_after"]
    assert isinstance(wait, (int, float)) and 0.05 <= wait <= 10, body
    for _ in range(CREDITS - 1):  # the rest of b's window: not at `held` (0) any more, refused too
        assert b.recv((REJECTED,)).json()["reason"] == "order"
    # a finishes from what it holds: the slot is free again
    assert upload(a, raw(ua), rnd, start=CHUNK_BYTES)[0] == "held"
    _, m = commit(a, rnd, MODEL_BYTES)
    assert m.kind == ACCEPTED, m
    time.sleep(wait)
    st = check_state(b.status())
    assert st["round"] == rnd and st["held"] == 0  # a refused first chunk is not held
    assert "busy" not in st  # "(absent when not)": the slot is free
    full_upload(b, raw(ub), rnd)
    body = wait_round(b, rnd)
    assert body["previous"]["accepted"] == 2 and body["previous"]["model_updated"] is True
