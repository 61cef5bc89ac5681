"""A sharded server round (`fedagg serve --shards K`, loopback): honest and Byzantine participants,
one participant that completes only one shard, one shard killed and restarted. The new model must
be the single-process aggregate of the agreed participants, and nothing accepted may be lost."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import fedagg
from helpers import free_port

pytest.importorskip("zmq")
pytest.importorskip("torch")

D = 3001


class Shards:
    """`fedagg serve --shards K` as a subprocess; its stdout lines parsed as they come."""

    def __init__(self, K, args, tmp_path):
        self.K = K
        self.port = free_port()
        while any(_busy(self.port + i) for i in range(K)):
            self.port = free_port()
        env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", PYTHONUNBUFFERED="1")
        self.err = open(tmp_path / "serve.err", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedagg", "serve", "--shards", str(K), "--bind", f"tcp://127.0.0.1:{self.port}",
             "--d", str(D), "--state-dir", str(tmp_path / "state"), *map(str, args)],
            stdout=subprocess.PIPE, stderr=self.err, text=True, env=env,
            start_new_session=True)
        self.lines: "queue.Queue[dict]" = queue.Queue()
        self.log = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            self.log.append(obj)
            self.lines.put(obj)

    def wait_for(self, pred, what, timeout=90.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                obj = self.lines.get(timeout=0.5)
            except queue.Empty:
                assert self.proc.poll() is None, f"the launcher exited ({self.proc.returncode}) waiting for {what}"
                continue
            if pred(obj):
                return obj
        raise AssertionError(f"timed out waiting for {what}; seen: {self.log[-6:]}")

    def listening(self, timeout=90.0):
        """The next K "listening" lines (one per shard): {rank: pid}."""
        pids = {}
        while len(pids) < self.K:
            obj = self.wait_for(lambda o: "listening" in o, "the shards to listen", timeout)
            pids[obj["shard"]] = obj["pid"]
        return pids

    def endpoint(self, i=0):
        return f"tcp://127.0.0.1:{self.port + i}"

    def stop(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:  # the shards may outlive the launcher by a moment: none is left behind
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.stdout.close()
        self.err.close()


def _busy(port):
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def submit_all(ids, X, rnd, endpoint):
    errors = []

    def go(i):
        try:
            with fedagg.Client(endpoint, ids[i], timeout=60) as c:
                assert len(c.shards) > 1
                c.submit(X[i], rnd)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append((ids[i], repr(e)))
    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors


@pytest.mark.parametrize("K", [2, 3])
def test_sharded_round_with_byzantine_partial_and_a_killed_shard(K, tmp_path):
    rng = np.random.default_rng(K)
    honest = (0.1 * rng.standard_normal((5, D)) + 1.0).astype(np.float32)
    byzantine = (100.0 * rng.standard_normal((2, D))).astype(np.float32)
    X = np.concatenate([honest, byzantine])
    ids = [f"honest-{i}" for i in range(5)] + ["byz-0", "byz-1"]
    srv = Shards(K, ["--rule", "trimmed_mean", "--f", "2", "--quorum", len(ids), "--min-updates", 5,
                     "--deadline", 120, "--rounds", 1, "--linger", 30, "--max-restarts", 2], tmp_path)
    try:
        pids = srv.listening()
        with fedagg.Client(srv.endpoint(0), "reader", timeout=30) as c:
            assert [s["endpoint"] for s in c.state["shards"]] == [srv.endpoint(i) for i in range(K)]
            assert c.state["d_total"] == D and c.state["shards"][-1]["hi"] == D
            rnd, model0 = c.model()
            assert rnd == 0 and model0.shape == (D,) and not model0.any()
            lo, hi = c.state["shards"][0]["lo"], c.state["shards"][0]["hi"]
        # One participant completes only shard 0's range.
        with fedagg.Client(srv.endpoint(0), "partial", timeout=30, _one_shard=True) as p:
            p.submit(rng.standard_normal(hi - lo).astype(np.float32), rnd)
        # Four participants complete every shard; then shard K-1 is killed mid-round.
        submit_all(ids[:4], X[:4], rnd, srv.endpoint(0))
        os.kill(pids[K - 1], signal.SIGKILL)
        new = srv.listening()  # torchrun restarts the group; each shard recovers its state directory
        assert set(new.values()).isdisjoint(pids.values())
        with fedagg.Client(srv.endpoint(K - 1), "reader-2", timeout=30) as c:
            assert c.state["round"] == rnd and c.state["phase"] == "upload"
        submit_all(ids[4:], X[4:], rnd, srv.endpoint(0))
        closed = [srv.wait_for(lambda o: "round_closed" in o, "the round's close") for _ in range(K)]
        records = {o["shard"]: o["round_closed"] for o in closed}
        assert set(records) == set(range(K))
        accepted = records[0]["accepted"]
        for rec in records.values():  # every shard agreed on the same participants, in the same order
            assert rec["accepted"] == accepted and rec["model_updated"] is True
        assert sorted(accepted) == sorted(ids)  # nothing accepted was lost to the kill
        assert "partial" in records[0]["excluded_by_shards"] and "partial" not in accepted
        order = [ids.index(p) for p in accepted]
        want = fedagg.aggregate(X[order], "trimmed_mean", 2)
        with fedagg.Client(srv.endpoint(1), "reader-3", timeout=30) as c:
            got_rnd, model1 = c.model()
            assert got_rnd == rnd + 1
            assert np.array_equal(model1, model0 + want)  # the single-process result, bit for bit
        with fedagg.Client(srv.endpoint(0), "partial", timeout=30, _one_shard=True) as p:
            assert "did not accept this participant's range" in (p.state["excluded"] or "")
    finally:
        srv.stop()
