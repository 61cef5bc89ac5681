"""Secure rounds over the transport: fedagg serve's SecAgg+ buckets with fedagg.Client participants.

Each test runs a Server in a thread and participants in threads, on loopback. Exactness is
checked on the server's bucket sums against the plain modular sum of the encodings the
participants made (captured through submit_secure's `ring` hook); the model against a float64
NumPy mean within the grid's rounding bound.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("zmq")
pytest.importorskip("cryptography")

from fedagg.secure import Encoding  # noqa: E402
from fedagg.transport import Client, SecureConfig, Server, ServerConfig, TransportError  # noqa: E402
from fedagg.transport import secure_client  # noqa: E402
from fedagg.transport.protocol import Codec, Dtype, Kind  # noqa: E402
from fedagg.transport.secure_round import SecureRound, Step  # noqa: E402
from helpers import free_port  # noqa: E402

D = 700  # pads to 768 ring coordinates: two rotation segments (512, 256)


class Secure:
    """A secure Server in a thread; `records` gets each round's record."""

    def __init__(self, d=D, secure=None, **cfg):
        cfg.setdefault("bind", "tcp://127.0.0.1:0")
        cfg.setdefault("deadline", 30.0)
        cfg.setdefault("rounds", 1)
        self.records = []
        self.server = Server(np.zeros(d, np.float32), ServerConfig(secure=secure or SecureConfig(), **cfg),
                             on_round=self.records.append)
        self.endpoint = self.server.endpoint
        self.thread = threading.Thread(target=self.server.serve, daemon=True)
        self.thread.start()

    def join(self, timeout=60):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the server did not finish its rounds"

    def stop(self):
        self.server.stop()
        self.join(10)


@pytest.fixture
def secure():
    made = []

    def make(**kw):
        s = Secure(**kw)
        made.append(s)
        return s

    yield make
    for s in made:
        if s.thread.is_alive():
            s.stop()


def run_all(work, count, timeout=60):
    """work(i) for i < count in threads; returns each result or exception."""
    return run_all_async(work, count, timeout)()


def capture(store, pid):
    """A `ring` hook: the honest encoding, kept under pid."""
    def ring(enc, arr):
        store[pid] = enc.encode(arr)
        return store[pid]
    return ring


def honest(endpoint, X, store=None, timeout=10.0):
    def work(i):
        with Client(endpoint, f"p{i}", timeout=timeout) as c:
            if store is None:
                return c.submit(X[i])
            return secure_client.submit_secure(c, X[i], ring=capture(store, f"p{i}"))
    return work


def grid_bound(bucket_encodings, count) -> float:
    """L2 bound of the decoded mean's rounding error: each encoding's error is < gamma per ring
    coordinate (the rotation keeps L2 norms), so the mean's is below max gamma sqrt(padded)."""
    return max(e.gamma * np.sqrt(e.padded) for e in bucket_encodings) * 1.0001 + 1e-6


def check_exact_sums(rnd: SecureRound, store) -> None:
    """Each unmasked bucket sum equals the plain modular sum of its survivors' encodings."""
    for b in rnd.buckets:
        if b.refused is not None:
            continue
        ref = np.zeros(b.params.d, dtype=np.uint64)
        for i in b.server.u3:
            ref += store[b.ids[i]]
        np.testing.assert_array_equal(b.server._sum, (ref % (1 << 32)).astype(np.uint32))


# --------------------------------------------------------------------------- whole rounds

def test_secure_round_sums_exactly_and_decodes_to_the_mean(secure):
    n = 9
    X = np.random.default_rng(1).normal(size=(n, D)).astype(np.float32) * 0.02
    s = secure(quorum=n, min_updates=3, secure=SecureConfig(bucket_size=3, clip=10.0, phase_seconds=10))
    store = {}
    res = run_all(honest(s.endpoint, X, store), n)
    assert all(isinstance(r, dict) and r["group"] == 3 for r in res), res
    s.join()
    rec = s.records[0]
    assert rec["closed_by"] == "secure" and rec["model_updated"] and sorted(rec["accepted"]) == sorted(store)
    assert sorted(len(b["members"]) for b in rec["buckets"]) == [3, 3, 3]
    check_exact_sums(s.server.secure, store)
    ref = X.astype(np.float64).mean(0)
    err = np.linalg.norm(s.server.model.astype(np.float64) - ref)
    assert err <= grid_bound([b.encoding for b in s.server.secure.buckets], n)
    # nothing it kept is an update: one ring vector per bucket, no receive buffer in use
    assert s.server.buffers.held == 0 and not s.server.uploads


