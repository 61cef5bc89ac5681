"""The crossdevice section of ``fedagg bench``: many simulated devices against one `fedagg serve`.

Each case starts a server process (buffered or synchronous) and ``n`` simulated devices
(transport/devices.py) in ``processes`` processes on the same machine, waits for the devices'
arrival ramp, then measures for ``seconds``: accepted updates per second, COMMIT-to-ACCEPTED
latency (p50, p99), the server's CPU per accepted update (all its threads, from /proc), model
versions published, and refusals. The cases:

- buffered, at each of ``rates`` offered sessions per second (each device's idle time set so that
  n devices offer about that; the first is beyond what one server core takes here: it measures
  what the server sustains, the second its latency with headroom);
- synchronous rounds of the same quorum under the last offered load: a device computing on a
  round that closed meanwhile is refused ``late`` (its work lost); versions per second compare.

The devices share the machine's cores with the server: on 2 cores the load generator takes
about a core of its own, and the numbers say what one server core sustains.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Dict, List

import numpy as np


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of every thread of process `pid`."""
    with open(f"/proc/{pid}/stat") as fh:
        f = fh.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _case(name: str, mode: str, n: int, d: int, seconds: float, idle: float, buffer: int, staleness: int,
          processes: int, io_threads: int, fetch_model: bool, seed: int) -> Dict[str, Any]:
    from .devices import Devices

    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    args = [sys.executable, "-m", "fedagg", "serve", "--bind", endpoint, "--d", str(d), "--max-peers", str(n + 100),
            "--upload-timeout", "2", "--max-inflight", "1024", "--io-threads", str(io_threads), "--clip-norm", "1.0",
            "--no-progress"]
    if mode == "buffered":
        args += ["--mode", "buffered", "--buffer", str(buffer), "--max-staleness", str(staleness)]
    else:
        args += ["--quorum", str(buffer), "--min-updates", "1", "--deadline", "10"]
    arrivals = 1000.0
    ramp = n / arrivals + 2.0  # every device connected and in its sessions
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        server = subprocess.Popen(args, stdout=out, stderr=err)
        try:
            t_listen = time.monotonic() + 30
            while time.monotonic() < t_listen and out.tell() == 0:
                time.sleep(0.05)
                out.seek(0, 2)
            if out.tell() == 0:
                raise RuntimeError(f"fedagg serve did not start ({mode})")
            serving = time.monotonic()  # the records' durations count from about here
            marks: Dict[str, float] = {}

            def mark():  # the server's CPU when the window opens and closes
                time.sleep(ramp)
                marks["cpu0"], marks["t0"] = _cpu_seconds(server.pid), time.monotonic()
                time.sleep(seconds)
                marks["cpu1"], marks["t1"] = _cpu_seconds(server.pid), time.monotonic()
            timer = threading.Thread(target=mark, daemon=True)
            started = time.monotonic()
            timer.start()
            report = Devices(endpoint, n, d, seconds=ramp + seconds, seed=seed, idle=idle, train=0.5, drop=0.1,
                             byzantine=0.01, processes=processes, fetch_model=fetch_model, arrivals=arrivals,
                             grace=30).run()
            timer.join(60)
            rss = _rss(server.pid)
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(10)
        out.seek(0)
        records = [json.loads(line)["round_closed"] for line in out if "round_closed" in line]
    lo, hi = marks["t0"] - started, marks["t1"] - started
    window = [a for a in report.accepted if lo <= a["t"] < hi]
    # the server's own COMMIT-to-ACCEPTED times, per version closed in the window (the devices' include
    # their own event loop's lag on a shared machine): the median version's p50 and p99
    ends = np.cumsum([r["seconds"] for r in records]) + (serving - started)
    served = [r["accepted_latency_ms"] for r, end in zip(records, ends) if lo <= end < hi and r["accepted_latency_ms"]]
    lat = np.array([a["latency"] for a in window]) * 1e3
    versions = [r for r in records if r.get("model_updated")]
    rate = len(window) / (hi - lo)
    return {"case": name, "mode": mode, "n": n, "d": d, "connected": report.connected,
            "accepted_per_s": rate, "mb_per_s": rate * 4 * d / 1e6,
            "p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
            "p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
            "server_p50_ms": float(np.median([x["p50"] for x in served])) if served else None,
            "server_p99_ms": float(np.median([x["p99"] for x in served])) if served else None,
            "server_cpu_ms_per_update": 1e3 * (marks["cpu1"] - marks["cpu0"]) / max(1, len(window)),
            "server_cores": (marks["cpu1"] - marks["cpu0"]) / (hi - lo),
            "versions": len(versions), "versions_per_s": len(versions) / (ramp + seconds),
            "refused": dict(report.refused), "dropped": report.dropped, "server_rss_mb": rss / 2**20,
            "window_s": hi - lo, "idle_s": idle}


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def run(n: int = 10_000, d: int = 100_000, seconds: float = 30.0, rates=(2500.0, 1600.0, 1000.0), buffer: int = 100,
        staleness: int = 20, processes: int = 2, io_threads: int = 2, fetch_model: bool = False,
        seed: int = 0) -> Dict[str, Any]:
    """The three cases of the module doc; rows as dicts."""
    import platform

    if not sys.platform.startswith("linux"):
        raise RuntimeError("the crossdevice section reads the server's CPU from /proc (Linux)")
    kw = dict(n=n, d=d, seconds=seconds, buffer=buffer, staleness=staleness, processes=processes,
              io_threads=io_threads, fetch_model=fetch_model, seed=seed)
    def idle(rate):  # n devices, each idle + 0.5 s training per session: about `rate` sessions a second
        return max(0.05, n / rate - 0.5)
    rows = [_case(f"buffered, {rate:,.0f}/s offered", "buffered", idle=idle(rate), **kw) for rate in rates]
    rows.append(_case(f"sync, {rates[-1]:,.0f}/s offered", "sync", idle=idle(rates[-1]), **kw))
    return {"rows": rows, "cores": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "n": n, "d": d, "buffer": buffer, "staleness": staleness, "seconds": seconds, "processes": processes,
            "fetch_model": fetch_model}


def lines(res: Dict[str, Any]) -> List[str]:
    out = [f"crossdevice: {res['n']:,} simulated devices ({res['processes']} processes) against fedagg serve, "
           f"d = {res['d']:,} float32, K = {res['buffer']}, S = {res['staleness']}, {res['cores']} cores shared; "
           f"{res['seconds']:g} s measured after the arrival ramp"
           + ("" if res["fetch_model"] else "; devices skip the model download"),
           "p50/p99: from a device's COMMIT to its ACCEPTED, as devices see it and at the server (the median "
           "version's)",
           f"{'case':28s} {'connected':>9s} {'accepted/s':>10s} {'MB/s':>7s} {'p50':>8s} {'p99':>8s} "
           f"{'srv p50':>8s} {'srv p99':>8s} {'server ms/upd':>13s} {'versions/s':>10s}  refused"]
    for r in res["rows"]:
        fmt = lambda v: "-" if v is None else f"{v:6.1f}ms"  # noqa: E731
        out.append(f"{r['case']:28s} {r['connected']:9,d} {r['accepted_per_s']:10.0f} {r['mb_per_s']:7.0f} "
                   f"{fmt(r['p50_ms']):>8s} {fmt(r['p99_ms']):>8s} {fmt(r['server_p50_ms']):>8s} "
                   f"{fmt(r['server_p99_ms']):>8s} {r['server_cpu_ms_per_update']:13.3f} "
                   f"{r['versions_per_s']:10.2f}  {json.dumps(r['refused'], sort_keys=True)}")
    return out
