"""Transport section of ``fedagg bench``, on loopback, in one run:

* one update of ``mb`` megabytes sent by a participant process to the server
  (plain and CURVE), against a raw TCP socket moving the same bytes between
  the same two processes (sendall / recv_into): the ceiling;
* an end-to-end round of ``n`` participant processes x ``d`` float32 parameters,
  against (n updates' transfer time at the raw TCP rate + the aggregation time),
  and the same traffic over raw sockets (n sender processes, one receiver).

>>> from fedagg.transport import bench
>>> r = bench.run(mb=4, n=2, d=100_000, curve=False)
>>> sorted({row["case"] for row in r["rows"]})
['one update', 'round']
"""

from __future__ import annotations

import multiprocessing as mp
import socket
import statistics
import threading
import time
from typing import Any, Dict, List, Optional

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


def raw_tcp_many_seconds(n: int, nbytes: int) -> float:
    """Seconds for n child processes to each move nbytes over loopback TCP into one receiving
    thread (selectors, recv_into preallocated buffers): the round's traffic without fedagg."""
    import selectors

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(max(n, 16))
    go = _FORK.Event()
    procs = [_FORK.Process(target=_tcp_sender, args=(srv.getsockname()[1], nbytes, go)) for _ in range(n)]
    for p in procs:
        p.start()
    bufs = [memoryview(bytearray(nbytes)) for _ in range(n)]
    sel = selectors.DefaultSelector()
    go.set()
    t0 = time.perf_counter()
    got = [0] * n
    srv.settimeout(60)  # a sender that never connects fails the run instead of hanging it
    for i in range(n):
        conn, _ = srv.accept()
        conn.setblocking(False)
        sel.register(conn, selectors.EVENT_READ, i)
    left = n
    try:
        while left:
            ready = sel.select(timeout=60)
            if not ready:
                raise RuntimeError("raw TCP senders stalled for 60 s")
            for key, _ in ready:
                i = key.data
                try:
                    k = key.fileobj.recv_into(bufs[i][got[i]:], min(nbytes - got[i], 1 << 22))
                except BlockingIOError:
                    continue
                got[i] += k
                if k == 0 or got[i] == nbytes:
                    if got[i] != nbytes:
                        raise RuntimeError("raw TCP sender closed early")
                    sel.unregister(key.fileobj)
                    key.fileobj.close()
                    left -= 1
        return time.perf_counter() - t0
    finally:
        sel.close()
        srv.close()
        for p in procs:
            p.join(30)


