"""The server at scale: memory that does not grow with n, durability off the event loop, the device path.

- The mean folds each accepted update into a float64 sum (transport/rounds.py): the round's
  receive memory peaks at max_inflight updates whatever n is, and participants beyond it are
  told `busy` with a retry_after, which Client and Load honour.
- ACCEPTED is sent only once the update is durable (transport/durable.py): a server killed
  at random points and restarted produces the uninterrupted run's model bit for bit.
- A GPU server (device="cuda") is run on the CPU through stand-ins for torch's CUDA side and
  fedagg._cuda (as test_gpu_plumbing.py does), against the CPU server's result.
"""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fedagg import _core, _gpu
from fedagg.transport import Client, Server, ServerConfig, TransportError
from fedagg.transport import device as device_mod
from fedagg.transport.durable import RoundStore, StorageError
from fedagg.transport.load import Load, seeded_mean, seeded_update
from helpers import free_port


def fold_reference(rows, weights=None, clip=None):
    """The server's mean, plainly: sum of (w * s) * x in float64 in acceptance order, / sum(w), to float32."""
    acc = np.zeros(rows[0].size)
    wsum = 0.0
    for k, x in enumerate(rows):
        w = 1.0 if weights is None else float(weights[k])
        s = 1.0
        if clip is not None:
            s = min(1.0, clip / max(float(np.sqrt(np.sum(x.astype(np.float64) ** 2))), np.finfo(np.float64).tiny))
        acc += (w * s) * x.astype(np.float64)
        wsum += w
    return (acc / wsum).astype(np.float32)


def start(d, **cfg):
    cfg.setdefault("bind", "tcp://127.0.0.1:0")
    server = Server(np.zeros(d, np.float32), ServerConfig(**cfg))
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    return server, t


def stop(server, t):
    server.stop()
    t.join(30)
    assert not t.is_alive()


# ---------------------------------------------------------------- memory independent of n
@pytest.mark.parametrize("n", [8, 48])
def test_mean_round_memory_is_max_inflight_updates_whatever_n(n):
    d, seed, inflight = 100_000, 3, 3
    server, t = start(d, quorum=n, rounds=1, linger=5, max_inflight=inflight, chunk_bytes=65536, deadline=120)
    try:
        report = Load(server.endpoint, n, d, seed=seed, timeout=60).run()  # all n at once: most are told busy
    finally:
        stop(server, t)
    rec = server.history[0]
    assert sorted(rec["accepted"]) == sorted(f"load-{i}" for i in range(n)) and rec["model_updated"]
    if n > inflight:
        assert report.refused.get("busy", 0) > 0 and rec["rejected_counts"]["busy"] == report.refused["busy"]
    # at most max_inflight updates were ever held, for 8 participants as for 48
    assert server.buffers.peak <= inflight * 4 * d
    order = [int(pid.split("-")[1]) for pid in rec["accepted"]]
    rows = [seeded_update(seed, i, 0, d) for i in order]
    np.testing.assert_array_equal(server.model, fold_reference(rows))
    np.testing.assert_allclose(server.model, seeded_mean(seed, order, 0, d), rtol=1e-6, atol=1e-7)


def test_busy_carries_retry_after_and_the_client_waits_it_out():
    d = 50_000
    server, t = start(d, quorum=2, rounds=1, linger=5, max_inflight=1, chunk_bytes=16384)
    x, y = np.full(d, 1.0, np.float32), np.full(d, 3.0, np.float32)
    try:
        import zmq

        from fedagg.transport.protocol import Dtype, Kind, message, parse, parse_json

        with Client(server.endpoint, "slow", timeout=10) as slow:
            st = slow.status()
            # "slow" holds the only upload slot with its first chunk...
            slow._send(message(Kind.CHUNK, x.view(np.uint8)[:16384], round=0, offset=0, total=4 * d,
                               seq=slow._next(), dtype=Dtype.FLOAT32, session=st["session"]))
            head, body = slow._recv(time.monotonic() + 5)
            assert head.kind == Kind.CREDIT
            # ...so another participant's first chunk is refused busy, with a retry_after
            ctx = zmq.Context.instance()
            raw = ctx.socket(zmq.DEALER)
            raw.connect(server.endpoint)
            try:
                from fedagg.transport.protocol import json_message

                raw.send_multipart(json_message(Kind.HELLO, {"id": "other"}, seq=1))
                st2 = parse_json(parse(raw.recv_multipart(), 1 << 20)[1])
                raw.send_multipart(message(Kind.CHUNK, y.view(np.uint8)[:16384], round=0, offset=0, total=4 * d,
                                           seq=2, dtype=Dtype.FLOAT32, session=st2["session"]))
                assert raw.poll(5000)
                head, body = parse(raw.recv_multipart(), 1 << 20)
                refusal = parse_json(body)
                assert head.kind == Kind.REJECTED and refusal["reason"] == "busy"
                assert 0.05 <= refusal["retry_after"] <= 10 and "max_inflight 1" in refusal["detail"]
            finally:
                raw.close(0)
            # a Client told busy waits and gets in once the slot is free
            done = {}

            def patient():
                with Client(server.endpoint, "patient", timeout=10) as c:
                    done["r"] = c.submit(y, 0)

            th = threading.Thread(target=patient)
            th.start()
            time.sleep(0.5)
            assert slow.submit(x, 0)["id"] == "slow"  # resumes from the held chunk, frees the slot
            th.join(60)
            assert done["r"]["id"] == "patient"
    finally:
        stop(server, t)
    np.testing.assert_array_equal(server.model, np.full(d, 2.0, np.float32))
    assert server.history[0]["rejected_counts"]["busy"] >= 2


