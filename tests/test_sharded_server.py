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


# ------------------------------------------------------------------ two hosts, on one machine
class Namespaces:
    """Two network namespaces joined by a veth pair (10.213.0.1 and 10.213.0.2, inside them only)."""

    def __init__(self):
        tag = f"{os.getpid() % 100000}"
        self.names = [f"fedagg-a-{tag}", f"fedagg-b-{tag}"]
        self.addrs = ["10.213.0.1", "10.213.0.2"]
        self.ifaces = [f"fga{tag}", f"fgb{tag}"]
        self.made = []
        try:
            for ns in self.names:
                self._ip("netns", "add", ns)
                self.made.append(ns)
                self._ip("-n", ns, "link", "set", "lo", "up")
            self._ip("link", "add", self.ifaces[0], "netns", self.names[0], "type", "veth", "peer", "name",
                     self.ifaces[1], "netns", self.names[1])
            for ns, iface, addr in zip(self.names, self.ifaces, self.addrs):
                self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", iface)
                self._ip("-n", ns, "link", "set", iface, "up")
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _ip(*args):
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=20)

    def run(self, i, argv, **kw):
        return subprocess.Popen(["ip", "netns", "exec", self.names[i], *argv], **kw)

    def close(self):
        for ns in self.made:  # deleting a namespace deletes its end of the veth pair, and the pair
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=20)
        self.made = []


def _namespaces_or_skip():
    import shutil

    if shutil.which("ip") is None:
        pytest.skip("network namespaces: the `ip` command (iproute2) is not installed")
    try:
        return Namespaces()
    except subprocess.CalledProcessError as e:
        pytest.skip(f"network namespaces cannot be created here ({' '.join(e.cmd)}: {e.stderr.strip()}); "
                    "they need root or CAP_NET_ADMIN")


PARTICIPANT = r"""
import json, sys, numpy as np, fedagg
endpoint, d, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
X = (np.random.default_rng(5).standard_normal((3, d))).astype(np.float32)
res = {}
for i in range(3):
    with fedagg.Client(endpoint, f"p{i}", timeout=60) as c:
        rnd, model = c.model()
        res["shards"] = c.state["shards"]
        c.submit(X[i], rnd)
with fedagg.Client(endpoint, "reader", timeout=60) as c:
    c.wait_round(rnd, timeout=60)
    res["round"], model = c.model()
    res["equal"] = bool(np.array_equal(model, fedagg.aggregate(X, "median", 1)))
json.dump(res, open(out, "w"))
"""