def run(mb: float = 400.0, n: int = 16, d: int = 25_000_000, rule: str = "mean", curve: bool = True,
        repeat: int = 1) -> Dict[str, Any]:
    """Raw TCP and fedagg alternate `repeat` times (a loaded machine drifts: each fedagg run is
    compared with the raw run next to it as well as best with best)."""
    from .. import _core

    rows: List[Dict[str, Any]] = []
    nbytes = int(mb * 1e6) // 4 * 4
    tcp, plain, crv = [], [], []
    for _ in range(repeat):
        tcp.append(raw_tcp_seconds(nbytes))
        plain.append(_round(1, nbytes // 4, "mean", False)["submit_seconds"])
        if curve:
            crv.append(_round(1, nbytes // 4, "mean", True)["submit_seconds"])
    best = min(tcp)
    rows.append({"case": "one update", "impl": "raw TCP socket", "seconds": best, "gbps": nbytes / best / 1e9,
                 "agrees": None, "note": "sendall -> recv_into, same processes layout"})
    pairs = statistics.median([t / f for t, f in zip(tcp, plain)])
    rows.append({"case": "one update", "impl": "fedagg plain", "seconds": min(plain),
                 "gbps": nbytes / min(plain) / 1e9, "agrees": None,
                 "note": f"{100 * best / min(plain):.0f}% of raw TCP (best of {repeat} each; median of "
                         f"adjacent pairs {100 * pairs:.0f}%); CRC32C {_core.crc32c_best()}"})
    if curve:
        rows.append({"case": "one update", "impl": "fedagg curve", "seconds": min(crv), "gbps": nbytes / min(crv) / 1e9,
                     "agrees": None, "note": f"{100 * best / min(crv):.0f}% of raw TCP: the cost of CURVE"})
    total = n * d * 4
    transfer = total * best / nbytes  # the round's bytes at the single-stream raw rate
    rounds, many = [], []
    for _ in range(repeat):
        many.append(raw_tcp_many_seconds(n, d * 4))
        rounds.append(_round(n, d, rule, False))
    ratios = [r["round_seconds"] / (transfer + r["aggregate_seconds"]) for r in rounds]
    k = int(np.argmin(ratios))
    r = rounds[k]
    expect = transfer + r["aggregate_seconds"]
    rows.append({"case": "round", "impl": f"raw TCP, {n} senders", "seconds": min(many),
                 "gbps": total / min(many) / 1e9, "agrees": None,
                 "note": f"{n} processes x {d * 4 / 1e6:g} MB -> one receiver; {min(many) / transfer:.2f}x "
                         "of the single-stream rate"})
    rows.append({"case": "round", "impl": f"fedagg plain, {n} x {d:,}", "seconds": r["round_seconds"],
                 "gbps": total / r["round_seconds"] / 1e9, "agrees": all(x["accepted"] == n for x in rounds),
                 "note": f"{ratios[k]:.2f}x of transfer at raw TCP rate + aggregation ({expect:.2f} s; {rule} took "
                         f"{r['aggregate_seconds']:.2f} s); best of {repeat}, median {statistics.median(ratios):.2f}x"})
    return {"mb": mb, "n": n, "d": d, "rule": rule, "repeat": repeat, "rows": rows,
            "raw": {"tcp": tcp, "plain": plain, "curve": crv, "many": many,
                    "rounds": [{**x, "ratio": q} for x, q in zip(rounds, ratios)]}}


def lines(res: Dict[str, Any]) -> List[str]:
    from .._benchutil import table

    return table(f"transport: loopback, one update of {res['mb']:g} MB; a round of {res['n']} x {res['d']:,} "
                 f"float32 ({res['rule']})", res["rows"])


# ---------------------------------------------------------------- the server section
def _server_round(n: int, d: int, rule: str, device: str, state_dir: Optional[str], seed: int,
                  timeout: float = 600.0) -> Dict[str, Any]:
    """Two rounds of n seeded updates from a `fedagg load` process into an in-process Server; the
    second is measured (a server's steady state: its buffers faulted in by the round before)."""
    import subprocess
    import sys
    import threading

    from .server import Server, ServerConfig

    f = 0 if rule == "mean" else max(0, (n - 3) // 4)  # what every rule takes at n (3 at n = 16)
    srv = Server(np.zeros(d, np.float32), ServerConfig(
        bind="tcp://127.0.0.1:0", rule=rule, f=f, quorum=n, min_updates=n, rounds=2, linger=2.0, deadline=timeout,
        device=device, state_dir=state_dir, max_inflight=max(n, 1)))
    t = threading.Thread(target=srv.serve, daemon=True)
    t.start()
    load = subprocess.run([sys.executable, "-m", "fedagg", "load", "--connect", srv.endpoint, "--n", str(n),
                           "--d", str(d), "--seed", str(seed), "--rounds", "2", "--pregenerate",
                           "--timeout", str(timeout)],
                          capture_output=True, text=True, timeout=timeout + 60)
    t.join(timeout)
    if load.returncode != 0 or len(srv.history) < 2:
        srv.stop()
        t.join(10)
        raise RuntimeError(f"server benchmark round ({rule} on {device}) failed: {load.stderr[-500:]}")
    rec = srv.history[1]
    return {"rule": rule, "device": device, "state_dir": state_dir is not None, "accepted": len(rec["accepted"]),
            "receive_seconds": rec["receive_seconds"], "close_seconds": rec["last_byte_to_model_seconds"],
            "aggregate_seconds": rec["aggregate_seconds"], "model": srv.model, "order": rec["accepted"]}


def run_server(n: int = 16, d: int = 25_000_000, rules=("mean", "median", "trimmed_mean", "krum"),
               seed: int = 0) -> Dict[str, Any]:
    """`fedagg bench --sections server`: receive time, last byte -> new model, state_dir overhead."""
    import tempfile

    from .. import _gpu
    from .load import seeded_mean

    devices = ["cpu"]
    try:
        import torch

        if torch.cuda.is_available() and _gpu.compiled():
            devices.append("cuda")
    except ImportError:
        pass
    total = n * d * 4
    rows: List[Dict[str, Any]] = []
    raw: List[Dict[str, Any]] = []
    cpu_models: Dict[str, np.ndarray] = {}
    want = None
    for device in devices:
        for rule in rules:
            r = _server_round(n, d, rule, device, None, seed)
            agrees, note = None, ""
            if rule == "mean":
                if want is None:  # the model after two rounds: the sum of the two rounds' means
                    want = (seeded_mean(seed, list(range(n)), 0, d).astype(np.float32)
                            + seeded_mean(seed, list(range(n)), 1, d).astype(np.float32))
                agrees = bool(np.allclose(r["model"], want, rtol=1e-6, atol=1e-6))
                note = "vs the float64 means of the seeds; "
            if device == "cpu":
                cpu_models[rule] = r["model"]
            elif rule in cpu_models:
                same = bool(np.array_equal(r["model"], cpu_models[rule]))
                agrees = same if rule in ("mean", "median", "trimmed_mean") else agrees
                note += f"{'bitwise' if same else 'not bitwise'} the CPU server's model; "
            share = r["close_seconds"] / r["receive_seconds"]
            rows.append({"case": f"{rule} on {device}", "impl": "receive (first -> last byte)",
                         "seconds": r["receive_seconds"], "gbps": total / r["receive_seconds"] / 1e9,
                         "agrees": agrees, "note": note + f"{n} x {d:,} float32 from a `fedagg load` process, "
                                                          "the second of two rounds"})
            rows.append({"case": f"{rule} on {device}", "impl": "last byte -> new model", "seconds": r["close_seconds"],
                         "gbps": None, "agrees": None,
                         "note": f"{100 * share:.1f}% of the receive time (aggregate {r['aggregate_seconds']:.3f} s)"})
            raw.append({k: v for k, v in r.items() if k not in ("model", "order")})
        with tempfile.TemporaryDirectory(prefix="fedagg-bench-state-") as tmp:
            plain = _server_round(n, d, "mean", device, None, seed)
            durable = _server_round(n, d, "mean", device, tmp, seed)
        t_plain = plain["receive_seconds"] + plain["close_seconds"]
        t_durable = durable["receive_seconds"] + durable["close_seconds"]
        rows.append({"case": f"mean on {device}", "impl": "with a state_dir", "seconds": t_durable,
                     "gbps": total / t_durable / 1e9, "agrees": bool(np.array_equal(durable["model"], plain["model"]))
                     if durable["order"] == plain["order"] else None,
                     "note": f"{t_durable / t_plain:.2f}x the round without one ({t_plain:.2f} s, first byte -> "
                             "new model; goal <= 1.2x)"})
        raw += [{k: v for k, v in x.items() if k not in ("model", "order")} for x in (plain, durable)]
    return {"n": n, "d": d, "devices": devices, "rows": rows, "raw": raw}


def server_lines(res: Dict[str, Any]) -> List[str]:
    from .._benchutil import table

    return table(f"server: a round of {res['n']} x {res['d']:,} float32 over loopback, on "
                 f"{' and '.join(res['devices'])}", res["rows"])