def test_a_server_at_capacity_asks_for_the_time_its_backlog_takes():
    """retry_after of a full server: the uploads it holds over its recent acceptance rate (at least
    one per second), not a fixed fraction of an upload: under a load beyond what it takes, quick
    retries (each bringing its first chunk again) would spend its time refusing."""
    import zmq

    from fedagg.transport.protocol import Dtype, Kind, json_message, message, parse, parse_json

    d, held = 20_000, 3
    server, t = start(d, quorum=8, rounds=1, max_inflight=held, chunk_bytes=16384)
    x = np.full(d, 1.0, np.float32)
    ctx = zmq.Context.instance()
    socks = []
    try:
        def first_chunk(pid):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(server.endpoint)
            socks.append(s)
            s.send_multipart(json_message(Kind.HELLO, {"id": pid}, seq=1))
            assert s.poll(5000)
            st = parse_json(parse(s.recv_multipart(), 1 << 20)[1])
            states.append(st)
            s.send_multipart(message(Kind.CHUNK, x.view(np.uint8)[:16384], round=0, offset=0, total=4 * d, seq=2,
                                     dtype=Dtype.FLOAT32, session=st["session"]))
            assert s.poll(5000)
            return parse(s.recv_multipart(), 1 << 20)

        states = []
        for i in range(held):  # every slot held by a first chunk, nothing accepted yet
            assert first_chunk(f"p{i}")[0].kind == Kind.CREDIT
        head, body = first_chunk("late")
        refusal = parse_json(body)
        assert head.kind == Kind.REJECTED and refusal["reason"] == "busy"
        assert refusal["retry_after"] == pytest.approx(held / 1.0)  # 3 held, at <= 1 accepted per second
        # STATE says so before any byte is sent: "busy" while full, absent while an upload is taken
        assert "busy" not in states[0] and states[-1]["busy"] == pytest.approx(held / 1.0)
    finally:
        for s in socks:
            s.close(0)
        stop(server, t)


# ---------------------------------------------------------------- durability
def test_accepted_is_sent_only_once_the_update_is_durable(tmp_path, monkeypatch):
    d = 20_000
    gate = threading.Event()
    real = RoundStore.save_fold

    def slow_save(self, *a, **kw):
        assert gate.wait(20)
        return real(self, *a, **kw)

    monkeypatch.setattr(RoundStore, "save_fold", slow_save)
    server, t = start(d, quorum=2, rounds=1, linger=2, state_dir=str(tmp_path / "s"))
    try:
        result = {}
        c = Client(server.endpoint, "a", timeout=20)
        th = threading.Thread(target=lambda: result.update(r=c.submit(np.ones(d, np.float32), 0)))
        th.start()
        time.sleep(1.0)
        assert "r" not in result and not server.accepted and "a" in server.committing  # folded, not on disk
        assert not (tmp_path / "s" / "round-0" / "fold.json").exists()
        gate.set()
        th.join(20)
        assert result["r"]["id"] == "a" and list(server.accepted) == ["a"]
        fold = json.loads((tmp_path / "s" / "round-0" / "fold.json").read_text())
        assert [e["id"] for e in fold["accepted"]] == ["a"]
        c.close()
    finally:
        gate.set()
        stop(server, t)


