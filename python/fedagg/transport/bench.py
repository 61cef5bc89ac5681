"""Transport section of ``fedagg bench``, on loopback, in one run:

* one update of ``mb`` megabytes sent by a participant process to the server
  (plain and CURVE), against a raw TCP socket moving the same bytes between
  the same two processes (sendall / recv_into): the ceiling;
* an end-to-end round of ``n`` participant processes x ``d`` float32 parameters,
  against (n updates' transfer time at the raw TCP rate + the aggregation time).

>>> from fedagg.transport import bench
>>> r = bench.run(mb=4, n=2, d=100_000, curve=False)
>>> sorted({row["case"] for row in r["rows"]})
['one update', 'round']
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import threading
import time
from typing import Any, Dict, List

import numpy as np

_FORK = mp.get_context("fork")


def _tcp_sender(port: int, nbytes: int, go) -> None:
    data = np.ones(nbytes, dtype=np.uint8)
    go.wait()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(memoryview(data))


def raw_tcp_seconds(nbytes: int) -> float:
    """Seconds to move nbytes over loopback TCP from a child process into a preallocated buffer."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    go = _FORK.Event()
    p = _FORK.Process(target=_tcp_sender, args=(srv.getsockname()[1], nbytes, go))
    p.start()
    buf = bytearray(nbytes)
    view = memoryview(buf)
    go.set()
    conn, _ = srv.accept()
    t0 = time.perf_counter()
    got = 0
    while got < nbytes:
        n = conn.recv_into(view[got:], min(nbytes - got, 1 << 22))
        if n == 0:
            raise RuntimeError("raw TCP sender closed early")
        got += n
    dt = time.perf_counter() - t0
    conn.close()
    srv.close()
    p.join(30)
    return dt


def _participant(endpoint: str, pid: str, d: int, keys, ready, go, out) -> None:
    from .client import Client

    x = np.full(d, 0.5, dtype=np.float32)
    kw = keys or {}
    with Client(endpoint, None if kw else pid, timeout=120, **kw) as c:
        rnd = c.status()["round"]
        ready.put(pid)
        go.wait()
        t0 = time.perf_counter()
        c.submit(x, rnd)
        out.put((pid, time.perf_counter() - t0))


def _round(n: int, d: int, rule: str, curve: bool) -> Dict[str, Any]:
    """One round with n participant processes released together; timings of the round."""
    from .server import Server, ServerConfig

    cfg = ServerConfig(bind="tcp://127.0.0.1:0", quorum=n, rounds=1, rule=rule, deadline=600.0,
                       rate=1e6)
    keys: List[Any] = [None] * n
    if curve:
        import zmq

        spub, ssec = zmq.curve_keypair()
        pairs = [zmq.curve_keypair() for _ in range(n)]
        cfg.curve_public_key, cfg.curve_secret_key = spub, ssec
        cfg.allowed_keys = [p for p, _ in pairs]
        keys = [{"server_key": spub, "public_key": p, "secret_key": s} for p, s in pairs]
    closed: Dict[str, float] = {}
    server = Server(np.zeros(d, np.float32), cfg, on_round=lambda rec: closed.setdefault("t", time.perf_counter()))
    th = threading.Thread(target=server.serve, daemon=True)
    th.start()
    ready, out, go = _FORK.Queue(), _FORK.Queue(), _FORK.Event()
    procs = [_FORK.Process(target=_participant, args=(server.endpoint, f"p{i}", d, keys[i], ready, go, out))
             for i in range(n)]
    for p in procs:
        p.start()
    for _ in range(n):
        ready.get(timeout=120)
    t0 = time.perf_counter()
    go.set()
    submit = [out.get(timeout=600)[1] for _ in range(n)]
    th.join(600)
    for p in procs:
        p.join(60)
    rec = server.history[0]
    return {"round_seconds": closed["t"] - t0, "submit_seconds": max(submit),
            "aggregate_seconds": rec["aggregate_seconds"], "accepted": len(rec["accepted"])}


def run(mb: float = 400.0, n: int = 16, d: int = 25_000_000, rule: str = "mean", curve: bool = True,
        repeat: int = 1) -> Dict[str, Any]:
    rows: List[Dict[str, Any]] = []
    nbytes = int(mb * 1e6) // 4 * 4
    tcp = min(raw_tcp_seconds(nbytes) for _ in range(repeat))
    rows.append({"case": "one update", "impl": "raw TCP socket", "seconds": tcp, "gbps": nbytes / tcp / 1e9,
                 "agrees": None, "note": "sendall -> recv_into, same processes layout"})
    for mode in (["plain", "curve"] if curve else ["plain"]):
        best = min(_round(1, nbytes // 4, "mean", mode == "curve")["submit_seconds"] for _ in range(repeat))
        rows.append({"case": "one update", "impl": f"fedagg {mode}", "seconds": best, "gbps": nbytes / best / 1e9,
                     "agrees": None, "note": f"{100 * tcp / best:.0f}% of raw TCP"})
    r = _round(n, d, rule, False)
    total = n * d * 4
    expect = total / (nbytes / tcp) + r["aggregate_seconds"]
    rows.append({"case": "round", "impl": f"fedagg plain, {n} x {d:,}", "seconds": r["round_seconds"],
                 "gbps": total / r["round_seconds"] / 1e9, "agrees": r["accepted"] == n,
                 "note": f"{r['round_seconds'] / expect:.2f}x of transfer at raw TCP rate + aggregation "
                         f"({expect:.2f} s; {rule} took {r['aggregate_seconds']:.2f} s)"})
    return {"mb": mb, "n": n, "d": d, "rule": rule, "rows": rows}


def lines(res: Dict[str, Any]) -> List[str]:
    from .._benchutil import table

    return table(f"transport: loopback, one update of {res['mb']:g} MB; a round of {res['n']} x {res['d']:,} "
                 f"float32 ({res['rule']})", res["rows"])