def test_noise_of_the_sum_and_the_reported_epsilon(secure):
    n, sigma = 8, 0.05
    X = np.random.default_rng(2).normal(size=(n, D)).astype(np.float32) * 0.01
    s = secure(quorum=n, min_updates=4, secure=SecureConfig(bucket_size=4, clip=1.0, sigma=sigma, phase_seconds=10))
    res = run_all(honest(s.endpoint, X), n)
    assert all(isinstance(r, dict) for r in res), res
    s.join()
    noise = s.server.model.astype(np.float64) - X.astype(np.float64).mean(0)
    # two buckets of 4: each bucket mean carries N(0, 4 sigma^2) / 4^2 per coordinate, the mean of
    # the two half that variance: sigma^2 / 8; D coordinates estimate it within a few percent
    assert np.std(noise) == pytest.approx(sigma / np.sqrt(n), rel=0.15)
    priv = s.records[0]["privacy"]
    enc = s.server.secure.buckets[0].encoding
    ref = Encoding(clip=1.0, sigma=sigma, gamma=enc.gamma, n=4, d=D).epsilon(1e-5)
    assert priv["epsilon"] == pytest.approx(ref) and priv["delta"] == 1e-5 and np.isfinite(ref)
    assert priv["wrap_probability"] <= 1e-9 and priv["bucket_sizes"] == [4, 4]


def test_the_next_round_runs_from_the_new_model(secure):
    n = 3
    X = np.random.default_rng(3).normal(size=(2, n, D)).astype(np.float32) * 0.05
    s = secure(quorum=n, min_updates=3, rounds=2, linger=10,
               secure=SecureConfig(bucket_size=3, clip=10.0, phase_seconds=10))

    def work(i):
        with Client(s.endpoint, f"p{i}", timeout=10) as c:
            for r in range(2):
                rnd, model = c.model()
                assert rnd == r
                c.submit(X[r, i])
                c.wait_round(r, timeout=30)
            return c.model()[1]
    res = run_all(work, n)
    s.stop()
    ref = X.astype(np.float64).mean(1).sum(0)
    for r in res:
        assert isinstance(r, np.ndarray), r
        assert np.linalg.norm(r - ref) <= 2 * grid_bound([b.encoding for b in s.server.secure.buckets], n)
    assert [rec["closed_by"] for rec in s.records] == ["secure", "secure"]


# --------------------------------------------------------------------------- dropouts

def partial(endpoint, pid, x, stop_before: str, store, timeout=10.0):
    """A participant that goes silent before `stop_before` (advertise, share, upload, unmask)."""
    from fedagg.secure import Participant, wire

    c = Client(endpoint, pid, timeout=timeout)
    try:
        st = c.status()
        rnd = st["round"]
        wait = st["secure"]["phase_seconds"] + timeout
        group = secure_client.parse_json(secure_client._ask(c, Step.JOIN, b"", rnd, 60))
        params, enc, index, round_id, graph_seed = secure_client._group(group, x.size)
        if stop_before == "advertise":
            return c
        me = Participant(params, index, round_id, graph_seed)
        roster = wire.parse_roster(bytes(secure_client._ask(c, Step.ADVERTISE, wire.advertisement(me.advertise()),
                                                            rnd, wait)), params)
        if stop_before == "share":
            return c
        inbox = wire.parse_ciphertexts(bytes(secure_client._ask(c, Step.SHARES, wire.ciphertexts(me.share_keys(roster)),
                                                                rnd, wait)), params)
        if stop_before == "upload":
            return c
        store[pid] = enc.encode(x)
        c._send_update(me.masked_input(store[pid], inbox).view(np.uint8), Codec.RAW, Dtype.UINT32, rnd, 0.0, None)
        return c  # stop_before == "unmask": never answers the unmask request
    except BaseException:
        c.close()
        raise