def test_the_update_completing_the_quorum_is_acknowledged_once_the_close_is_on_disk(tmp_path, monkeypatch):
    """Its group is not written on its own: the new model (server.json's next round) makes it durable."""
    d = 20_000
    gate = threading.Event()
    real_round, real_fold, folds = RoundStore.save_round, RoundStore.save_fold, []

    def slow_round(self, rnd, model, extra=None):
        if rnd == 1:
            assert gate.wait(20)
        return real_round(self, rnd, model, extra)

    def fold(self, rnd, gen, acc, meta, cancelled=None):
        folds.append([e["id"] for e in meta["accepted"]])
        return real_fold(self, rnd, gen, acc, meta, cancelled)

    monkeypatch.setattr(RoundStore, "save_round", slow_round)
    monkeypatch.setattr(RoundStore, "save_fold", fold)
    server, t = start(d, quorum=2, rounds=1, linger=2, state_dir=str(tmp_path / "s"))
    try:
        with Client(server.endpoint, "a", timeout=20) as a:
            a.submit(np.ones(d, np.float32), 0)  # below the quorum: its own snapshot first
        result = {}

        def second():
            with Client(server.endpoint, "b", timeout=20) as b:
                result["r"] = b.submit(np.ones(d, np.float32), 0)

        th = threading.Thread(target=second)
        th.start()
        time.sleep(1.0)
        assert "r" not in result and server.rounds_done == 1  # closed, not yet on disk: no ACCEPTED
        gate.set()
        th.join(20)
        assert result["r"] == {"round": 0, "id": "b"}
    finally:
        gate.set()
        stop(server, t)
    assert folds == [["a"]]  # b's group was never written as a snapshot
    assert json.loads((tmp_path / "s" / "server.json").read_text())["round"] == 1


class _Job:
    def __init__(self, k):
        self.pid, self.error, self.deferred = f"j{k}", None, False


def test_group_commit_groups_jobs_and_settle_gives_up_the_write_in_progress():
    from fedagg.transport.durable import Cancelled, GroupCommit

    applied, written, writing = [], [], threading.Event()

    def snapshot(group):
        def write(cancelled):
            writing.set()
            for _ in range(2000):  # a slow disk: 20 s unless given up
                if cancelled():
                    raise Cancelled()
                time.sleep(0.01)
            written.append([j.pid for j in group])
        return write

    gc = GroupCommit(applied.extend, snapshot)
    try:
        jobs = [_Job(k) for k in range(5)]
        gc.submit(jobs[:1])
        assert writing.wait(5)  # j0's write is in progress...
        for j in jobs[1:]:
            gc.submit([j])  # ...the others are applied meanwhile, waiting for the next snapshot
        t0 = time.monotonic()
        done = gc.settle(timeout=10)
        assert time.monotonic() - t0 < 2  # the write was given up, not waited out
        assert sorted(j.pid for j in done) == [j.pid for j in jobs] and all(j.deferred for j in done)
        assert [j.pid for j in applied] == [j.pid for j in jobs] and written == []
        assert gc.pending == 0
    finally:
        gc.close()


def test_a_given_up_fold_write_leaves_the_previous_generation_whole(tmp_path):
    from fedagg.transport.durable import Cancelled

    store = RoundStore(tmp_path)
    store.save_round(0, np.zeros(1000, np.float32))
    meta = {"accepted": [{"id": "a", "address": "a", "weight": 1.0}], "weight_sum": 1.0, "clipped": 0}
    store.save_fold(0, 1, np.full(1000, 1.0), meta)
    with pytest.raises(Cancelled):
        store.save_fold(0, 2, np.full(1000, 2.0), dict(meta, weight_sum=2.0), cancelled=lambda: True)
    assert sorted(p.name for p in (tmp_path / "round-0").iterdir()) == ["fold-1.npy", "fold.json"]
    rnd, model, saved = store.load()
    assert saved["gen"] == 1 and saved["weight_sum"] == 1.0 and (saved["acc"] == 1.0).all()
    store.save_fold(0, 3, np.full(1000, 3.0), dict(meta, weight_sum=3.0))  # the next one replaces it
    assert sorted(p.name for p in (tmp_path / "round-0").iterdir()) == ["fold-3.npy", "fold.json"]
    assert store.load()[2]["weight_sum"] == 3.0


