"""The server under abuse in plain mode: HELLO floods, id takeovers, log floods, dead rounds, bad binds.

Each test is an attack (or a failure) someone tried against an earlier version; servers bind to
127.0.0.1 (or ::1) on a free port and every wait is bounded.
"""

import logging
import os
import time

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from fedagg.transport import Client, Server, ServerConfig, TransportError  # noqa: E402
from fedagg.transport.protocol import Dtype, Kind, json_message, message, parse, parse_json  # noqa: E402
from test_transport import wait_for  # noqa: E402


def _peer(endpoint):
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(endpoint)
    return s


def _reply(s, timeout_ms=5000):
    assert s.poll(timeout_ms), "no answer"
    head, body = parse(s.recv_multipart(), 1 << 20)
    return head, (parse_json(body) if head.kind in (Kind.STATE, Kind.REJECTED, Kind.ACCEPTED, Kind.ROUND) else body)


def _hello(s, pid, seq, secret=None):
    body = {"id": pid} if secret is None else {"id": pid, "secret": secret}
    s.send_multipart(json_message(Kind.HELLO, body, seq=seq))
    return _reply(s)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_hello_flood_does_not_lock_out_an_honest_participant(running):
    """300 connections each say HELLO with a new id and vanish; the table holds 100. The honest
    participant still gets in at once, uploads, and the round closes (it used to be refused
    `busy` for ~10 s, then at every chunk, and the round never closed)."""
    r = running(d=1000, quorum=1, rounds=1, max_peers=100)
    for k in range(300):
        s = _peer(r.endpoint)
        head, st = _hello(s, f"flood-{k}", seq=1)
        assert head.kind == Kind.STATE, st
        s.close(0)
    assert len(r.server.peers) == 100
    with Client(r.endpoint, "honest", timeout=10) as c:
        assert c.submit(np.ones(1000, np.float32), 0)["id"] == "honest"
    r.thread.join(10)
    assert r.server.history[0]["accepted"] == ["honest"]
    np.testing.assert_array_equal(r.server.model, np.ones(1000, np.float32))


def test_hello_takes_no_receive_buffer(running):
    """200 HELLOs that never upload pin no model-sized buffer (they pinned 200 MB at d = 250k)."""
    d = 250_000
    r = running(d=d, quorum=5)
    socks = [_peer(r.endpoint) for _ in range(200)]
    try:
        before = _rss()
        for k, s in enumerate(socks):
            head, _ = _hello(s, f"idle-{k}", seq=1)
            assert head.kind == Kind.STATE
        grown = _rss() - before
        assert r.server.buffers.held == 0 and not r.server.buffers.pool
        assert grown < 40 * 4 * d, f"{grown / (4 * d):.0f} model sizes grown for 200 HELLOs"
    finally:
        for s in socks:
            s.close(0)