@pytest.mark.parametrize("phase", ["advertise", "share", "upload", "unmask"])
def test_a_dropout_at_each_phase_leaves_the_others_exact(secure, phase):
    n = 4
    X = np.random.default_rng(4).normal(size=(n, D)).astype(np.float32) * 0.02
    s = secure(quorum=n, min_updates=4, secure=SecureConfig(bucket_size=4, clip=10.0, max_dropout=0.3,
                                                            phase_seconds=1.5))
    store = {}

    def work(i):
        if i == 0:
            return partial(s.endpoint, "p0", X[0], phase, store)
        return honest(s.endpoint, X, store)(i)
    res = run_all(work, n)
    try:
        assert all(isinstance(r, dict) for r in res[1:]), res
        s.join()
    finally:
        res[0].close()
    rec = s.records[0]
    assert rec["closed_by"] == "secure", rec["failed"]
    check_exact_sums(s.server.secure, store)
    kept = [0, 1, 2, 3] if phase == "unmask" else [1, 2, 3]  # after its upload it is in the sum
    assert sorted(rec["accepted"]) == [f"p{i}" for i in kept]
    assert ("p0" in rec["left_out"]) == (phase != "unmask")  # why it was left out, when it was
    ref = X[kept].astype(np.float64).mean(0)
    assert np.linalg.norm(s.server.model - ref) <= grid_bound([b.encoding for b in s.server.secure.buckets], n)


def test_forty_participants_with_dropouts_in_every_phase(secure):
    n = 40
    X = np.random.default_rng(5).normal(size=(n, 300)).astype(np.float32) * 0.02
    s = secure(d=300, quorum=n, min_updates=8, deadline=60,
               secure=SecureConfig(bucket_size=8, clip=10.0, max_dropout=0.45, phase_seconds=2.5))
    store, drop = {}, {0: "advertise", 1: "share", 2: "upload", 3: "unmask"}
    clients = {}

    def work(i):
        if i in drop:
            clients[i] = partial(s.endpoint, f"p{i}", X[i], drop[i], store, timeout=20)
            return clients[i]
        return honest(s.endpoint, X, store, timeout=20)(i)
    res = run_all(work, n, timeout=120)
    try:
        s.join(120)
    finally:
        for c in clients.values():
            c.close()
    rec = s.records[0]
    assert rec["closed_by"] == "secure", rec["failed"]
    check_exact_sums(s.server.secure, store)
    refused = [b for b in s.server.secure.buckets if b.refused is not None]
    kept = [i for i in range(n) if f"p{i}" in rec["accepted"]]
    # min_survivors is 5 of 8: even a bucket that lost all three stays unmasked
    assert not refused and set(kept) == set(range(n)) - {0, 1, 2}
    assert all(isinstance(r, dict) for i, r in enumerate(res) if i not in drop)
    ref = X[kept].astype(np.float64).mean(0)
    assert np.linalg.norm(s.server.model - ref) <= grid_bound([b.encoding for b in s.server.secure.buckets], n)


# --------------------------------------------------------------------------- robust over buckets

@pytest.mark.parametrize("rule", ["median", "krum"])
@pytest.mark.parametrize("attack", ["random_ring", "huge"])
def test_byzantine_participants_spoil_only_their_buckets(secure, rule, attack):
    """15 participants, buckets of 3, one Byzantine: the rule over the 5 bucket means with f = 1
    stays within the honest buckets (each coordinate of the median inside their range; Krum picks
    an honest bucket's mean), while the plain mean of the buckets is pulled far off."""
    n, byz = 15, 7
    X = (np.random.default_rng(6).normal(size=(n, D)) * 0.01 + 0.05).astype(np.float32)

    def evil(enc, arr):
        if attack == "random_ring":
            return np.random.default_rng(7).integers(0, 1 << 32, enc.padded, dtype=np.uint32)
        return np.full(enc.padded, 1 << 30, np.uint32)  # the largest values that keep the bucket's sum in the ring

    s = secure(quorum=n, min_updates=15, rule=rule, f=1, secure=SecureConfig(bucket_size=3, clip=10.0,
                                                                             phase_seconds=10))

    def work(i):
        with Client(s.endpoint, f"p{i}", timeout=10) as c:
            return secure_client.submit_secure(c, X[i], ring=evil if i == byz else None)
    res = run_all(work, n)
    assert all(isinstance(r, dict) for r in res), res
    s.join()
    rec = s.records[0]
    members = [b["members"] for b in rec["buckets"]]
    honest_means = np.array([X[[int(p[1:]) for p in m]].astype(np.float64).mean(0) for m in members
                             if f"p{byz}" not in m])
    tol = grid_bound([b.encoding for b in s.server.secure.buckets], n)
    model = s.server.model.astype(np.float64)
    assert np.all(model >= honest_means.min(0) - tol) and np.all(model <= honest_means.max(0) + tol)
    if rule == "krum":  # the chosen mean is an honest bucket's
        assert min(np.linalg.norm(model - m) for m in honest_means) <= tol
        spoiled = next(p for m in members if f"p{byz}" in m for p in m)
        assert spoiled in rec["excluded_by_rule"]


