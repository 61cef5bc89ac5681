"""The load generator: many identities from one process, updates from seeds, results recomputed."""

import threading

import numpy as np
import pytest

pytest.importorskip("zmq")

import fedagg  # noqa: E402
from fedagg.transport import Server, ServerConfig  # noqa: E402
from fedagg.transport.load import Load, seeded_mean, seeded_update  # noqa: E402


def test_seeded_updates_are_reproducible_and_distinct():
    a = seeded_update(7, 3, 1, 1000)
    assert a.dtype == np.float32 and np.array_equal(a, seeded_update(7, 3, 1, 1000))
    assert not np.array_equal(a, seeded_update(7, 4, 1, 1000)) and not np.array_equal(a, seeded_update(7, 3, 2, 1000))
    rows = np.stack([seeded_update(7, i, 1, 1000).astype(np.float64) for i in (2, 5, 9)])
    np.testing.assert_array_equal(seeded_mean(7, [2, 5, 9], 1, 1000), rows.sum(0) / 3)


def test_one_process_drives_many_participants_through_rounds():
    n, d, seed = 40, 20_000, 11
    server = Server(np.zeros(d, np.float32), ServerConfig(bind="tcp://127.0.0.1:0", quorum=n, rounds=2,
                                                          chunk_bytes=16384, deadline=60, linger=5))
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    try:
        report = Load(server.endpoint, n, d, seed=seed, rounds=2, timeout=60).run()
    finally:
        server.stop()
        t.join(20)
    assert {r: sorted(ids) for r, ids in report.rounds.items()} == {r: sorted(f"load-{i}" for i in range(n))
                                                                      for r in (0, 1)}
    assert report.refused == {} and report.bytes_sent == 2 * n * 4 * d
    want = np.zeros(d, np.float32)
    for rec in server.history:  # the server's fold of the mean, in its acceptance order, recomputed from the seeds
        order = [int(pid.split("-")[1]) for pid in rec["accepted"]]
        acc = np.zeros(d)
        for i in order:
            acc += 1.0 * seeded_update(seed, i, rec["round"], d).astype(np.float64)
        agg = (acc / n).astype(np.float32)
        np.testing.assert_allclose(agg, seeded_mean(seed, order, rec["round"], d), rtol=1e-6, atol=1e-7)
        # the engine's mean of the same updates, summed in another order, agrees to a float32 ulp
        engine = fedagg.aggregate(np.stack([seeded_update(seed, i, rec["round"], d) for i in sorted(order)]), "mean")
        np.testing.assert_array_max_ulp(agg, engine, maxulp=1)
        want = want + agg
    np.testing.assert_array_equal(server.model, want)


def test_fedagg_load_from_the_shell():
    import json
    import subprocess
    import sys

    d = 1000
    server = Server(np.zeros(d, np.float32), ServerConfig(bind="tcp://127.0.0.1:0", quorum=5, rounds=1, linger=5))
    t = threading.Thread(target=server.serve, daemon=True)
    t.start()
    try:
        out = subprocess.run([sys.executable, "-m", "fedagg", "load", "--connect", server.endpoint, "--n", "5",
                              "--d", str(d), "--seed", "3", "--prefix", "cli"], capture_output=True, text=True,
                             timeout=60)
    finally:
        server.stop()
        t.join(20)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert sorted(report["rounds"]["0"]) == [f"cli-{i}" for i in range(5)]
    np.testing.assert_allclose(server.model, seeded_mean(3, list(range(5)), 0, d), rtol=1e-6, atol=1e-7)
