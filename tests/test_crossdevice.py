"""Cross-device scale: a buffered `fedagg serve` under 2,000 simulated devices (a bounded soak).

2,000 connections, d = 100k (400 KB updates), 10% of uploads dropped mid-way, 1% of devices
Byzantine (-10 x their update), for about a minute. Checked: the server neither crashes nor
logs an internal error; its memory after warm-up stays flat; every update a device was told is
accepted is in exactly one published version (or in the buffer still open at the end), and the
final model equals a float64 recomputation of FedBuff's rule from what the devices sent (pool
vectors, staleness weights, clipping) in the versions' order.
"""

import json
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

zmq = pytest.importorskip("zmq")

from fedagg.transport import Client  # noqa: E402
from fedagg.transport.devices import Devices, pool_update  # noqa: E402
from helpers import free_port  # noqa: E402

N, D, K, S, CLIP, SEED = 2000, 100_000, 50, 20, 1.0, 11
SOAK_SECONDS = 60.0
WARMUP = 20.0


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_soak_2000_devices_on_a_buffered_server(tmp_path):
    with open(tmp_path / "out.jsonl", "w+") as out, open(tmp_path / "err.log", "w+") as err:
        report, version, model, records, log, samples = soak(out, err)
    check(report, version, model, records, log, samples)


def soak(out, err):
    """Run the server and the devices; what they said."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [sys.executable, "-m", "fedagg", "serve", "--bind", endpoint, "--d", str(D), "--mode", "buffered",
         "--buffer", str(K), "--max-staleness", str(S), "--clip-norm", str(CLIP), "--max-peers", str(N + 100),
         "--upload-timeout", "5", "--no-progress"], stdout=out, stderr=err)
    samples = []  # (seconds since the devices started, server RSS)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 30
        while not out.tell() and time.monotonic() < deadline:
            time.sleep(0.1)
            out.seek(0, 2)
        assert out.tell(), "the server did not start listening"
        t0 = time.monotonic()

        def sample():
            while not stop.wait(1.0):
                samples.append((time.monotonic() - t0, rss_bytes(server.pid)))
        threading.Thread(target=sample, daemon=True).start()
        devices = Devices(endpoint, N, D, seconds=SOAK_SECONDS, seed=SEED, idle=1.0, train=0.5, drop=0.1,
                          byzantine=0.01, processes=2, grace=60)
        report = devices.run()
        stop.set()
        with Client(endpoint, "checker", timeout=30) as c:
            version, model = c.model()
        assert server.poll() is None, "the server died"
        server.send_signal(signal.SIGTERM)
        assert server.wait(60) == 0
    finally:
        stop.set()
        if server.poll() is None:
            server.kill()
            server.wait(10)
    err.seek(0)
    log = err.read()
    assert "internal error" not in log and "Traceback" not in log, log[-3000:]
    out.seek(0)
    records = [json.loads(line)["round_closed"] for line in out if "round_closed" in line]
    return report, version, model, records, log, samples


def check(report, version, model, records, log, samples):

    # every device connected and the load was real: dropped uploads, Byzantine ones, stale ones
    assert report.connected == N
    assert report.dropped > 100 and report.refused.get("internal", 0) == 0
    assert sum(a["byzantine"] for a in report.accepted) > 0
    assert len(records) == version >= 20, (len(records), version)

    # accounting: what devices were told is accepted == what the versions hold (+ the open buffer)
    told = {(a["id"], a["version"]): a for a in report.accepted}
    assert len(told) == len(report.accepted)
    published = set()
    for rec in records:
        assert len(rec["accepted"]) == K and len(set(rec["accepted"])) == K
        published |= {(pid, rec["round"]) for pid in rec["accepted"]}
    assert published <= set(told)
    still_open = set(told) - published
    assert all(v == version for _, v in still_open) and len(still_open) < K

    # the final model, recomputed: x <- float32(x + float32(mean(clip(w(s_i) * u_i))))
    pool = [pool_update(SEED, k, D).astype(np.float64) for k in range(64)]
    x = np.zeros(D, np.float32)
    for rec in records:
        rows = []
        for pid, base, s, scale in zip(rec["accepted"], rec["bases"], rec["staleness"], rec["scales"]):
            a = told[(pid, rec["round"])]
            assert (a["round"], a["staleness"]) == (base, s) and s == rec["round"] - base and 0 <= s <= S
            assert scale == pytest.approx(1 / np.sqrt(1 + s), rel=1e-15)
            u = pool[a["pool"]] * (-10.0 if a["byzantine"] else 1.0)
            rows.append(scale * u)
        R = np.stack(rows)
        norms = np.sqrt((R * R).sum(axis=1))
        R *= np.minimum(1.0, CLIP / norms)[:, None]
        x = (x + R.mean(axis=0).astype(np.float32)).astype(np.float32)
    np.testing.assert_allclose(model, x, rtol=1e-5, atol=1e-7)

    # memory flat after warm-up: no growth with versions, sessions or refusals
    late = [r for t, r in samples if t >= WARMUP]
    assert len(late) >= 20
    growth = max(late) - late[0]
    assert growth < 64 << 20, f"server RSS grew by {growth / 2**20:.0f} MiB after warm-up: {late}"
