"""Buffered asynchronous rounds (FedBuff, ServerConfig(mode="buffered")).

The server's models are checked against a float64 reference of FedBuff's update rule written
here from the paper (Nguyen et al. 2022, Algorithm 1): an update computed on version b and
accepted while version v is current enters the buffer as w(v - b) * update; every K accepted
updates the model moves by server_lr x (the rule over the buffer). The test keeps its own count
of versions: it never reads the staleness it checks from the server. Servers bind to loopback;
every wait is bounded.
"""

import json
import math
import threading
import time

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

import reference as R  # noqa: E402
from fedagg.transport import Client, ServerConfig, TransportError  # noqa: E402
from fedagg.transport.protocol import Kind, message, parse_json  # noqa: E402
from fedagg.transport.staleness import staleness_weight  # noqa: E402

WEIGHTS = {
    "sqrt": lambda s: 1.0 / math.sqrt(1.0 + s),
    "constant": lambda s: 1.0,
    "poly:0.7": lambda s: (1.0 + s) ** -0.7,
    "hinge:2:1": lambda s: 1.0 if s <= 1 else 1.0 / (2.0 * (s - 1) + 1.0),
}


def clip_rows(X, C):
    norms = np.sqrt((X * X).sum(axis=1))
    return X * np.minimum(1.0, C / np.maximum(norms, np.finfo(np.float64).tiny))[:, None]


class Fleet:
    """Participants that submit one at a time while the test counts versions itself."""

    def __init__(self, endpoint, n, d, seed, weight):
        self.weight = weight
        self.clients = [Client(endpoint, f"dev-{i}", timeout=20) for i in range(n)]
        self.rng = np.random.default_rng(seed)
        self.d = d
        self.version, self.in_buffer = 0, []
        self.last_base = {}
        self.buffers = []  # per version: [(participant, base, staleness, update)]

    def submit(self, i, base, K):
        u = self.rng.standard_normal(self.d).astype(np.float32)
        got = self.clients[i].submit(u, base)
        staleness = self.version - base
        assert got == {"id": f"dev-{i}", "round": base, "version": self.version, "staleness": staleness,
                       "scale": pytest.approx(self.weight(staleness), rel=1e-15)}
        self.in_buffer.append((i, base, staleness, u))
        self.last_base[i] = base
        if len(self.in_buffer) == K:
            self.buffers.append(self.in_buffer)
            self.in_buffer, self.version = [], self.version + 1
        return got

    def close(self):
        for c in self.clients:
            c.close()


def fedbuff_reference(x0, buffers, weight, lr, rule="mean", f=0, clip=None):
    """x_{v+1} = x_v + lr * rule({w(s_i) * Delta_i : i in buffer v}), in float64."""
    x = x0.astype(np.float64)
    for buf in buffers:
        rows = np.stack([weight(s) * u.astype(np.float64) for _, _, s, u in buf])
        if clip is not None:
            rows = clip_rows(rows, clip)
        x = x + lr * R.aggregate(rows, rule, f)
    return x


def random_plan(fleet, K, S, steps, rng):
    """Each step: a participant not in the current buffer, on a version in [v - S, v] it has not used."""
    for _ in range(steps):
        busy = {j for j, *_ in fleet.in_buffer}
        while True:
            i = int(rng.integers(len(fleet.clients)))
            lo = max(fleet.version - S, fleet.last_base.get(i, -1) + 1)
            if i not in busy and lo <= fleet.version:
                break
        yield i, int(rng.integers(lo, fleet.version + 1))