# --------------------------------------------------------------------------- refusals and threats

def test_plain_and_wrong_uploads_are_refused_on_a_secure_server(secure):
    s = secure(quorum=3, min_updates=3, deadline=3, secure=SecureConfig(bucket_size=3, phase_seconds=2))
    with Client(s.endpoint, "a", timeout=5) as c:
        st = c.status()
        assert st["secure"]["bucket_size"] == 3 and st["phase"] == "join"
        # a step of a member only, from a participant that never joined
        with pytest.raises(TransportError) as e:
            secure_client._ask(c, Step.ADVERTISE, b"\0" * 40, st["round"], 5)
        assert e.value.reason == "secure"
        with pytest.raises(TransportError) as e:
            secure_client._ask(c, Step.JOIN, b"", 99, 3)
        assert e.value.reason == "future"
    s.join(30)
    assert s.records[0]["model_updated"] is False and "joined" in s.records[0]["failed"]


def test_secagg_on_a_plain_server_and_secure_clients_on_it(secure):
    s = Server(np.zeros(D, np.float32), ServerConfig(bind="tcp://127.0.0.1:0", rounds=1, deadline=30))
    t = threading.Thread(target=s.serve, daemon=True)
    t.start()
    try:
        with Client(s.endpoint, "a", timeout=5) as c:
            with pytest.raises(TransportError) as e:
                secure_client._ask(c, Step.JOIN, b"", 0, 3)
            assert e.value.reason == "secure"
        with Client(s.endpoint, "b", timeout=5, secure=True) as c:
            with pytest.raises(TransportError, match="plain rounds") as e:
                c.submit(np.zeros(D, np.float32))
            assert c.status()["held"] == 0  # nothing of the update went out
    finally:
        s.stop()
        t.join(10)


@pytest.mark.parametrize("prg", ["chacha20", None])
def test_a_participant_refuses_a_server_masking_with_another_prg(secure, monkeypatch, prg):
    # a server of another fedagg version (None: one from before STATE named its PRG) would get masks that
    # do not cancel: the participant refuses before it joins, and sends nothing of its update
    public = SecureRound.public
    monkeypatch.setattr(SecureRound, "public",
                        lambda self: {k: v for k, v in {**public(self), "prg": prg}.items() if v is not None})
    s = secure(quorum=3, min_updates=3, deadline=3, secure=SecureConfig(bucket_size=3, phase_seconds=2))
    with Client(s.endpoint, "a", timeout=5) as c:
        with pytest.raises(TransportError, match="mask PRG") as e:
            c.submit(np.zeros(D, np.float32))
        assert e.value.reason == "secure"
        st = c.status()
        assert st["held"] == 0 and st["phase"] == "join"
    s.join(30)
    assert s.records[0]["model_updated"] is False