def test_receive_memory_is_a_budget_in_bytes(running):
    """Uploads beyond the budget are refused `busy` (retry later), whatever the connection count;
    an upload that goes silent is abandoned after upload_timeout and its memory is free again."""
    d = 1024  # 4 KiB updates, 4 KiB chunks
    r = running(d=d, quorum=3, receive_memory=2 * 4 * d, chunk_bytes=4096, upload_timeout=1.0)
    half = np.ones(d // 2, np.float32)
    socks = []
    for k in range(3):
        s = _peer(r.endpoint)
        socks.append(s)
        head, st = _hello(s, f"p{k}", seq=1)
        s.send_multipart(message(Kind.CHUNK, half, round=0, offset=0, total=4 * d, seq=2, dtype=Dtype.FLOAT32,
                                 session=st["session"]))
        head, body = _reply(s)
        if k < 2:
            assert head.kind == Kind.CREDIT
        else:
            assert head.kind == Kind.REJECTED and body["reason"] == "busy" and "receive memory full" in body["detail"]
    assert r.server.buffers.held == 2 * 4 * d
    wait_for(lambda: r.server.buffers.held == 0, 10, "silent uploads abandoned")
    assert r.server.rejected_counts["busy"] == 1
    for s in socks:
        s.close(0)
    with Client(r.endpoint, "after", timeout=10) as c:
        c.submit(np.ones(d, np.float32), 0)
    with pytest.raises(ValueError, match="cannot hold one update"):
        Server(np.zeros(d, np.float32), ServerConfig(bind="tcp://127.0.0.1:0", receive_memory=100))


def test_a_round_with_too_few_updates_closes_at_its_deadline_without_a_new_model(running):
    r = running(d=64, quorum=3, min_updates=2, deadline=3.0, rounds=3)
    with Client(r.endpoint, "alone", timeout=10) as c:
        c.submit(np.ones(64, np.float32), 0)
        assert c.wait_round(0, 10) == 1
        assert c.state["previous"] == {"round": 0, "model_updated": False, "closed_by": "deadline", "accepted": 1}
        assert c.status()["previous"]["model_updated"] is False
    r.thread.join(30)  # rounds 1 and 2 get no update at all: they close at their deadlines too
    assert not r.thread.is_alive()
    assert [h["model_updated"] for h in r.server.history] == [False, False, False]
    assert "1 accepted updates at the deadline, 2 needed" in r.server.history[0]["failed"]
    assert r.server.history[1]["accepted"] == [] and "0 accepted" in r.server.history[1]["failed"]
    np.testing.assert_array_equal(r.server.model, np.zeros(64, np.float32))
    assert r.server.buffers.held == 0


def test_an_impostor_cannot_take_over_an_upload_in_progress(running):
    d = 2048  # two chunks of 4 KiB
    r = running(d=d, quorum=2, chunk_bytes=4096, rounds=1)
    x = np.arange(d, dtype=np.float32)
    victim, impostor = _peer(r.endpoint), _peer(r.endpoint)
    try:
        _, st = _hello(victim, "victim", seq=1, secret="s3cret")
        victim.send_multipart(message(Kind.CHUNK, x[:1024], round=0, offset=0, total=4 * d, seq=2,
                                      dtype=Dtype.FLOAT32, session=st["session"]))
        assert _reply(victim)[0].kind == Kind.CREDIT
        for secret in (None, "guess"):  # the id alone, or a wrong secret: refused, nothing moves
            head, body = _hello(impostor, "victim", seq=2 ** 64 - 1, secret=secret)
            assert head.kind == Kind.REJECTED and body["reason"] == "claimed"
        assert r.server.uploads["victim"].received == 4096
        # the victim goes on undisturbed: its seq was not poisoned, its upload not taken
        victim.send_multipart(message(Kind.CHUNK, x[1024:], round=0, offset=4096, total=4 * d, seq=3,
                                      dtype=Dtype.FLOAT32, session=st["session"]))
        assert _reply(victim)[0].kind == Kind.CREDIT
        # a reconnection presenting the secret resumes the upload where it was
        again = _peer(r.endpoint)
        head, st2 = _hello(again, "victim", seq=4, secret="s3cret")
        assert head.kind == Kind.STATE and st2["held"] == 4 * d
        again.send_multipart(message(Kind.COMMIT, b"", round=0, total=4 * d, seq=5, session=st["session"]))
        assert _reply(again)[0].kind == Kind.ACCEPTED
        # the old connection no longer speaks for the id
        victim.send_multipart(message(Kind.STATUS, b"", seq=6))
        head, body = _reply(victim)
        assert head.kind == Kind.REJECTED and body["reason"] == "unknown"
        again.close(0)
    finally:
        victim.close(0)
        impostor.close(0)
    assert list(r.server.accepted) == ["victim"]  # and what was folded in is the victim's update, whole
    np.testing.assert_array_equal(r.server.collector.acc, x.astype(np.float64))
    assert r.server.rejected_counts["claimed"] == 2


def test_a_huge_seq_under_a_victims_id_does_not_block_the_victim(running):
    """With nothing in progress the impostor's claim replaces the victim's entry, but it does not
    inherit (or leave behind) the seq: the victim says HELLO again and submits."""
    r = running(d=64, quorum=1, rounds=1)
    with Client(r.endpoint, "victim", timeout=10) as c:
        s = _peer(r.endpoint)
        head, _ = _hello(s, "victim", seq=2 ** 64 - 1)
        assert head.kind == Kind.STATE
        s.close(0)
        assert c.submit(np.ones(64, np.float32), 0)["id"] == "victim"
    r.thread.join(10)
    assert r.server.history[0]["accepted"] == ["victim"]


def test_floods_are_logged_as_a_few_lines(running, caplog):
    """10,000 messages over the rate limit and 2,000 refusals give a handful of log lines, each
    saying how many were not logged; the counts are all in rejected_counts."""
    caplog.set_level(logging.INFO, logger="fedagg")
    r = running(d=64, quorum=5, rate=50.0)
    with Client(r.endpoint, "flood", timeout=10) as c:
        for _ in range(10_000):
            c.heartbeat()
        wait_for(lambda: r.server.rejected_counts.get("rate", 0) >= 9_000, 20, "drops counted")
    rate_lines = [rec for rec in caplog.records if getattr(rec, "event", "") == "rate_limited"]
    assert 1 <= len(rate_lines) <= 10, len(rate_lines)
    r2 = running(d=64, quorum=5, rate=1e9)
    with Client(r2.endpoint, "noisy", timeout=10) as c:
        st = c.status()
        for _ in range(2_000):
            c._send(message(Kind.CHUNK, b"\x00" * 8, round=7, offset=0, total=256, seq=c._next(),
                            dtype=Dtype.FLOAT32, session=st["session"]))
        wait_for(lambda: r2.server.rejected_counts.get("future", 0) == 2_000, 20, "refusals counted")
    future = [rec for rec in caplog.records if getattr(rec, "reason", "") == "future"]
    assert 1 <= len(future) <= 10, len(future)


def test_every_refusal_reason_is_counted(running):
    """Routine refusals (order, unknown, ...) are counted too, not only the listed ones."""
    r = running(d=1024, quorum=5, chunk_bytes=4096)
    s = _peer(r.endpoint)
    try:
        s.send_multipart(message(Kind.STATUS, b"", seq=1))
        assert _reply(s)[1]["reason"] == "unknown"
        _, st = _hello(s, "p", seq=2)
        s.send_multipart(message(Kind.CHUNK, np.ones(1024, np.float32), round=0, offset=4096, total=4096, seq=3,
                                 dtype=Dtype.FLOAT32, session=st["session"]))
        assert _reply(s)[1]["reason"] in ("order", "malformed")
    finally:
        s.close(0)
    counts = r.server.rejected_counts
    assert counts.get("unknown") == 1 and counts.get("order", 0) + counts.get("malformed", 0) == 1


def test_the_final_model_is_served_after_the_last_round(running):
    r = running(d=64, quorum=1, rounds=1, linger=30.0)
    with Client(r.endpoint, "a", timeout=10) as c:
        c.submit(np.full(64, 2.0, np.float32), 0)
        assert c.wait_round(0, 10) == 1
        rnd, model = c.model()  # the server has run its last round, and still serves its result
        assert rnd == 1 and c.status()["phase"] == "finished"
        np.testing.assert_array_equal(model, np.full(64, 2.0, np.float32))
        with pytest.raises(TransportError, match="finished"):
            c.submit(np.ones(64, np.float32), 1)
    assert r.thread.is_alive()
    r.stop()


def test_the_notice_of_a_new_round_wakes_the_waiting_client():
    """Client._recv returns as soon as the ROUND notice is in, not at the end of its wait."""
    ctx = zmq.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    c = None
    try:
        import threading

        def fake_server():  # answers the HELLO, then announces round 1
            assert router.poll(5000)
            rid, *frames = router.recv_multipart()
            head, _ = parse(frames, 1 << 16)
            router.send_multipart([rid, *json_message(Kind.STATE, {"round": 0, "session": 1}, session=1)])
            time.sleep(0.2)
            router.send_multipart([rid, *json_message(Kind.ROUND, {"round": 1, "previous": None}, round=1,
                                                      session=1)])

        t = threading.Thread(target=fake_server, daemon=True)
        t.start()
        c = Client(f"tcp://127.0.0.1:{port}", "w", timeout=10)
        t0 = time.monotonic()
        assert c._recv(t0 + 20, until_round=0) is None
        assert time.monotonic() - t0 < 10 and c.state["round"] == 1
        t.join(5)
    finally:
        if c is not None:
            c.close()
        router.close(0)


def test_ipv6_binds_and_bind_failures_are_clear_errors(running, caplog):
    if not os.path.exists("/proc/net/if_inet6"):
        pytest.skip("no IPv6 on this machine")
    r = running(d=16, quorum=1, rounds=1, bind="tcp://[::1]:0")
    with Client(r.endpoint, "v6", timeout=10) as c:
        c.submit(np.ones(16, np.float32), 0)
    r.thread.join(10)
    first = Server(np.zeros(4, np.float32), ServerConfig(bind="tcp://127.0.0.1:0"))
    try:  # the port is taken
        with pytest.raises(ValueError, match=f"cannot bind {first.endpoint}"):
            Server(np.zeros(4, np.float32), ServerConfig(bind=first.endpoint))
    finally:
        first.close()
    # TEST-NET-1 is on no interface: binding fails locally, no packet is sent anywhere
    caplog.set_level(logging.WARNING, logger="fedagg")
    with pytest.raises(ValueError, match="cannot bind tcp://192.0.2.1"):
        Server(np.zeros(4, np.float32), ServerConfig(bind="tcp://192.0.2.1:5555", insecure=True))
    assert any(getattr(rec, "event", "") == "insecure" and "anyone" in rec.getMessage() for rec in caplog.records)


# ---------------------------------------------------------------- found by an attacker's review
def _chunk(s, data, session, offset, total, seq, codec=0, dtype=Dtype.FLOAT32):
    s.send_multipart(message(Kind.CHUNK, data, round=0, offset=offset, total=total, seq=seq, dtype=dtype,
                             codec=codec, session=session))
    return _reply(s)


def test_a_refused_takeover_changes_nothing_and_orphans_no_upload(running):
    """A HELLO with the right secret but a stale seq is refused `replayed` and must leave the owner's
    entry in place; even with no entry, an upload is continued only with its secret."""
    d = 2048
    r = running(d=d, quorum=2, chunk_bytes=4096)
    victim, again, thief = _peer(r.endpoint), _peer(r.endpoint), _peer(r.endpoint)
    try:
        _, st = _hello(victim, "alice", seq=100, secret="s")
        assert _chunk(victim, np.ones(1024, np.float32), st["session"], 0, 4 * d, seq=110)[0].kind == Kind.CREDIT
        head, body = _hello(again, "alice", seq=105, secret="s")
        assert head.kind == Kind.REJECTED and body["reason"] == "replayed"
        assert r.server.peers.of("alice").routing_id == r.server.peers.get(
            next(p.routing_id for p in r.server.peers if p.pid == "alice")).routing_id
        victim.send_multipart(message(Kind.STATUS, b"", seq=111))
        assert _reply(victim)[0].kind == Kind.STATE  # still alice's connection
        r.server.peers.remove(r.server.peers.of("alice"))  # the entry gone (evicted): the upload still is hers
        head, body = _hello(thief, "alice", seq=1, secret="mallory")
        assert head.kind == Kind.REJECTED and body["reason"] == "claimed"
        head, st2 = _hello(again, "alice", seq=200, secret="s")
        assert head.kind == Kind.STATE and st2["held"] == 4096
    finally:
        for s in (victim, again, thief):
            s.close(0)


def test_compressed_uploads_are_charged_a_decoded_update():
    """A compressed upload becomes a d-sized update at COMMIT, so it is charged that much from its
    first chunk: tiny payloads cannot push the accepted updates past the budget."""
    from fedagg import compress
    from fedagg.transport.protocol import Codec, pack_frames

    d = 1 << 16
    server = Server(np.zeros(d, np.float32), ServerConfig(bind="tcp://127.0.0.1:0", quorum=8,
                                                          receive_memory=2 * 4 * d))
    import threading

    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    try:
        replies, socks = [], []
        for k in range(4):  # four uploads started (each a few bytes on the wire) before any COMMIT
            p = compress.TopK(k=1, error_feedback=False).encode(np.eye(1, d, k, dtype=np.float32)[0])
            blob = pack_frames(p.to_frames())
            s = _peer(server.endpoint)
            socks.append((s, blob))
            _, st = _hello(s, f"c{k}", seq=1)
            head, body = _chunk(s, np.frombuffer(blob, np.uint8), st["session"], 0, len(blob), 2, codec=Codec.FAGP,
                                dtype=Dtype.NONE)
            replies.append(head.kind if head.kind != Kind.REJECTED else body["reason"])
        for s, blob in socks:
            s.send_multipart(message(Kind.COMMIT, b"", round=0, total=len(blob), seq=3, session=st["session"]))
            head, body = _reply(s)
            replies.append(head.kind if head.kind != Kind.REJECTED else body["reason"])
            s.close(0)
        assert replies == [Kind.CREDIT, Kind.CREDIT, "busy", "busy", Kind.ACCEPTED, Kind.ACCEPTED, "incomplete",
                           "incomplete"]
        assert server.buffers.held <= server.buffers.budget
    finally:
        server.stop()
        t.join(10)


def test_empty_chunks_are_refused_and_a_table_of_uploads_still_makes_room(running):
    r = running(d=1024, quorum=9, max_peers=3, chunk_bytes=4096)
    socks = [_peer(r.endpoint) for _ in range(3)]
    try:
        _, st = _hello(socks[0], "e", seq=1)
        head, body = _chunk(socks[0], b"", st["session"], 0, 4096, 2)
        assert head.kind == Kind.REJECTED and body["reason"] == "malformed" and "e" not in r.server.uploads
        for k, s in enumerate(socks):  # every entry uploading, half done
            _, st = _hello(s, f"u{k}", seq=10)
            assert _chunk(s, np.ones(512, np.float32), st["session"], 0, 4096, 11)[0].kind == Kind.CREDIT
        with Client(r.endpoint, "newcomer", timeout=10) as c:  # the least recently seen upload makes room
            c.submit(np.ones(1024, np.float32), 0)
        assert "u0" not in r.server.uploads and {"u1", "u2"} <= set(r.server.uploads)
    finally:
        for s in socks:
            s.close(0)


def test_a_connection_with_its_own_routing_id_is_refused(running):
    """Routing ids a peer chooses could be reused by another connection to speak for its entry."""
    r = running(d=64, quorum=1)
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.ROUTING_ID, b"conn-7")
    s.connect(r.endpoint)
    try:
        head, body = _hello(s, "alice", seq=1)
        assert head.kind == Kind.REJECTED and body["reason"] == "identity" and "ROUTING_ID" in body["detail"]
    finally:
        s.close(0)