@pytest.mark.parametrize("staleness", list(WEIGHTS))
def test_buffered_mean_equals_fedbuff_reference(running, staleness):
    d, K, S, lr = 257, 4, 3, 0.5
    r = running(d=d, mode="buffered", quorum=K, max_staleness=S, staleness=staleness, server_lr=lr)
    fleet = Fleet(r.endpoint, 7, d, seed=1, weight=WEIGHTS[staleness])
    try:
        rng = np.random.default_rng(2)
        for i, base in random_plan(fleet, K, S, 5 * K, rng):
            fleet.submit(i, base, K)
        assert len(fleet.buffers) == 5
        deadline = time.monotonic() + 20
        while r.server.round < 5 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert r.server.round == 5
        assert any(s > 0 for buf in fleet.buffers for _, _, s, _ in buf), "the plan must exercise staleness"
        ref = fedbuff_reference(np.zeros(d), fleet.buffers, WEIGHTS[staleness], lr)
        np.testing.assert_allclose(r.server.model, ref, rtol=1e-5, atol=1e-6)
        # the server's records: each version's buffer, in acceptance order, with its bases and weights
        records = list(r.server.history)
        for rec, buf in zip(records, fleet.buffers):
            assert rec["accepted"] == [f"dev-{i}" for i, *_ in buf]
            assert rec["bases"] == [b for _, b, _, _ in buf]
            assert rec["staleness"] == [s for _, _, s, _ in buf]
            np.testing.assert_allclose(rec["scales"], [WEIGHTS[staleness](s) for _, _, s, _ in buf], rtol=1e-15)
            lat = rec["accepted_latency_ms"]  # every ACCEPTED of the version, COMMIT to answer, at the server
            assert lat["n"] == K and 0 <= lat["p50"] <= lat["p99"] <= lat["max"] < 20_000
    finally:
        fleet.close()


@pytest.mark.parametrize("rule,f,clip", [("median", 0, None), ("trimmed_mean", 1, None), ("mean", 0, 0.8),
                                         ("krum", 1, None)])
def test_buffered_rules_and_clipping_on_weighted_updates(running, rule, f, clip):
    """Held rules see w(s) * update; clipping applies to that (so a stale update never counts more)."""
    d, K, S = 64, 5, 2
    r = running(d=d, mode="buffered", quorum=K, max_staleness=S, rule=rule, f=f, clip_norm=clip)
    fleet = Fleet(r.endpoint, 8, d, seed=3, weight=WEIGHTS["sqrt"])
    try:
        rng = np.random.default_rng(4)
        for i, base in random_plan(fleet, K, S, 3 * K, rng):
            fleet.submit(i, base, K)
        deadline = time.monotonic() + 20
        while r.server.round < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        ref = fedbuff_reference(np.zeros(d), fleet.buffers, WEIGHTS["sqrt"], 1.0, rule, f, clip)
        np.testing.assert_allclose(r.server.model, ref, rtol=1e-5, atol=1e-6)
    finally:
        fleet.close()


def test_stale_future_and_duplicate_uploads_are_refused_with_reasons(running):
    d, K, S = 16, 2, 1
    r = running(d=d, mode="buffered", quorum=K, max_staleness=S)
    a, b, c = (Client(r.endpoint, pid, timeout=10) for pid in ("a", "b", "c"))
    try:
        one = np.ones(d, np.float32)
        a.submit(one, 0)
        with pytest.raises(TransportError) as e:  # the same version twice
            a.submit(one, 0)
        assert e.value.reason == "duplicate"
        with pytest.raises(TransportError) as e:
            a.submit(one, 3)
        assert e.value.reason == "future"
        b.submit(one, 0)  # version 1 is published
        c.submit(one, 1)
        a.submit(one, 1)  # version 2
        wait = time.monotonic() + 10
        while r.server.round < 2 and time.monotonic() < wait:
            time.sleep(0.02)
        with pytest.raises(TransportError) as e:  # version 0 is 2 versions old, S = 1
            c.submit(one, 0)
        assert e.value.reason == "stale"
        with pytest.raises(TransportError) as e:  # older than its own last update: a replay
            a.submit(one, 1)
        assert e.value.reason == "duplicate"
        # the protocol's answer, not only the client's: a CHUNK of version 0 gets REJECTED "stale"
        c._send(message(Kind.CHUNK, one.view(np.uint8), round=0, offset=0, total=4 * d, seq=c._next(), dtype=1,
                        session=c.state["session"]))
        got = c._recv(time.monotonic() + 5)
        assert got[0].kind == Kind.REJECTED and parse_json(got[1])["reason"] == "stale"
        counts = r.server.rejected_counts
        assert counts.get("stale", 0) >= 1 and counts.get("future", 0) == 0  # "future" was refused by the client
    finally:
        for x in (a, b, c):
            x.close()