def test_a_masked_input_of_the_wrong_size_is_refused(secure):
    n = 3
    X = np.random.default_rng(8).normal(size=(n, D)).astype(np.float32) * 0.02
    s = secure(quorum=n, min_updates=3, secure=SecureConfig(bucket_size=3, clip=10.0, max_dropout=0.0,
                                                            phase_seconds=2))
    store = {}

    def work(i):
        if i:
            return honest(s.endpoint, X, store)(i)
        c = partial(s.endpoint, "p0", X[0], "upload", store)
        try:
            with pytest.raises(TransportError) as e:
                c._send_update(np.zeros(4 * 768 + 4, np.uint8), Codec.RAW, Dtype.UINT32, 0, 0.0, None)
            assert e.value.reason == "secure" and "3072 bytes" in e.value.detail
            with pytest.raises(TransportError) as e:  # float32 where the ring is expected
                c._send_update(np.zeros(768, np.float32).view(np.uint8), Codec.RAW, Dtype.FLOAT32, 0, 0.0, None)
            assert e.value.reason == "secure"
            return "refused"
        finally:
            c.close()
    res = run_all(work, n)
    s.join()
    assert res[0] == "refused"
    # max_dropout 0: the bucket needs all 3 masked inputs; it is refused and the round has no model
    rec = s.records[0]
    assert rec["model_updated"] is False and "buckets" in rec["failed"]
    assert all(isinstance(r, TransportError) and r.reason == "secure" for r in res[1:]), res


def test_a_masked_input_outside_the_ring_is_refused_and_may_be_sent_again(secure):
    """A 16-bit ring: a masked input with a value >= 2^16 is refused `secure` (never added), and the
    same participant's correct masked input, sent after, is taken: the sum stays exact."""
    from fedagg.secure import Participant, wire

    n = 3
    X = np.random.default_rng(10).normal(size=(n, D)).astype(np.float32) * 0.02
    s = secure(quorum=n, min_updates=3, secure=SecureConfig(bucket_size=3, clip=1.0, bits=16, phase_seconds=5))
    store = {}

    def work(i):
        if i:
            return honest(s.endpoint, X, store)(i)
        with Client(s.endpoint, "p0", timeout=10) as c:
            rnd = c.status()["round"]
            group = secure_client.parse_json(secure_client._ask(c, Step.JOIN, b"", rnd, 60))
            params, enc, index, round_id, graph_seed = secure_client._group(group, D)
            me = Participant(params, index, round_id, graph_seed)
            roster = wire.parse_roster(bytes(secure_client._ask(c, Step.ADVERTISE, wire.advertisement(me.advertise()),
                                                                rnd, 20)), params)
            inbox = wire.parse_ciphertexts(bytes(secure_client._ask(
                c, Step.SHARES, wire.ciphertexts(me.share_keys(roster)), rnd, 20)), params)
            store["p0"] = enc.encode(X[0])
            y = me.masked_input(store["p0"], inbox)
            bad = y.copy()
            bad[5] = 1 << 16  # outside Z_2^16
            with pytest.raises(TransportError) as e:
                c._send_update(bad.view(np.uint8), Codec.RAW, Dtype.UINT32, rnd, 0.0, None)
            assert e.value.reason == "secure" and "outside the ring" in e.value.detail
            c._send_update(y.view(np.uint8), Codec.RAW, Dtype.UINT32, rnd, 0.0, None)
            req = wire.parse_unmask_request(bytes(secure_client._ask(c, Step.UNMASK, b"", rnd, 20)), params)
            secure_client._ask(c, Step.RESPONSE, wire.unmask_response(me.unmask(req)), rnd, 20)
            return "ok"
    res = run_all(work, n)
    s.join()
    assert res[0] == "ok" and all(isinstance(r, dict) for r in res[1:]), res
    assert s.records[0]["closed_by"] == "secure"
    b = s.server.secure.buckets[0]
    ref = sum(store[b.ids[i]].astype(np.uint64) for i in b.server.u3) % (1 << 16)
    np.testing.assert_array_equal(b.server._sum, ref.astype(np.uint32))


def test_too_few_joined_closes_the_round_without_a_model(secure):
    s = secure(quorum=4, min_updates=4, deadline=1.5, secure=SecureConfig(bucket_size=4, phase_seconds=2))
    X = np.zeros((2, D), np.float32)
    res = run_all(honest(s.endpoint, X), 2)
    s.join()
    assert all(isinstance(r, TransportError) and r.reason == "secure" and "2 participants joined" in r.detail
               for r in res), res
    assert s.records[0]["model_updated"] is False and "2 participants joined" in s.records[0]["failed"]
    assert not s.server.secure.buckets  # no group was formed: nothing was asked of anyone