def test_two_shards_in_two_network_namespaces(tmp_path):
    """Each shard is a host of its own (its own network namespace and address, torchrun's static
    rendezvous across the veth pair), the participant a third party in the first namespace."""
    net = _namespaces_or_skip()
    procs, files = [], []
    try:
        d, port = 2001, 5555
        endpoints = [f"tcp://{a}:{port}" for a in net.addrs]
        for i in range(2):
            env = dict(os.environ, GLOO_SOCKET_IFNAME=net.ifaces[i], PYTHONUNBUFFERED="1")
            argv = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                    "--node-rank", str(i), "--master-addr", net.addrs[0], "--master-port", "29400",
                    "-m", "fedagg", "--", "serve", "--d", str(d), "--rule", "median", "--f", "1",
                    "--quorum", "3", "--min-updates", "3", "--rounds", "1", "--linger", "20", "--insecure",
                    "--shard-endpoints", *endpoints]
            files += [open(tmp_path / f"shard{i}.out", "w"), open(tmp_path / f"shard{i}.err", "w")]
            procs.append(net.run(i, argv, env=env, stdout=files[-2], stderr=files[-1], start_new_session=True))
        (tmp_path / "p.py").write_text(PARTICIPANT)
        client = net.run(0, [sys.executable, str(tmp_path / "p.py"), endpoints[0], str(d), str(tmp_path / "p.json")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = client.communicate(timeout=180)[0]
        assert client.returncode == 0, log[-3000:] + "\n" + (tmp_path / "shard1.err").read_text()[-3000:]
        res = json.loads((tmp_path / "p.json").read_text())
        assert [s["endpoint"] for s in res["shards"]] == endpoints
        assert res["round"] == 1 and res["equal"] is True
        for i in range(2):
            lines = [json.loads(line) for line in (tmp_path / f"shard{i}.out").read_text().splitlines()
                     if line.startswith("{")]
            closed = [x["round_closed"] for x in lines if "round_closed" in x]
            assert closed and closed[0]["accepted"] == ["p0", "p1", "p2"], lines
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=30)
        for fh in files:
            fh.close()
        net.close()


# ------------------------------------------------------------------ the pieces, in one process
from fedagg.transport.shards import ShardSpec, decide  # noqa: E402


def _view(accepted, late=False, stop=False, rnd=3):
    return {"round": rnd, "accepted": accepted, "late": late, "stop": stop}


def test_decide_takes_what_every_shard_accepted_in_shard_0_order():
    views = [_view(["c", "a", "partial", "b"]), _view(["a", "b", "c", "late-one"]), _view(["b", "c", "a"])]
    d = decide(views, quorum=3, min_updates=1, failed_at=-1)
    assert d.action == "close" and d.reason == "quorum" and d.participants == ["c", "a", "b"]
    assert set(d.incomplete) == {"partial", "late-one"}
    assert "[1, 2]" in d.incomplete["partial"] and "[0, 2]" in d.incomplete["late-one"]
    # below the quorum: wait, or at shard 0's deadline close on what every shard has
    assert decide(views, 4, 1, -1).action == "wait"
    assert decide(views, 4, 4, -1).action == "wait"
    late = [dict(v, late=(i == 0)) for i, v in enumerate(views)]
    d = decide(late, 4, 2, -1)
    assert d.action == "close" and d.reason == "deadline" and d.participants == ["c", "a", "b"]
    assert decide(late, 4, 4, -1).action == "close_without_model"
    # another shard's clock does not close the round; the pipeline failing on these 3 does not retry them
    assert decide([dict(v, late=(i == 1)) for i, v in enumerate(views)], 4, 1, -1).action == "wait"
    assert decide(late, 4, 2, 3).action == "close_without_model"
    assert decide(views, 3, 1, 3).action == "wait"
    # any shard asked to stop stops all, once a round that is due has closed; different rounds are an error
    asked = [views[0], dict(views[1], stop=True), views[2]]
    assert decide(asked, 4, 1, -1).action == "stop"
    assert decide(asked, 3, 1, -1).action == "close"
    with pytest.raises(RuntimeError, match="different rounds"):
        decide([views[0], dict(views[1], round=4), views[2]], 3, 1, -1)


def test_shard_spec_ranges_cover_the_model_and_bad_specs_are_refused():
    spec = ShardSpec(rank=1, endpoints=("tcp://a:1", "tcp://b:2", "tcp://c:3"), d=10)
    table = spec.table()
    assert [(t["lo"], t["hi"]) for t in table] == [(0, 4), (4, 7), (7, 10)] and spec.range == (4, 7)
    assert [t["endpoint"] for t in table] == ["tcp://a:1", "tcp://b:2", "tcp://c:3"]
    for kw, match in (({"rank": 3}, "not in"), ({"rank": -1}, "not in"), ({"d": 2}, "at least one"),
                      ({"endpoints": ()}, "every shard"), ({"tick": 0}, "tick")):
        args = dict(rank=0, endpoints=("tcp://a:1", "tcp://b:2", "tcp://c:3"), d=10)
        args.update(kw)
        with pytest.raises(ValueError, match=match):
            ShardSpec(**args)


def test_a_shard_refuses_a_ledger_and_a_model_that_is_not_its_slice():
    from fedagg.transport.config import ServerConfig
    from fedagg.transport.server import Server

    spec = ShardSpec(rank=0, endpoints=("tcp://127.0.0.1:1", "tcp://127.0.0.1:2"), d=30)
    with pytest.raises(ValueError, match="ledger"):
        ServerConfig(shard=spec, ledger=object(), admission="ledger").check()
    with pytest.raises(ValueError, match=r"owns parameters \[0, 15\) of 30"):
        Server(np.zeros(30, dtype=np.float32), ServerConfig(bind=f"tcp://127.0.0.1:{free_port()}", shard=spec))


@pytest.mark.parametrize("shards, why", [
    ([{"endpoint": "tcp://127.0.0.1:1", "lo": 0, "hi": 5}, {"endpoint": "tcp://127.0.0.1:2", "lo": 6, "hi": 10}],
     "do not cover"),
    ([{"endpoint": "tcp://127.0.0.1:1", "lo": 0, "hi": 5}, {"endpoint": 7, "lo": 5, "hi": 10}], "not an endpoint"),
    ([{"endpoint": "tcp://127.0.0.1:1", "lo": 0, "hi": 5}, {"endpoint": "tcp://127.0.0.1:2", "lo": 5, "hi": 9}],
     "do not cover"),
])
def test_client_refuses_a_shard_table_that_does_not_add_up(shards, why):
    """A hostile or broken server's STATE cannot make the client split updates wrongly."""
    import zmq

    from fedagg.transport.client import TransportError
    from fedagg.transport.protocol import Kind, json_message, parse

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if not router.poll(100):
                continue
            rid, *frames = router.recv_multipart()
            head, _ = parse(frames, 1 << 20)
            state = {"round": 0, "session": 1, "d": 5, "d_total": 10, "shard": 0, "shards": shards,
                     "model_bytes": 20, "chunk_bytes": 4096, "credits": 1, "held": 0, "accepted": False,
                     "phase": "upload"}
            router.send_multipart([rid, *json_message(Kind.STATE, state, session=1)])
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(TransportError, match=why):
            fedagg.Client(f"tcp://127.0.0.1:{port}", "alice", timeout=5)
    finally:
        stop.set()
        t.join(timeout=10)
        router.close(0)
        ctx.term()


@pytest.mark.parametrize("argv, message", [
    (["--shards", "2", "--bind", "tcp://127.0.0.1:0"], "fixed --bind port"),
    (["--shards", "2", "--bind", "ipc:///tmp/x"], "tcp:// --bind"),
    (["--shards", "2", "--rule", "median", "--f", "1"], "cannot run on 1 updates"),  # checked before torchrun
    (["--shards", "2", "--shard-endpoints", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], "not both"),
    (["--shard-endpoints", "tcp://127.0.0.1:1", "tcp://127.0.0.1:2"], "start each shard with torchrun"),
])
def test_serve_refuses_bad_shard_options_in_one_line(argv, message):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    p = subprocess.run([sys.executable, "-m", "fedagg", "serve", "--d", "100", *argv], capture_output=True,
                       text=True, timeout=60, env=env)
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert message in p.stderr and p.stderr.startswith("fedagg serve: error:"), p.stderr
    assert "Traceback" not in p.stderr
