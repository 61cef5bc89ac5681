"""Secure-aggregation section of ``fedagg bench``: one SecAgg+ round of fedagg.secure against
Flower's SecAgg+ (``SecAggPlusWorkflow`` and ``secaggplus_mod`` in Flower's Simulation Runtime,
as its docs run them) on the same n and d, in the same run, and each against its plain round.

fedagg's round runs in this process, phase by phase: every participant's work (encoding included,
on one thread) and the server's (all threads) are timed apart, and the bytes of each message
counted. Its "round" column is the server's time plus the participants' total over the cores
(they work in parallel in each phase, as Flower's simulation runs its nodes on the cores), an
estimate without the network.
Flower's round is timed inside its ServerApp around each round's fit step; of 3 rounds the first
starts the nodes' actors, the median of the later ones is reported (the Simulation Runtime's
start-up is not counted); its plain round is FedAvg's default fit step.

>>> from fedagg.secure import bench
>>> r = bench.run(ns=(4,), ds=(1000,), flower=False, serve=False)
>>> [(row["n"], row["d"], row["impl"]) for row in r["rows"]][:2]
[(4, 1000, 'fedagg SecAgg+'), (4, 1000, 'fedagg plain mean')]
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .. import _core
from . import wire
from .ddg import Encoding
from .protocol import Params, Participant, Server

_FLOWER_APP = textwrap.dedent('''
    import json, sys, time
    import numpy as np
    from flwr.client import ClientApp, NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.common import Context, ndarrays_to_parameters
    from flwr.server import ServerApp, ServerConfig
    from flwr.server.compat import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
    from flwr.server.workflow.default_workflows import default_fit_workflow
    from flwr.simulation import run_simulation

    n, d, secure, shares, threshold, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", \\
        int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    rounds = 3  # the first round also starts the nodes' actors: the later ones are timed

    class Node(NumPyClient):
        def fit(self, parameters, config):
            rng = np.random.default_rng()
            return [rng.uniform(-1, 1, d).astype(np.float32)], 1, {}

    client = ClientApp(client_fn=lambda context: Node().to_client(), mods=[secaggplus_mod] if secure else [])
    server = ServerApp()

    @server.main()
    def main(grid, context: Context) -> None:
        strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=n, min_available_clients=n,
                          initial_parameters=ndarrays_to_parameters([np.zeros(d, np.float32)]))
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=rounds), strategy=strategy)
        fit = SecAggPlusWorkflow(num_shares=shares, reconstruction_threshold=threshold) if secure else \
            default_fit_workflow
        times = []

        def timed(grid, ctx):  # each round's fit step, as the workflow runs it
            t0 = time.perf_counter()
            fit(grid, ctx)
            times.append(time.perf_counter() - t0)

        DefaultWorkflow(fit_workflow=timed)(grid, legacy)
        with open(out, "w") as fh:
            json.dump({"rounds": times}, fh)

    run_simulation(server_app=server, client_app=client, num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
''')


def _fedagg_round(n: int, d: int, cores: int) -> Dict[str, Any]:
    enc = Encoding(clip=float(np.sqrt(d)), sigma=0.0, gamma=1e-4, n=n, d=d, bits=32)
    p = Params.for_group(n, enc.padded)
    rid = hashlib.sha256(f"bench {n} {d}".encode()).digest()
    seed = hashlib.sha256(b"bench graph").digest()
    rng = np.random.default_rng(0)
    X = rng.uniform(-1, 1, size=(n, d)).astype(np.float32)
    server = Server(p, rid, seed)
    parts = [Participant(p, i, rid, seed) for i in range(n)]
    spent = {"participants": 0.0, "server": 0.0}
    wire_bytes = {"up": 0, "down": 0}  # the messages as secure.wire writes them
    threads = _core.num_threads()

    def clock(who, fn):  # a participant's work on one thread (the cores are shared among them)
        _core.set_num_threads(1 if who == "participants" else threads)
        try:
            t0 = time.perf_counter()
            r = fn()
            spent[who] += time.perf_counter() - t0
        finally:
            _core.set_num_threads(threads)
        return r

    ads = [clock("participants", q.advertise) for q in parts]
    wire_bytes["up"] += sum(len(wire.advertisement(a)) for a in ads)
    roster = clock("server", lambda: server.collect_advertisements(ads))
    wire_bytes["down"] += n * len(wire.roster(roster))
    cts = {q.index: clock("participants", lambda q=q: q.share_keys(roster)) for q in parts}
    wire_bytes["up"] += sum(len(wire.ciphertexts(v)) for v in cts.values())
    inbox = clock("server", lambda: server.route_shares(cts))
    wire_bytes["down"] += sum(len(wire.ciphertexts(v)) for v in inbox.values())
    masked = {q.index: clock("participants", lambda q=q: q.masked_input(enc.encode(X[q.index]), inbox[q.index]))
              for q in parts}
    wire_bytes["up"] += sum(y.nbytes for y in masked.values())
    clock("server", lambda: server.collect_masked(masked))
    req = clock("server", server.unmask_request)
    wire_bytes["down"] += n * len(wire.unmask_request(req))
    resp = [clock("participants", lambda q=q: q.unmask(req)) for q in parts]
    wire_bytes["up"] += sum(len(wire.unmask_response(r)) for r in resp)
    total = clock("server", lambda: server.finish(resp))
    mean = clock("server", lambda: enc.decode(total, n))
    err = float(np.abs(mean - X.astype(np.float64).mean(axis=0)).max())
    t0 = time.perf_counter()
    _core.weighted_sum(X, np.full(n, 1.0 / n))
    plain_s = time.perf_counter() - t0
    part_s, t_server = spent["participants"], spent["server"]
    return {"params": {"k": p.k, "t": p.t, "bits": p.bits, "padded": enc.padded}, "participants_s": part_s,
            "per_participant_s": part_s / n, "server_s": t_server, "round_s": t_server + part_s / cores,
            "up_bytes_per_participant": wire_bytes["up"] / n, "down_bytes_per_participant": wire_bytes["down"] / n,
            "max_abs_error": err, "plain_s": plain_s}


def _flower_round(n: int, d: int, secure: bool, shares: int, threshold: int, timeout: float) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        script, out = os.path.join(tmp, "app.py"), os.path.join(tmp, "out.json")
        with open(script, "w") as fh:
            fh.write(_FLOWER_APP)
        env = dict(os.environ, RAY_DEDUP_LOGS="0", FLWR_LOG_LEVEL="WARNING", PYTHONWARNINGS="ignore")
        t0 = time.perf_counter()
        try:
            run = subprocess.run([sys.executable, script, str(n), str(d), "1" if secure else "0", str(shares),
                                  str(threshold), out], cwd=tmp, env=env, capture_output=True, text=True,
                                 timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"seconds": None, "note": f"ran past {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if not os.path.exists(out):
            return {"seconds": None, "note": f"failed (exit {run.returncode}): {(run.stderr or run.stdout)[-300:]}"}
        with open(out) as fh:
            times = json.load(fh)["rounds"]
        later = sorted(times[1:])
        return {"seconds": later[len(later) // 2] if later else None,
                "note": f"round 1 (nodes starting) {times[0]:.2f} s; process {wall:.1f} s"}


SERVE_MAX_COORDS = 64 << 20  # n x d of the rounds through the server: n processes each hold a few d-vectors


def _serve_participant(endpoint: str, pid: str, x: np.ndarray, ready, go, out) -> None:
    from ..transport import Client, secure_client
    from .protocol import _crypto

    _crypto()  # a running participant has these loaded: not a round's cost
    _ = secure_client.submit_secure
    with Client(endpoint, pid, timeout=120) as c:
        rnd = c.status()["round"]
        ready.put(pid)
        if not go.wait(600):  # the parent is gone (or stuck): no orphan waits forever
            return
        cpu = time.process_time()  # this process's CPU, its libzmq I/O thread included
        c.submit(x, rnd)
        out.put(time.process_time() - cpu)


def serve_round(n: int, d: int, *, secure: bool, bucket_size: int = 8, sigma: float = 0.0) -> Dict[str, Any]:
    """One round through fedagg's server (a thread here) with n participant processes (forked,
    updates ready) released together: seconds from the release to the round's close. Plain: the
    mean of raw float32 uploads; secure: SecAgg+ over buckets of bucket_size, the mean over the
    bucket means, each participant clipping (at a norm above its update's), rotating, rounding,
    adding noise of stddev sigma and masking.

    The participants share this machine's cores with the server: "participants_cpu_s" is their
    CPU time in the round (all of them), "server_cpu_s" this process's. "dedicated_s" estimates
    the round with each participant on its own machine: the measured round, less the
    participants' CPU spread over the cores, plus the busiest participant's CPU."""
    import multiprocessing as mp
    import resource
    import threading

    from ..transport import SecureConfig, Server, ServerConfig

    fork = mp.get_context("fork")
    X = np.random.default_rng(0).uniform(-1, 1, size=(n, d)).astype(np.float32) / np.sqrt(d)
    cfg = ServerConfig(bind="tcp://127.0.0.1:0", quorum=n, min_updates=n, rounds=1, deadline=600.0, rate=1e6,
                       secure=SecureConfig(bucket_size=bucket_size, clip=2.0, sigma=sigma, phase_seconds=120)
                       if secure else None)
    closed: Dict[str, float] = {}
    if secure and sigma > 0:  # the accountant's import, once per server process: not a round's cost
        Encoding(clip=1.0, sigma=sigma, gamma=1e-3, n=bucket_size, d=256).epsilon(1e-5)
    server = Server(np.zeros(d, np.float32), cfg, on_round=lambda rec: closed.setdefault("t", time.perf_counter()))
    th = threading.Thread(target=server.serve, daemon=True)
    th.start()
    ready, out, go = fork.Queue(), fork.Queue(), fork.Event()
    procs = [fork.Process(target=_serve_participant, args=(server.endpoint, f"p{i}", X[i], ready, go, out))
             for i in range(n)]
    try:
        for p in procs:
            p.start()
        for _ in range(n):
            ready.get(timeout=120)
        usage = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        released = time.monotonic() - server.round_started  # the round's phases count from its start
        go.set()
        cpu = [out.get(timeout=600) for _ in range(n)]
        th.join(600)
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
        if th.is_alive():
            server.stop()
            th.join(10)
    rec = server.history[0]
    err = float(np.abs(server.model.astype(np.float64) - X.astype(np.float64).mean(axis=0)).max())
    seconds, cores = closed["t"] - t0, _core.num_threads()
    phases = {k: v - released for k, v in (rec.get("phases_ended") or {}).items()}  # from the release
    server_cpu = (after.ru_utime + after.ru_stime) - (usage.ru_utime + usage.ru_stime)
    return {"seconds": seconds, "aggregate_seconds": rec["aggregate_seconds"], "bytes_in": rec["bytes_in"],
            "accepted": len(rec["accepted"]), "max_abs_error": err, "buckets": len(rec.get("buckets") or []),
            "phases_ended": phases, "participants_cpu_s": float(sum(cpu)), "max_participant_cpu_s": float(max(cpu)),
            "server_cpu_s": server_cpu, "dedicated_s": seconds - sum(cpu) / cores + max(cpu)}


def run(ns: Sequence[int] = (16, 64), ds: Sequence[int] = (100_000, 1_000_000), *, flower: bool = True,
        flower_timeout: float = 600.0, cores: Optional[int] = None, serve: bool = True,
        repeats: int = 3) -> Dict[str, Any]:
    """In-process rounds against Flower's (flower), and (serve) rounds through fedagg's server, secure
    and plain, with participant processes: the median of `repeats` of each, alternating."""
    cores = cores or _core.num_threads()
    rows: List[Dict[str, Any]] = []
    have_flower, flower_note = flower, "" if flower else "not compared (--no-compare)"
    if flower and (importlib.util.find_spec("flwr") is None or importlib.util.find_spec("ray") is None):
        have_flower, flower_note = False, "not installed: flwr[simulation]"  # ray: the Simulation Runtime
    for n in ns:
        for d in ds:
            ours = _fedagg_round(n, d, cores)
            k, t = ours["params"]["k"], ours["params"]["t"]
            rows.append({"n": n, "d": d, "impl": "fedagg SecAgg+", "seconds": ours["round_s"],
                         "per_participant_s": ours["per_participant_s"], "server_s": ours["server_s"],
                         "up_bytes": ours["up_bytes_per_participant"], "down_bytes": ours["down_bytes_per_participant"],
                         "note": f"k = {k}, t = {t}, 32-bit ring, max error {ours['max_abs_error']:.1e}"})
            rows.append({"n": n, "d": d, "impl": "fedagg plain mean", "seconds": ours["plain_s"],
                         "per_participant_s": None, "server_s": ours["plain_s"], "up_bytes": 4 * d, "down_bytes": None,
                         "note": "the same float32 updates averaged, in process"})
            if serve and n * d > SERVE_MAX_COORDS:
                rows.append({"n": n, "d": d, "impl": "fedagg serve", "seconds": None, "per_participant_s": None,
                             "server_s": None, "up_bytes": None, "down_bytes": None,
                             "note": f"not run: {n} participant processes x d = {d:,} need more memory than "
                                     f"n x d <= {SERVE_MAX_COORDS:,} allows on one machine"})
            elif serve:
                got: Dict[bool, List[Dict[str, Any]]] = {True: [], False: []}
                for _ in range(repeats):
                    for secure in (False, True):
                        got[secure].append(serve_round(n, d, secure=secure, bucket_size=min(8, n)))
                for secure in (True, False):
                    runs = sorted(got[secure], key=lambda r: r["seconds"])
                    mid = runs[len(runs) // 2]
                    times = ", ".join(f"{r['seconds']:.2f}" for r in runs)
                    rows.append({"n": n, "d": d, "impl": "fedagg serve, secure" if secure else "fedagg serve, plain",
                                 "seconds": mid["seconds"], "per_participant_s": mid["participants_cpu_s"] / n,
                                 "server_s": mid["server_cpu_s"], "up_bytes": mid["bytes_in"] / n, "down_bytes": None,
                                 "dedicated_s": mid["dedicated_s"], "phases_ended": mid["phases_ended"],
                                 "note": (f"buckets of {min(8, n)}; " if secure else "")
                                 + f"median of {repeats}: {times} s; "
                                 f"participants' CPU {mid['participants_cpu_s']:.2f} s on the same cores; "
                                 f"dedicated estimate {mid['dedicated_s']:.2f} s"})
            if have_flower:
                for secure in (True, False):
                    fl = _flower_round(n, d, secure, k + 1, t, flower_timeout)
                    rows.append({"n": n, "d": d, "impl": "Flower SecAgg+" if secure else "Flower plain (FedAvg)",
                                 "seconds": fl["seconds"], "per_participant_s": None, "server_s": None,
                                 "up_bytes": (8 if secure else 4) * d, "down_bytes": None,
                                 "note": (f"num_shares = {k + 1}, threshold = {t}; " if secure else "") + fl["note"]})
    return {"ns": list(ns), "ds": list(ds), "cores": cores, "flower": have_flower, "flower_note": flower_note,
            "rows": rows, "cpu": _cpu_model()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def lines(res: Dict[str, Any]) -> List[str]:
    out = [f"secagg: one round, {res['cores']} cores ({res.get('cpu', '?')}, kernels {_core.isa()}); fedagg in "
           "process (round = server + participants / cores), and through its server (participant processes on the "
           "same cores; participant = its CPU, server = the server process's CPU), Flower in its Simulation Runtime"
           + ("" if res["flower"] else f" ({res['flower_note']})"),
           f"{'n':>4s} {'d':>10s} {'impl':22s} {'round':>10s} {'participant':>12s} {'server':>10s} "
           f"{'up B/coord':>10s}  note"]
    for r in res["rows"]:
        fmt = lambda s: "-" if s is None else f"{s * 1e3:8.1f}ms"  # noqa: E731
        up = "-" if r["up_bytes"] is None else f"{r['up_bytes'] / r['d']:.2f}"
        out.append(f"{r['n']:4d} {r['d']:10,d} {r['impl']:22s} {fmt(r['seconds']):>10s} "
                   f"{fmt(r['per_participant_s']):>12s} {fmt(r['server_s']):>10s} {up:>10s}  {r['note']}")
    return out