def test_an_upload_streams_on_while_a_version_is_published(running):
    """A slow participant's chunks keep coming across the version change: its update joins the next
    buffer with staleness 1, and its model download of the old version finishes too."""
    d, K = 4096, 2  # four 4 KiB chunks, one credit: the slow upload spans the others' buffer
    r = running(d=d, mode="buffered", quorum=K, max_staleness=3, chunk_bytes=4096, credits=1)
    slow, a, b = (Client(r.endpoint, pid, timeout=20) for pid in ("slow", "a", "b"))
    try:
        v, model0 = slow.model()
        out = {}
        t = threading.Thread(target=lambda: out.update(slow.submit(np.full(d, 8, np.float32), v, chunk_delay=0.4)))
        t.start()
        time.sleep(0.3)  # its first chunk is in
        a.submit(np.ones(d, np.float32), 0)
        b.submit(np.ones(d, np.float32), 0)  # version 1 published while `slow` streams
        wait = time.monotonic() + 10
        while r.server.round < 1 and time.monotonic() < wait:
            time.sleep(0.02)
        assert r.server.round == 1 and "slow" in r.server.uploads
        # the previous version's model is still served (a download begun before the publish finishes)
        a._send(message(Kind.GET_MODEL, b"", round=0, offset=0, aux=1, seq=a._next()))
        got = a._recv(time.monotonic() + 5)
        assert got[0].kind == Kind.MODEL and got[0].round == 0
        assert np.array_equal(np.frombuffer(got[1], np.float32), model0[:1024])
        t.join(20)
        assert out == {"id": "slow", "round": 0, "version": 1, "staleness": 1, "scale": 1 / math.sqrt(2)}
        assert r.server.history[0]["abandoned_count"] == 0
    finally:
        for x in (slow, a, b):
            x.close()


def test_a_too_stale_upload_in_progress_is_given_up_at_the_version_change(running):
    d, K = 4096, 1
    r = running(d=d, mode="buffered", quorum=K, max_staleness=0, chunk_bytes=4096, credits=1)
    slow, a = Client(r.endpoint, "slow", timeout=10), Client(r.endpoint, "a", timeout=10)
    try:
        slow._send(message(Kind.CHUNK, np.zeros(1024, np.float32).view(np.uint8), round=0, offset=0,
                           total=4 * d, seq=slow._next(), dtype=1, session=slow.state["session"]))
        wait = time.monotonic() + 5
        while "slow" not in r.server.uploads and time.monotonic() < wait:
            time.sleep(0.01)
        a.submit(np.ones(d, np.float32), 0)
        wait = time.monotonic() + 10
        while not r.server.history and time.monotonic() < wait:
            time.sleep(0.02)
        rec = r.server.history[0]
        assert rec["abandoned_uploads"] == ["slow"] and "slow" not in r.server.uploads
        assert r.server.buffers.held == 0  # its buffer left the budget
    finally:
        slow.close()
        a.close()


def test_restart_loses_no_accepted_update_and_remembers_versions(running, tmp_path):
    d, K, S = 32, 3, 2
    kw = dict(d=d, mode="buffered", quorum=K, max_staleness=S, state_dir=str(tmp_path))
    r = running(**kw)
    rng = np.random.default_rng(5)
    U = rng.standard_normal((8, d)).astype(np.float32)
    c = [Client(r.endpoint, f"p{i}", timeout=20) for i in range(4)]
    c[0].submit(U[0], 0)
    c[1].submit(U[1], 0)
    c[2].submit(U[2], 0)  # version 1
    c[0].submit(U[3], 1)  # in version 1's buffer, on disk before its ACCEPTED
    r.stop()
    for x in c:
        x.close()
    r2 = running(**kw)
    assert r2.server.round == 1 and list(r2.server.accepted) == ["p0"]
    c = [Client(r2.endpoint, f"p{i}", timeout=20) for i in range(4)]
    try:
        with pytest.raises(TransportError) as e:  # its version-0 update went into version 1, before the restart
            c[1].submit(U[4], 0)
        assert e.value.reason == "duplicate"
        got = c[3].submit(U[5], 0)  # staleness 1
        assert got["staleness"] == 1
        c[2].submit(U[6], 1)  # version 2
        wait = time.monotonic() + 10
        while r2.server.round < 2 and time.monotonic() < wait:
            time.sleep(0.02)
        w = WEIGHTS["sqrt"]
        ref = (U[0] + U[1] + U[2]).astype(np.float64) / 3
        ref = ref + (U[3].astype(np.float64) + w(1) * U[5] + U[6]) / 3
        np.testing.assert_allclose(r2.server.model, ref, rtol=1e-5, atol=1e-6)
        state = json.loads((tmp_path / "server.json").read_text())
        assert state["round"] == 2 and state["extra"]["last_base"] == {"p0": 1, "p1": 0, "p2": 1, "p3": 0}
    finally:
        for x in c:
            x.close()