class _Gate:
    """A stand-in LedgerGate: admits known addresses, weighs by stake, records what it is given."""

    poll_seconds, commit_seconds, stake_weighted, commitments, keep_updates = 0.05, 0.0, True, {}, False
    stakes = {"0xa": 1.0, "0xwhale": 1000.0, "0xb": 1.0}

    def __init__(self, fail_checks=0):
        class Cost:
            hash_seconds = seconds = 0.0
            gas, call_seconds, calls = {}, {}, 0

        self.cost, self.recorded, self.fail_checks = Cost(), None, fail_checks

    policy = type("Policy", (), {"rule": "", "f": 0})()

    def start_round(self, rnd, session): pass
    def all_committed(self): return True
    def refused(self, address, reason, detail=""): pass
    def keep(self, address, data, encoding): pass
    def close_commits(self): pass
    def admit(self, address): return None if address in self.stakes else "unregistered"

    def check(self, address, digest, sig, *, session):
        if self.fail_checks:
            self.fail_checks -= 1
            raise RuntimeError("eth_call: connection reset")
        return None

    def weights(self, addresses): return np.array([self.stakes[a] for a in addresses])
    def record(self, model, prev_model, addresses, scores, excluded, run): self.recorded = list(addresses)


def test_ledger_addresses_are_fixed_at_commit_and_a_chain_failure_keeps_the_upload(running):
    gate = _Gate(fail_checks=1)
    r = running(d=64, quorum=2, rounds=1, ledger=gate)
    a, b = _peer(r.endpoint), _peer(r.endpoint)
    try:
        wait_for(lambda: r.server.phase == "upload", 10, "upload phase")
        _, st = _hello(a, "0xa", seq=1)
        assert _chunk(a, np.full(64, 1.0, np.float32), st["session"], 0, 256, 2)[0].kind == Kind.CREDIT
        a.send_multipart(message(Kind.COMMIT, b'{"signature": "00"}', round=0, total=256, seq=3,
                                 session=st["session"]))
        head, body = _reply(a)
        assert body["reason"] == "internal" and r.server.uploads["0xa"].received == 256  # kept: retry
        a.send_multipart(message(Kind.COMMIT, b'{"signature": "00"}', round=0, total=256, seq=4,
                                 session=st["session"]))
        assert _reply(a)[0].kind == Kind.ACCEPTED
        head, _ = _hello(a, "0xwhale", seq=5)  # another admitted address, after acceptance
        _, st = _hello(b, "0xb", seq=1)
        _chunk(b, np.full(64, 100.0, np.float32), st["session"], 0, 256, 2)
        b.send_multipart(message(Kind.COMMIT, b'{"signature": "00"}', round=0, total=256, seq=3,
                                 session=st["session"]))
        assert _reply(b)[0].kind == Kind.ACCEPTED
        r.thread.join(10)
    finally:
        a.close(0)
        b.close(0)
    assert gate.recorded == ["0xa", "0xb"]
    np.testing.assert_allclose(r.server.model, np.full(64, 50.5, np.float32))  # stakes 1:1, not the whale's
    assert r.server.buffers.held == 0