def test_a_server_asking_for_both_shares_learns_nothing(secure, monkeypatch):
    """The server (patched to lie) asks each participant for both the seed share and the key
    share of one neighbour: every honest participant refuses, sends no share, and the round ends
    without a model."""
    from fedagg.secure import UnmaskRequest, wire

    def lying(self, b):
        u3 = b.server.close_masked()
        b.request = wire.unmask_request(UnmaskRequest(u3, frozenset({min(u3)}), {}))
    monkeypatch.setattr(SecureRound, "_close_masked", lying)
    n = 3
    s = secure(quorum=n, min_updates=3, secure=SecureConfig(bucket_size=3, clip=10.0, phase_seconds=2))
    res = run_all(honest(s.endpoint, np.ones((n, D), np.float32)), n)
    s.join()
    assert all(isinstance(r, TransportError) and r.reason == "aborted" and "both" in str(r) for r in res), res
    assert all(not b.responses for b in s.server.secure.buckets)
    assert s.records[0]["model_updated"] is False


def test_a_late_joiner_waits_for_the_next_round(secure):
    """p0 joins and goes silent, holding the round in its advertise phase for phase_seconds: a
    participant that arrives then is told `phase` (join the next round), not taken in."""
    n = 3
    s = secure(quorum=n, min_updates=3, linger=5, secure=SecureConfig(bucket_size=3, clip=10.0, phase_seconds=3))
    X = np.zeros((n, D), np.float32)
    late, clients = {}, []

    def work(i):
        if i == 0:
            clients.append(partial(s.endpoint, "p0", X[0], "advertise", {}))
            return None
        if i < n:
            return honest(s.endpoint, X)(i)
        deadline = time.monotonic() + 20
        while s.server.phase == "join" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s.server.phase == "advertise"
        with Client(s.endpoint, "late", timeout=5) as c:
            with pytest.raises(TransportError) as e:
                c.submit(X[0])
            late["reason"] = e.value.reason
    res = run_all(work, n + 1)
    for c in clients:
        c.close()
    s.stop()
    assert late.get("reason") == "phase", res
    assert s.records[0]["model_updated"] is False  # a bucket of 3 without p0 is below min_survivors


def test_secure_steps_after_the_last_round_are_refused_finished(secure):
    n = 3
    s = secure(quorum=n, min_updates=3, linger=10, secure=SecureConfig(bucket_size=3, clip=10.0, phase_seconds=5))
    res = run_all(honest(s.endpoint, np.zeros((n, D), np.float32)), n)
    assert all(isinstance(r, dict) for r in res), res
    with Client(s.endpoint, "after", timeout=5) as c:
        c.wait_round(0, timeout=20)
        assert c.status()["phase"] == "finished"
        for rnd in (0, 1):  # the closed round, and the one that will never run
            with pytest.raises(TransportError) as e:
                secure_client._ask(c, Step.JOIN, b"", rnd, 3)
            assert e.value.reason == "finished"
    s.stop()


@pytest.mark.parametrize("bad, match", [
    ({"n": 3}, "not valid"),  # fields missing
    (dict(bucket=0, index=5, n=3, k=2, t=2, bits=32, d=768, min_survivors=3, round_id="00" * 32,
          graph_seed="00" * 32, encoding=dict(clip=1.0, sigma=0.0, gamma=1e-6, n=3, d=D, bits=32, beta=0.5, seed=1)),
     "index"),
    (dict(bucket=0, index=0, n=3, k=2, t=1, bits=32, d=768, min_survivors=3, round_id="00" * 32,
          graph_seed="00" * 32, encoding=dict(clip=1.0, sigma=0.0, gamma=1e-6, n=3, d=D, bits=32, beta=0.5, seed=1)),
     "threshold"),
    (dict(bucket=0, index=0, n=3, k=2, t=2, bits=32, d=512, min_survivors=3, round_id="00" * 32,
          graph_seed="00" * 32, encoding=dict(clip=1.0, sigma=0.0, gamma=1e-6, n=3, d=D, bits=32, beta=0.5, seed=1)),
     "does not match"),
])
def test_a_hostile_group_is_refused_by_the_participant(bad, match):
    with pytest.raises(TransportError, match=match):
        secure_client._group(bad, D)