def test_a_failing_disk_stops_the_server_without_acknowledging(tmp_path, monkeypatch):
    d = 10_000

    def broken(self, *a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(RoundStore, "save_fold", broken)
    server = Server(np.zeros(d, np.float32), ServerConfig(bind="tcp://127.0.0.1:0", quorum=2,
                                                          state_dir=str(tmp_path / "s")))
    errors = []

    def run():
        try:
            server.serve()
        except StorageError as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    with Client(server.endpoint, "a", timeout=3) as c:
        with pytest.raises(TransportError):
            c.submit(np.ones(d, np.float32), 0)
    t.join(20)
    assert errors and "No space left" in str(errors[0])
    assert not server.accepted


SERVE = [sys.executable, "-m", "fedagg", "serve", "--no-progress", "--linger", "0", "--rounds", "1"]


def _spawn(cmd):
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _submit_in_order(endpoint, n, d, seed, errors):
    """Participants one after another (a fixed acceptance order), each resuming across server restarts;
    a pause between chunks stretches the round over a few seconds for the kills to land in."""
    try:
        for i in range(n):
            with Client(endpoint, f"p{i}", timeout=4) as c:  # silence this long: ask where the server stands
                c.submit(seeded_update(seed, i, 0, d), 0, chunk_delay=0.04)
    except Exception as e:  # noqa: BLE001 - reported by the test
        errors.append(e)


def _round(tmp, n, d, seed, kills):
    """One round through `fedagg serve` with a state_dir; SIGKILL at each delay of `kills` (seconds)."""
    port = free_port()
    ep = f"tcp://127.0.0.1:{port}"
    cmd = SERVE + ["--bind", ep, "--d", str(d), "--quorum", str(n), "--state-dir", str(tmp), "--chunk-mib", "1"]
    srv = _spawn(cmd)
    errors = []
    th = threading.Thread(target=_submit_in_order, args=(ep, n, d, seed, errors), daemon=True)
    th.start()
    killed = 0
    try:
        for delay in kills:
            time.sleep(delay)
            if srv.poll() is not None:
                break
            srv.send_signal(signal.SIGKILL)
            srv.communicate(timeout=20)
            killed += 1
            srv = _spawn(cmd)  # same state directory, same port
        th.join(240)
        assert not th.is_alive() and not errors, errors
        out, err = srv.communicate(timeout=60)
        assert srv.returncode == 0, err
    finally:
        if srv.poll() is None:
            srv.kill()
            srv.communicate(timeout=10)
    recs = [json.loads(line) for line in (tmp / "metrics.jsonl").read_text().splitlines()]
    return np.load(tmp / "model.npy"), recs, killed


def test_sigkill_at_random_points_gives_the_uninterrupted_model_bitwise(tmp_path):
    n, d, seed = 10, 2_000_000, 5
    want, rec, _ = _round(tmp_path / "calm", n, d, seed, kills=[])
    assert rec[0]["accepted"] == [f"p{i}" for i in range(n)]
    np.testing.assert_array_equal(want, fold_reference([seeded_update(seed, i, 0, d) for i in range(n)]))
    rng = random.Random(11)
    for trial in range(2):
        kills = [rng.uniform(0.2, 1.5) for _ in range(3)]
        got, rec, killed = _round(tmp_path / f"killed{trial}", n, d, seed, kills)
        assert killed == 3, "the round ended before the kills: make it longer"
        # no accepted update lost, none counted twice, and the same sum in the same order
        assert len(rec) == 1 and rec[0]["accepted"] == [f"p{i}" for i in range(n)], (kills, rec)
        np.testing.assert_array_equal(got, want, err_msg=f"kills at {kills}")


def _peak_rss(pid: int) -> int:
    """Peak resident memory of a live process, in bytes (VmHWM)."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads peak RSS from /proc (Linux)")
def test_a_round_of_240_participants_x_25M_floats_with_a_state_dir_stays_under_3GB(tmp_path):
    """24 GB of updates through `fedagg serve` (rule mean, state_dir) on a machine with 24 GiB:
    the server folds each update as it is accepted and holds only the uploads in flight."""
    n, d, seed, inflight = 240, 25_000_000, 21, 8
    ep = f"tcp://127.0.0.1:{free_port()}"
    state = tmp_path / "state"
    srv = _spawn(SERVE[:5] + ["--rounds", "1", "--linger", "30", "--bind", ep, "--d", str(d), "--quorum", str(n),
                               "--state-dir", str(state), "--max-inflight", str(inflight), "--deadline", "1500"])
    try:
        report = Load(ep, n, d, seed=seed, concurrency=inflight, timeout=300).run()
        peak = _peak_rss(srv.pid)  # lingering: the round is over, the process is still there
    finally:
        srv.send_signal(signal.SIGTERM)
        out, err = srv.communicate(timeout=60)
    assert srv.returncode == 0, err
    assert sorted(report.rounds[0]) == sorted(f"load-{i}" for i in range(n))
    assert peak < 3e9, f"peak RSS {peak / 1e9:.2f} GB"
    rec = json.loads((state / "metrics.jsonl").read_text().splitlines()[0])
    assert len(rec["accepted"]) == n and rec["model_updated"]
    model = np.load(state / "model.npy")
    # The float64 mean recomputed from the seeds (one update in memory at a time), in index
    # order: the server summed in acceptance order, so its float32 result may differ by one ulp.
    want = seeded_mean(seed, list(range(n)), 0, d).astype(np.float32)
    np.testing.assert_array_max_ulp(model, want, maxulp=1)


def test_restart_with_another_rule_is_refused(tmp_path):
    store = tmp_path / "s"
    server, t = start(1000, quorum=3, state_dir=str(store))
    with Client(server.endpoint, "a", timeout=10) as c:
        c.submit(np.ones(1000, np.float32), 0)
    stop(server, t)
    with pytest.raises(ValueError, match="another rule"):
        Server(np.zeros(1000, np.float32), ServerConfig(bind="tcp://127.0.0.1:0", rule="median", quorum=3,
                                                        state_dir=str(store)))
    again, t = start(1000, quorum=3, state_dir=str(store))  # the same rule picks the round up
    assert list(again.accepted) == ["a"] and again.collector.weight_sum == 1.0
    stop(again, t)


# ---------------------------------------------------------------- sizing at start-up
def test_a_round_that_cannot_fit_is_refused_at_start_naming_the_numbers():
    with pytest.raises(ValueError, match=r"quorum 100 x 4000000 bytes.*needs 382 MiB but 40 MiB"):
        Server(np.zeros(1_000_000, np.float32), ServerConfig(bind="tcp://127.0.0.1:0", rule="median", quorum=100,
                                                             receive_memory=40 << 20))
    with pytest.raises(ValueError, match="receive memory .* in host memory: needs"):
        Server(np.zeros(1000, np.float32), ServerConfig(bind="tcp://127.0.0.1:0", receive_memory=1 << 50))
    with pytest.raises(ValueError, match="device must be"):
        ServerConfig(device="gpu").check()
    with pytest.raises(ValueError, match="max_inflight must be >= 1"):
        ServerConfig(max_inflight=0).check()


# ---------------------------------------------------------------- the GPU path, on the CPU
class DeviceArray(np.ndarray):
    """Stands for a CUDA tensor of the stand-in device."""


class StandInCuda:
    """transport.device.TorchCuda's interface over host memory, counting what it is asked to do."""

    def __init__(self, name):
        from test_gpu_plumbing import Device

        self.name, self.like = "cuda:0", Device()  # what compressed payloads decode next to
        self.copies = self.fences = self.contexts = 0

    def pinned(self, nbytes):
        a = np.zeros(nbytes, np.uint8)
        return a, a

    def empty_f32(self, d):
        return np.full(d, np.nan, np.float32).view(DeviceArray)  # poisoned, as device memory is

    def copy_in(self, buf, offset, handle, nbytes):
        self.copies += 1
        buf.view(np.uint8)[offset:offset + nbytes] = handle[:nbytes]
        return ("event", offset)

    def wait(self, event):
        assert event[0] == "event"

    def copies_before_compute(self):
        self.fences += 1

    def copies_after_compute(self):
        self.fences += 1

    def computing(self):
        import contextlib

        self.contexts += 1
        return contextlib.nullcontext()

    def sqnorm(self, x):
        return float(_core.sqnorms([np.asarray(x)])[0])

    def finite(self, x):
        return bool(np.isfinite(np.asarray(x)).all())

    def zeros_f64(self, d):
        return np.zeros(d).view(DeviceArray)

    def fold(self, acc, x, c):
        tmp = np.asarray(x).astype(np.float64)
        tmp *= c
        acc += tmp

    def mean(self, acc, total):
        return (np.asarray(acc) / total).astype(np.float32).view(DeviceArray)

    def to_host(self, x, out):
        np.copyto(out, np.asarray(x).reshape(-1))

    def from_host(self, a):
        return np.array(a, copy=True).view(DeviceArray)

    def free_bytes(self):
        return 8 << 30

    def synchronize(self):
        pass


@pytest.fixture
def stand_in_gpu(monkeypatch):
    from test_gpu_plumbing import Device, FakeCuda, FakeLib

    made = []

    def backend(name):
        made.append(StandInCuda(name))
        return made[-1]

    monkeypatch.setattr(device_mod, "TorchCuda", backend)
    monkeypatch.setattr(_gpu, "_cuda", FakeCuda())
    monkeypatch.setattr(_gpu, "library_of", lambda x: FakeLib() if isinstance(x, (DeviceArray, Device)) else None)
    FakeCuda.calls.clear()
    return made, FakeCuda.calls


def _one_round(device, rule, f, ups, **cfg):
    n, d = ups.shape
    server, t = start(d, quorum=n, min_updates=n, rounds=1, linger=3, rule=rule, f=f, device=device,
                      chunk_bytes=16384, **cfg)
    try:
        for i in range(n):  # one after another: the same acceptance order on both servers
            with Client(server.endpoint, f"p{i}", timeout=10) as c:
                c.submit(ups[i], 0)
    finally:
        stop(server, t)
    return server


@pytest.mark.parametrize("rule,f", [("mean", 0), ("median", 1), ("trimmed_mean", 1), ("krum", 1),
                                    ("multi_krum", 1), ("geometric_median", 0)])
def test_gpu_server_matches_the_cpu_server(stand_in_gpu, rule, f):
    made, kernels = stand_in_gpu
    ups = np.random.default_rng(4).standard_normal((7, 30_000)).astype(np.float32)
    ups[3] *= 50  # one outlier for the robust rules to deal with
    gpu = _one_round("cuda", rule, f, ups)
    assert gpu.history[0]["device"] == "cuda:0" and made[0].copies >= 7 * 8  # every chunk went through a slot
    assert made[0].fences > 0 and made[0].contexts >= 8  # each update applied, and the close, on the compute stream
    if rule != "mean":
        assert kernels, "the rule did not run through the CUDA ops"
    cpu = _one_round("cpu", rule, f, ups)
    assert cpu.history[0]["device"] == "cpu"
    if rule in ("mean", "median", "trimmed_mean"):
        np.testing.assert_array_equal(gpu.model, cpu.model)
    else:
        np.testing.assert_allclose(gpu.model, cpu.model, rtol=1e-5, atol=1e-6)
        assert gpu.history[0]["excluded_by_rule"] == cpu.history[0]["excluded_by_rule"]


def test_gpu_server_clips_and_adds_dp_noise_like_the_cpu_server(stand_in_gpu):
    from fedagg.privacy import CentralDP

    ups = np.random.default_rng(5).standard_normal((5, 20_000)).astype(np.float32)
    models = []
    for device in ("cuda", "cpu"):
        dp = CentralDP(noise_multiplier=0.5, clip_norm=50.0, expected_participants=5, seed=3)
        models.append(_one_round(device, "mean", 0, ups, dp=dp).model)
    np.testing.assert_array_equal(models[0], models[1])
    clipped = _one_round("cuda", "mean", 0, ups, clip_norm=10.0).model
    np.testing.assert_allclose(clipped, fold_reference(list(ups), clip=10.0), rtol=1e-6, atol=1e-7)


def test_gpu_server_decodes_compressed_updates_on_the_device(stand_in_gpu):
    from fedagg import compress

    made, kernels = stand_in_gpu
    d = 20_000
    rng = np.random.default_rng(6)
    xs = [rng.standard_normal(d).astype(np.float32) for _ in range(4)]
    ps = [compress.Uniform(8, bucket=64).encode(x, seed=i) for i, x in enumerate(xs)]
    server, t = start(d, quorum=4, rounds=1, linger=3, device="cuda", chunk_bytes=16384)
    try:
        for i, p in enumerate(ps):
            with Client(server.endpoint, f"p{i}", timeout=10) as c:
                c.submit(p, 0)
    finally:
        stop(server, t)
    assert "dequantize_uniform_add" in kernels
    np.testing.assert_allclose(server.model, fold_reference([compress.decode(p) for p in ps]), rtol=1e-6, atol=1e-7)


def test_cuda_device_without_torch_cuda_is_a_clear_error():
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available() and _gpu.compiled():
        pytest.skip("a real CUDA device is present: tests/test_gpu.py runs the server on it")
    with pytest.raises(ValueError, match="cuda"):
        Server(np.zeros(100, np.float32), ServerConfig(bind="tcp://127.0.0.1:0", device="cuda"))
