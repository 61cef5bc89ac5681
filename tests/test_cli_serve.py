"""`fedagg serve` from the shell: bind errors, the --insecure warning, SIGTERM, --linger after --rounds."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("zmq")

import fedagg  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def fedagg_proc(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fedagg", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "COLUMNS": "160"})


def listening(p: subprocess.Popen) -> str:
    """The endpoint of the server's first stdout line ({"listening": ...})."""
    line = p.stdout.readline()
    assert line, p.stderr.read()
    return json.loads(line)["listening"]


def finish(p: subprocess.Popen, timeout: float = 30):
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    return p.returncode, out, err


def test_bind_to_a_port_in_use_is_one_error_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        endpoint = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        rc, out, err = finish(fedagg_proc("serve", "--d", 8, "--bind", endpoint))
    assert rc == 2 and out == ""
    assert err.startswith(f"fedagg serve: error: cannot bind {endpoint}"), err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_malformed_endpoint_is_one_error_line():
    rc, out, err = finish(fedagg_proc("serve", "--d", 8, "--bind", "tcp://127.0.0.1:port"))
    assert rc == 2 and "tcp://127.0.0.1:port" in err and len(err.strip().splitlines()) == 1, err


def test_insecure_on_a_public_endpoint_warns_once():
    # TEST-NET-1 is on no interface here: the bind fails locally (nothing listens beyond loopback,
    # no packet is sent), after the warning
    rc, out, err = finish(fedagg_proc("serve", "--d", 8, "--bind", "tcp://192.0.2.1:5555", "--insecure", "--rounds",
                                      1, "--deadline", 0.2, "--linger", 0))
    assert rc == 2, err
    first = err.splitlines()[0]
    assert first.startswith("fedagg serve: warning: --insecure on tcp://192.0.2.1:5555"), err
    assert "anyone who can reach this port can submit updates under any participant id" in first
    assert err.count("anyone who can reach") == 1, err  # not once more from the server's log
    assert "cannot bind tcp://192.0.2.1:5555" in err
    # loopback needs no warning
    rc, out, err = finish(fedagg_proc("serve", "--d", 8, "--bind", "tcp://127.0.0.1:0", "--insecure", "--rounds", 1,
                                      "--deadline", 0.2, "--linger", 0))
    assert rc == 0 and "warning" not in err, err


def test_sigterm_stops_the_server_cleanly():
    p = fedagg_proc("serve", "--d", 8, "--bind", "tcp://127.0.0.1:0")
    listening(p)
    p.send_signal(signal.SIGTERM)
    rc, out, err = finish(p)
    assert rc == 0 and "Traceback" not in err, (rc, err)


