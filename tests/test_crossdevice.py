"""Cross-device scale: a buffered `fedagg serve` under thousands of simulated devices (bounded soaks).

d = 100k (400 KB updates), 10% of uploads dropped mid-way, 1% of devices Byzantine (-10 x their
update). Checked in each: the server neither crashes nor logs an internal error; every update a
device was told is accepted is in exactly one published version (or in the buffer still open at
the end), and the final model equals a float64 recomputation of FedBuff's rule from what the
devices sent (pool vectors, staleness weights, clipping) in the versions' order.

Memory: libzmq gives each connection's queues 16 KiB chunks of 256 messages, a new one as the
messages pass (two pipes, a spare kept): a connection's memory settles after a few hundred
messages. 2,000 devices at the rate this machine serves take minutes to get there (measured:
RSS rises to a plateau after 2-3 minutes), so the 2,000-device soak checks that growth after its
warm-up stays within that per-connection bound, and a 400-device soak, whose connections settle
in under a minute, checks that RSS is then flat: any leak per message, update or version shows.
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

from fedagg.transport import Client  # noqa: E402
from fedagg.transport.devices import Devices, pool_update  # noqa: E402
from helpers import free_port  # noqa: E402

# K small enough that the server's 1,000 kept round records fill up during the warm-up, and 64
# uploads in flight at most: after it, every bounded structure is at its bound
D, K, S, CLIP, SEED = 100_000, 10, 20, 1.0, 11
PIPE_CHUNKS = 4 * 16 << 10  # libzmq's queue memory per settled connection: 2 pipes x 2 chunks of 16 KiB


def rss_bytes(pid):
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_soak_2000_devices_on_a_buffered_server(tmp_path):
    n, warmup = 2000, 40.0
    with open(tmp_path / "out.jsonl", "w+") as out, open(tmp_path / "err.log", "w+") as err:
        # about 650 sessions a second offered, each device one every ~3 s
        got = soak(out, err, n, seconds=75.0, idle=2.5)
    late = check(n, *got, warmup=warmup)
    growth = max(late) - np.median(late[:8])
    assert growth < n * PIPE_CHUNKS + (32 << 20), f"server RSS grew by {growth / 2**20:.0f} MiB: {late}"


def test_server_memory_is_flat_once_its_connections_settle(tmp_path):
    n, warmup = 400, 55.0
    with open(tmp_path / "out.jsonl", "w+") as out, open(tmp_path / "err.log", "w+") as err:
        # each device a session every ~0.7 s: its connection settles in well under the warm-up
        got = soak(out, err, n, seconds=95.0, idle=0.2)
    late = check(n, *got, warmup=warmup)
    first, last = np.median(late[:8]), np.median(late[-8:])  # medians: a passing backlog is not a leak
    assert last - first < 12 << 20, f"server RSS grew by {(last - first) / 2**20:.0f} MiB after warm-up: {late}"


def soak(out, err, n, seconds, idle):
    """Run the server and n devices; what they said."""
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    server = subprocess.Popen(
        [sys.executable, "-m", "fedagg", "serve", "--bind", endpoint, "--d", str(D), "--mode", "buffered",
         "--buffer", str(K), "--max-staleness", str(S), "--clip-norm", str(CLIP), "--max-peers", str(n + 100),
         "--upload-timeout", "5", "--max-inflight", "64", "--no-progress"], stdout=out, stderr=err,
        # glibc's defaults back (the server keeps 64 MiB of freed heap per arena otherwise, filling
        # it over minutes): RSS then follows what the server holds, and a leak shows as growth
        env={**os.environ, "MALLOC_TRIM_THRESHOLD_": "131072", "MALLOC_MMAP_THRESHOLD_": "131072"})
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
        devices = Devices(endpoint, n, D, seconds=seconds, seed=SEED, idle=idle, train=0.5, drop=0.1,
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
    return report, version, model, records, samples


def check(n, report, version, model, records, samples, warmup):
    """What every soak checks; returns the server's RSS samples after the warm-up."""
    # every device connected and the load was real: dropped uploads, Byzantine ones
    assert report.connected == n
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

    # the server's memory after the warm-up, its record history full by then
    late = [r for t, r in samples if t >= warmup]
    assert len(late) >= 20 and len(records) > 1000
    print(f"server RSS after warm-up: {late[0] / 2**20:.0f} MiB, at the end {late[-1] / 2**20:.0f} MiB; "
          f"{len(report.accepted)} accepted in {len(records)} versions")
    return late