def test_a_restarted_server_starts_the_secure_round_over(tmp_path):
    port = free_port()
    cfg = dict(bind=f"tcp://127.0.0.1:{port}", quorum=3, min_updates=3, deadline=60, rounds=1,
               state_dir=str(tmp_path), secure=SecureConfig(bucket_size=3, clip=10.0, phase_seconds=5))
    first = Server(np.zeros(D, np.float32), ServerConfig(**cfg))
    t = threading.Thread(target=first.serve, daemon=True)
    t.start()
    X = np.random.default_rng(9).normal(size=(3, D)).astype(np.float32) * 0.02
    early = run_all_async(honest(first.endpoint, X, timeout=2), 2)
    deadline = time.monotonic() + 20
    while len(first.secure.joined) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(first.secure.joined) == 2
    first.stop()
    t.join(10)
    records = []
    second = Server(np.zeros(D, np.float32), ServerConfig(**cfg), on_round=records.append)
    t2 = threading.Thread(target=second.serve, daemon=True)
    t2.start()
    try:
        assert second.round == 0 and second.session != first.session and second.phase == "join"
        res = early()  # their JOINs were for the old session: refused, never carried over
        assert all(isinstance(r, TransportError) for r in res), res
        res = run_all(honest(second.endpoint, X), 3)
        assert all(isinstance(r, dict) for r in res), res
        t2.join(30)
        assert records[0]["closed_by"] == "secure"
        assert np.linalg.norm(second.model - X.astype(np.float64).mean(0)) <= grid_bound(
            [b.encoding for b in second.secure.buckets], 3)
    finally:
        second.stop()
        t2.join(10)


def run_all_async(work, count, timeout=60):
    """Start work(i) for i < count in threads now; the returned function joins them (each within
    `timeout`) and gives each result or exception."""
    out = [None] * count

    def one(i):
        try:
            out[i] = work(i)
        except BaseException as e:  # noqa: BLE001 - returned to the test
            out[i] = e
    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()

    def finish():
        for t in threads:
            t.join(timeout)
        assert not any(t.is_alive() for t in threads), "a participant did not finish"
        return out
    return finish


# --------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("kw, match", [
    (dict(bucket_size=2), "bucket_size"),
    (dict(clip=0.0), "clip"),
    (dict(sigma=-1.0), "sigma"),
    (dict(gamma=float("nan")), "gamma"),
    (dict(bits=4), "bits"),
    (dict(max_dropout=0.5), "max_dropout"),
    (dict(phase_seconds=0), "phase_seconds"),
    (dict(delta=1.0), "delta"),
    (dict(k=3, bucket_size=8), "k must be even"),
])
def test_secure_config_is_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        ServerConfig(secure=SecureConfig(**kw), min_updates=8, quorum=8).check()


@pytest.mark.parametrize("kw, match", [
    (dict(clip_norm=1.0), "clip_norm"),
    (dict(device="cuda"), "GPU"),
    (dict(min_updates=2, quorum=4), "fill one bucket"),
    (dict(rule="krum", f=1, min_updates=8, quorum=8), "bucket means"),  # 2 buckets: Krum needs 5
    (dict(chunk_bytes=4096, min_updates=30, quorum=30), "chunk_bytes"),
])
def test_what_secure_rounds_refuse_to_combine_with(kw, match):
    base = dict(min_updates=4, quorum=4)
    base.update(kw)
    secure = SecureConfig(bucket_size=4 if "chunk_bytes" not in kw else 30)
    with pytest.raises(ValueError, match=match):
        ServerConfig(secure=secure, **base).check()


def test_secure_must_be_a_secure_config():
    with pytest.raises(TypeError, match="SecureConfig"):
        ServerConfig(secure={"bucket_size": 4}, min_updates=4, quorum=4).check()


def test_secure_round_messages_use_their_own_kinds():
    assert Kind.SECAGG == 7 and Kind.SECAGG_REPLY == 16 and Dtype.UINT32 == 2
    assert [int(s) for s in Step] == [1, 2, 3, 4, 5]