def test_the_client_backs_off_when_busy_and_restarts_an_upload_of_another_codec(running):
    from fedagg import compress

    d = 4096
    r = running(d=d, quorum=2, chunk_bytes=4096, receive_memory=4 * d, upload_timeout=2.0)
    squatter = _peer(r.endpoint)
    try:
        _, st = _hello(squatter, "squatter", seq=1)  # holds the whole budget until it times out (2 s)
        assert _chunk(squatter, np.ones(1024, np.float32), st["session"], 0, 4 * d, 2)[0].kind == Kind.CREDIT
        with Client(r.endpoint, "patient", timeout=10) as c:
            assert c.submit(np.ones(d, np.float32), 0)["id"] == "patient"  # busy, backs off, gets in
        assert r.server.rejected_counts.get("busy", 0) >= 1
    finally:
        squatter.close(0)
    r = running(d=d, quorum=2, chunk_bytes=4096)
    with Client(r.endpoint, "switch", timeout=10) as c:
        c._send(message(Kind.CHUNK, np.ones(1024, np.float32), round=0, offset=0, total=4 * d, seq=c._next(),
                        dtype=Dtype.FLOAT32, session=c.state["session"]))  # a raw upload begun ...
        wait_for(lambda: "switch" in r.server.uploads, 10, "the raw upload held")
        p = compress.TopK(k=10, error_feedback=False).encode(np.arange(d, dtype=np.float32))
        assert c.submit(p, 0)["id"] == "switch"  # ... then a compressed one: it starts at 0