def test_one_update_per_participant_per_buffer_the_next_waits(running):
    """A participant whose update sits in the current buffer sends its next one: its COMMIT waits,
    and the update joins the next buffer (no participant twice in one buffer)."""
    d, K = 8, 2
    r = running(d=d, mode="buffered", quorum=K, max_staleness=4)
    a, b, c = (Client(r.endpoint, pid, timeout=20) for pid in ("a", "b", "c"))
    try:
        b.submit(np.ones(d, np.float32), 0)
        c.submit(np.ones(d, np.float32), 0)  # version 1
        assert a.submit(np.ones(d, np.float32), 0)["version"] == 1  # in version 1's buffer
        out = {}
        t = threading.Thread(target=lambda: out.update(a.submit(np.full(d, 3, np.float32), 1)))
        t.start()
        wait = time.monotonic() + 10
        while "a" not in r.server._parked and time.monotonic() < wait:
            time.sleep(0.01)
        time.sleep(0.3)
        assert "a" in r.server._parked and out == {}  # its COMMIT waits, unanswered
        st = b.status()
        assert st["last_base"] == 0 and st["buffer"] == K and st["mode"] == "buffered"
        b.submit(np.ones(d, np.float32), 1)  # version 2
        t.join(20)
        assert out == {"id": "a", "round": 1, "version": 2, "staleness": 1, "scale": 1 / math.sqrt(2)}
        assert r.server.history[1]["accepted"] == ["a", "b"]
    finally:
        for x in (a, b, c):
            x.close()


def test_staleness_weights_match_their_formulas():
    for spec, ref in WEIGHTS.items():
        w = staleness_weight(spec)
        for s in range(0, 50):
            assert w(s) == pytest.approx(ref(s), rel=1e-15)
            assert 0 < w(s) <= 1
    for bad in ("sqrt:2", "poly", "poly:0", "poly:-1", "hinge:1", "hinge:0:1", "hinge:1:-1", "poly:nan",
                "poly:x", "fedbuff", ""):
        with pytest.raises(ValueError):
            staleness_weight(bad)
    with pytest.raises(TypeError):
        staleness_weight(None)


@pytest.mark.parametrize("kw,match", [
    (dict(mode="async"), "mode must be"),
    (dict(mode="buffered", max_staleness=-1), "max_staleness"),
    (dict(mode="buffered", max_staleness=1.5), "max_staleness"),
    (dict(mode="buffered", staleness="linear"), "unknown staleness"),
    (dict(mode="buffered", rule="krum", f=2, quorum=4), "cannot run on 4 updates"),
])
def test_buffered_config_is_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        ServerConfig(**kw).check()


def test_buffered_refuses_what_it_cannot_do_yet():
    from fedagg.transport import SecureConfig
    from fedagg.transport.shards import ShardSpec

    with pytest.raises(ValueError, match="buffered mode cannot be combined with secure"):
        ServerConfig(mode="buffered", quorum=8, min_updates=8, secure=SecureConfig()).check()
    with pytest.raises(ValueError, match="buffered mode cannot be combined with shards"):
        ServerConfig(mode="buffered", shard=ShardSpec(0, ("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"), 10)).check()