def test_the_final_model_is_served_after_the_last_round():
    """--rounds 1: the round closes, and the final model stays available (default --linger 30) until SIGTERM."""
    p = fedagg_proc("serve", "--d", 1000, "--bind", "tcp://127.0.0.1:0", "--rounds", 1, "--quorum", 1)
    try:
        endpoint = listening(p)
        joined = subprocess.run([sys.executable, "-m", "fedagg", "join", "--connect", endpoint, "--id", "alice"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert joined.returncode == 0, joined.stderr
        closed = json.loads(p.stdout.readline())["round_closed"]
        assert closed["round"] == 0 and closed["accepted"] == ["alice"]
        time.sleep(1.0)  # the server has moved past its last round
        assert p.poll() is None, "the server exited right after its last round"
        with fedagg.Client(endpoint, "late-reader", timeout=10) as c:
            rnd, model = c.model()
        assert rnd == 1 and model.shape == (1000,) and np.abs(model).sum() > 0  # the updated model
        p.send_signal(signal.SIGTERM)
        rc, _, err = finish(p)
        assert rc == 0, err
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_linger_zero_exits_after_the_last_round():
    rc, out, err = finish(fedagg_proc("serve", "--d", 8, "--bind", "tcp://127.0.0.1:0", "--rounds", 1,
                                      "--deadline", 0.2, "--linger", 0), timeout=20)
    assert rc == 0, err
    assert [json.loads(line).get("round_closed", {}).get("round") for line in out.splitlines()][1:] == [0]


def test_linger_reaches_the_server_config(monkeypatch):
    from fedagg import cli
    from fedagg.transport import server

    seen = []

    class Stop(Exception):
        pass

    def fake_server(model, cfg, **kw):
        seen.append(cfg.linger)
        limits.append((cfg.max_peers, cfg.receive_memory, cfg.upload_timeout))
        raise Stop

    limits = []

    monkeypatch.setattr(server, "Server", fake_server)
    for argv, linger in ((["--rounds", "2"], 30.0), (["--rounds", "2", "--linger", "0"], 0.0),
                         (["--rounds", "2", "--linger", "inf"], float("inf")), ([], 0.0), (["--linger", "5"], 5.0)):
        with pytest.raises(Stop):
            cli.main(["serve", "--d", "4", "--bind", "tcp://127.0.0.1:0", *argv])
        assert seen[-1] == linger, argv
    with pytest.raises(SystemExit):
        cli.main(["serve", "--d", "4", "--linger", "-1"])
    assert limits[-1] == (4096, None, 30.0)  # the defaults
    with pytest.raises(Stop):
        cli.main(["serve", "--d", "4", "--bind", "tcp://127.0.0.1:0", "--max-peers", "50", "--receive-memory-gb",
                  "1.5", "--upload-timeout", "5"])
    assert limits[-1] == (50, 1_500_000_000, 5.0)


def test_secure_rounds_from_the_shell():
    """fedagg serve --secure with three fedagg join processes: the round closes by its secure phases,
    and the model moved by the participants' mean (fedagg join's honest update)."""
    pytest.importorskip("cryptography")
    p = fedagg_proc("serve", "--d", 1000, "--bind", "tcp://127.0.0.1:0", "--rounds", 1, "--quorum", 3,
                    "--min-updates", 3, "--linger", 0, "--secure", "--bucket-size", 3, "--secure-clip", 100,
                    "--phase-seconds", 10)
    joins = []
    try:
        endpoint = listening(p)
        joins = [subprocess.Popen([sys.executable, "-m", "fedagg", "join", "--connect", endpoint, "--id", f"p{i}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
                 for i in range(3)]
        for j in joins:
            out, err = j.communicate(timeout=60)
            assert j.returncode == 0, err
        closed = json.loads(p.stdout.readline())["round_closed"]
        assert closed["closed_by"] == "secure" and sorted(closed["accepted"]) == ["p0", "p1", "p2"]
        assert [len(b["members"]) for b in closed["buckets"]] == [3] and closed["model_updated"]
        rc, _, err = finish(p)
        assert rc == 0, err
    finally:
        for proc in [p, *joins]:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_secure_options_reach_the_server_config():
    from fedagg import cli
    from fedagg.transport.cli import _config

    args = cli._parser().parse_args(
        ["serve", "--d", "8", "--secure", "--bucket-size", "5", "--secure-clip", "2.5", "--secure-sigma", "0.1",
         "--secure-k", "4", "--max-dropout", "0.3", "--phase-seconds", "7", "--min-updates", "5", "--quorum", "5"])
    cfg = _config(args)
    s = cfg.secure
    assert (s.bucket_size, s.clip, s.sigma, s.k, s.max_dropout, s.phase_seconds) == (5, 2.5, 0.1, 4, 0.3, 7.0)
    cfg.check()
    assert _config(cli._parser().parse_args(["serve", "--d", "8"])).secure is None


def test_buffered_server_and_simulated_devices_from_the_shell():
    """The README's two commands, small: fedagg serve --mode buffered and fedagg devices. Every
    update the devices were told is accepted is in a published version or the open buffer."""
    p = fedagg_proc("serve", "--d", 1000, "--bind", "tcp://127.0.0.1:0", "--mode", "buffered", "--buffer", 10,
                    "--max-staleness", 5, "--clip-norm", 1, "--no-progress")
    try:
        endpoint = listening(p)
        args = ["--connect", endpoint, "--n", 40, "--d", 1000, "--seconds", 4, "--idle", 0.2, "--train", 0.1,
                "--details"]
        dv = subprocess.run([sys.executable, "-m", "fedagg", "devices", *map(str, args)], capture_output=True,
                            text=True, cwd=ROOT, timeout=120)
        assert dv.returncode == 0, dv.stderr
        report = json.loads(dv.stdout)
        assert report["connected"] == 40 and report["accepted"] > 20 and report["p99_ms"] is not None
        p.send_signal(signal.SIGTERM)
        rc, out, err = finish(p)
        assert rc == 0, err
        records = [json.loads(line)["round_closed"] for line in out.splitlines() if "round_closed" in line]
        published = {(pid, r["round"]) for r in records for pid in r["accepted"]}
        told = {(u["id"], u["version"]) for u in report["updates"]}
        assert records and published <= told and len(told - published) < 10
        assert all(len(r["accepted"]) == 10 for r in records)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()


def test_buffered_options_reach_the_server_config():
    from fedagg import cli
    from fedagg.transport.cli import _config

    cfg = _config(cli._parser().parse_args(["serve", "--d", "8", "--mode", "buffered", "--buffer", "7",
                                            "--max-staleness", "3", "--staleness", "poly:0.5"]))
    assert (cfg.mode, cfg.quorum, cfg.max_staleness, cfg.staleness) == ("buffered", 7, 3, "poly:0.5")
    cfg.check()
    with pytest.raises(ValueError, match="--buffer is the buffer size of --mode buffered"):
        _config(cli._parser().parse_args(["serve", "--d", "8", "--buffer", "7"]))
    p = fedagg_proc("serve", "--d", 8, "--bind", "tcp://127.0.0.1:0", "--mode", "buffered", "--staleness", "bogus")
    rc, out, err = finish(p)
    assert rc != 0 and "unknown staleness weight 'bogus'" in err and err.count("\n") <= 2