def test_participant_ids_are_not_markup_in_the_live_view(running):
    """An id like "[/x]" is printable, so it is admitted; the rich view must show it, not parse it."""
    import io

    pytest.importorskip("rich")
    from rich.console import Console

    from fedagg.transport.observe import ProgressView

    r = running(d=64, quorum=5)
    s = _peer(r.endpoint)
    try:
        _, st = _hello(s, "[/x]", seq=1)
        _chunk(s, np.ones(16, np.float32), st["session"], 0, 256, 2)
        s.send_multipart(message(Kind.CHUNK, np.ones(16, np.float32), round=9, offset=0, total=256, seq=3,
                                 dtype=Dtype.FLOAT32, session=st["session"]))  # another round: refused, listed
        assert _reply(s)[1]["reason"] == "future"
    finally:
        s.close(0)
    out = io.StringIO()
    view = ProgressView(console=Console(file=out, force_terminal=True, width=150))
    view.update(r.server)
    view.close()
    assert "[/x]: future" in out.getvalue()


def test_a_participants_round_costs_seven_messages(running):
    """Per round the Client sends STATUS, GET_MODEL, CHUNK, COMMIT (and receives STATE, MODEL,
    CREDIT, ACCEPTED, ROUND): no STATUS round trip before its upload or while it waits for ROUND."""
    r = running(d=256, quorum=1, rounds=4, linger=5.0)
    with Client(r.endpoint, "lean", timeout=10) as c:
        for k in range(4):
            rnd, model = c.model()
            c.submit(np.ones(256, np.float32), rnd)
            assert c.wait_round(rnd, 10) == rnd + 1
    for rec in list(r.server.history)[1:]:  # round 0 also has the HELLO
        assert rec["messages"] == {"STATUS": 1, "GET_MODEL": 1, "CHUNK": 1, "COMMIT": 1}, rec["messages"]