def test_central_dp_is_accounted_per_buffer(running):
    """Each published version is one DP release: its epsilon composes one more event, the same as a
    CentralDP that released the same number of buffers through fedagg.aggregate."""
    import fedagg
    from fedagg.privacy import CentralDP

    d, K = 32, 3
    kw = dict(noise_multiplier=1.0, clip_norm=1.0, expected_participants=K, seed=5)
    r = running(d=d, mode="buffered", quorum=K, max_staleness=2, dp=CentralDP(**kw))
    clients = [Client(r.endpoint, f"p{i}", timeout=20) for i in range(K)]
    try:
        for v in range(3):
            for c in clients:
                c.submit(np.full(d, 0.01, np.float32), v)
            wait = time.monotonic() + 10
            while r.server.round < v + 1 and time.monotonic() < wait:
                time.sleep(0.02)
        eps = [rec["privacy"]["epsilon"] for rec in r.server.history]
        assert len(eps) == 3 and eps[0] < eps[1] < eps[2]
        ref = CentralDP(**kw)
        want = [fedagg.aggregate(np.full((K, d), 0.01, np.float32), "mean", dp=ref, return_info=True)[1]
                .privacy.epsilon for _ in range(3)]
        np.testing.assert_allclose(eps, want, rtol=1e-9)
    finally:
        for c in clients:
            c.close()


def test_a_waiting_commit_outlives_the_upload_timeout(running):
    """A COMMIT waiting for the next buffer holds a complete upload: the sweep of silent uploads
    leaves it alone, however slowly the buffer fills."""
    d, K = 8, 2
    r = running(d=d, mode="buffered", quorum=K, max_staleness=4, upload_timeout=1.0)
    a, b, c = (Client(r.endpoint, pid, timeout=20) for pid in ("a", "b", "c"))
    try:
        b.submit(np.ones(d, np.float32), 0)
        c.submit(np.ones(d, np.float32), 0)  # version 1
        a.submit(np.ones(d, np.float32), 0)  # in version 1's buffer
        out = {}
        t = threading.Thread(target=lambda: out.update(a.submit(np.full(d, 3, np.float32), 1)))
        t.start()
        wait = time.monotonic() + 10
        while "a" not in r.server._parked and time.monotonic() < wait:
            time.sleep(0.01)
        time.sleep(2.5)  # more than the upload timeout, with the sweep running each second
        assert "a" in r.server.uploads and r.server.abandoned_count == 0
        b.submit(np.ones(d, np.float32), 1)  # version 2: a's waiting COMMIT goes in
        t.join(20)
        assert out["version"] == 2 and out["round"] == 1
    finally:
        for x in (a, b, c):
            x.close()


def test_new_uploads_are_refused_busy_while_a_whole_buffer_waits():
    """Overload: with K complete updates waiting for the next buffer, a new upload is told `busy` at
    its first chunk (nothing held) rather than queued behind them. Driven message by message on a
    server that is not serving (its loop would hand the full buffer's COMMITs on at once)."""
    from fedagg.transport import Server
    from fedagg.transport.protocol import json_message

    d, K = 8, 2
    server = Server(np.zeros(d, np.float32), ServerConfig(bind="tcp://127.0.0.1:0", mode="buffered", quorum=K))
    try:
        def send(k, frames):
            server._handle([zmq.Frame(bytes([0, 1, 2, 3, k]))] + [zmq.Frame(bytes(f)) for f in frames])

        one = np.ones(d, np.float32).view(np.uint8)
        for k in range(5):
            send(k, json_message(Kind.HELLO, {"id": f"p{k}"}, seq=1))
        for k in range(4):  # p0, p1 fill the buffer (their COMMITs in the commit threads); p2, p3 wait
            send(k, message(Kind.CHUNK, one, round=0, offset=0, total=4 * d, seq=2, dtype=1, session=server.session))
            send(k, message(Kind.COMMIT, b"", round=0, total=4 * d, seq=3, session=server.session))
        assert sorted(server.committing) == ["p0", "p1"] and list(server._parked) == ["p2", "p3"]
        send(4, message(Kind.CHUNK, one, round=0, offset=0, total=4 * d, seq=2, dtype=1, session=server.session))
        assert "p4" not in server.uploads and server.rejected_counts == {"busy": 1}
        assert sorted(server.uploads) == ["p2", "p3"]  # the waiting ones keep their bytes
    finally:
        server.close()
