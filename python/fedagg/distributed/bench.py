"""Distributed section of ``fedagg bench``: every rule sharded over K gloo processes on this host.

Weak scaling keeps the coordinates per shard fixed (the round grows with K),
strong scaling keeps the round fixed (each shard gets d / K). Each K starts K
processes (loopback rendezvous, one fedagg thread each unless told otherwise),
times each rule with ``fedagg.distributed.aggregate`` (a barrier, then the
median of ``repeat`` calls; the round's time is the slowest rank's), and
reports the share of that time spent in collectives (waiting for the slowest
rank included) and each shard's memory (its rows, and the process's peak RSS,
torch included). The K = 1 row of strong scaling is also timed with plain
``fedagg.aggregate`` on the same rows (the single-process alternative), in
the same run.

>>> from fedagg.distributed import bench
>>> r = bench.run(n=8, d_shard=20_000, d_total=40_000, shards=[1, 2], rules=["median"], repeat=1)
>>> sorted({(row["scaling"], row["K"]) for row in r["rows"]})
[('strong', 1), ('strong', 2), ('weak', 1), ('weak', 2)]
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .. import RULES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _f_for(rule: str, n: int) -> int:
    if rule == "mean":
        return 0
    from ..benchmark import default_f

    return default_f(rule, n)


def run(n: int = 16, d_shard: int = 2_000_000, d_total: int = 4_000_000, shards: Sequence[int] = (1, 2),
        rules: Optional[Sequence[str]] = None, repeat: int = 3, threads: int = 1, seed: int = 0,
        timeout: float = 900.0) -> Dict[str, Any]:
    rules = list(rules or RULES)
    for r in rules:
        if r not in RULES:
            raise ValueError(f"unknown rule {r!r}")
    if n < 1 or d_shard < 1 or d_total < 1 or repeat < 1 or threads < 1:
        raise ValueError("n, d_shard, d_total, repeat and threads must be >= 1")
    ks = sorted({int(k) for k in shards})
    if not ks or ks[0] < 1:
        raise ValueError(f"shards must be positive counts, got {list(shards)}")
    rows: List[Dict[str, Any]] = []
    for scaling in ("weak", "strong"):
        for K in ks:
            d = d_shard * K if scaling == "weak" else d_total
            job = {"n": n, "d": d, "rules": rules, "repeat": repeat, "threads": threads, "seed": seed,
                   "single": scaling == "strong" and K == 1}
            for r in _launch(K, job, timeout):
                rows.append(dict(r, scaling=scaling, K=K, d=d, d_shard=-(-d // K)))
    for scaling in ("weak", "strong"):
        for rule in rules:
            base = [r for r in rows if r["scaling"] == scaling and r["rule"] == rule and r["K"] == ks[0]
                    and r["impl"] == "fedagg.distributed"]
            for r in rows:
                if r["scaling"] == scaling and r["rule"] == rule and base:
                    r["vs_first"] = r["seconds"] / base[0]["seconds"]
    return {"n": n, "d_shard": d_shard, "d_total": d_total, "shards": ks, "repeat": repeat,
            "threads": threads, "cpu_count": os.cpu_count(), "rows": rows}


def _launch(K: int, job: Dict[str, Any], timeout: float) -> List[Dict[str, Any]]:
    port = _free_port()
    with tempfile.TemporaryDirectory() as tmp:
        spec = os.path.join(tmp, "job.json")
        with open(spec, "w") as fh:
            json.dump(job, fh)
        procs = []
        for rank in range(K):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(K), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"),
                       OMP_NUM_THREADS=str(job["threads"]))
            procs.append(subprocess.Popen([sys.executable, "-m", "fedagg.distributed.bench", spec,
                                           os.path.join(tmp, f"rank{rank}.json")], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        deadline = time.monotonic() + timeout
        logs = []
        try:
            for p in procs:
                logs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for rank, (p, log) in enumerate(zip(procs, logs)):
            if p.returncode != 0:
                raise RuntimeError(f"distributed bench: rank {rank} of {K} failed ({p.returncode}):\n{log[-2000:]}")
        reports = []
        for rank in range(K):
            with open(os.path.join(tmp, f"rank{rank}.json")) as fh:
                reports.append(json.load(fh))
    out = []
    for i, r0 in enumerate(reports[0]):
        per_rank = [rep[i] for rep in reports]
        secs = max(r["seconds"] for r in per_rank)  # the round waits for the slowest shard
        out.append({"rule": r0["rule"], "impl": r0["impl"], "seconds": secs,
                    "collective": max(r["collective"] for r in per_rank) / secs if secs else 0.0,
                    "peak_bytes": max(r["peak_bytes"] for r in per_rank),
                    "input_bytes": max(r["input_bytes"] for r in per_rank), "f": r0["f"]})
    return out


def _maxrss() -> int:
    """This process's peak RSS (VmHWM: ru_maxrss would carry the launching process's peak across exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(spec_path: str, out_path: str) -> None:
    import torch.distributed as dist

    import fedagg

    from .aggregate import aggregate, shard_range
    from .group import Group

    with open(spec_path) as fh:
        job = json.load(fh)
    fedagg.set_num_threads(job["threads"])
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    lo, hi = shard_range(job["d"], rank, size)
    n = job["n"]
    rng = np.random.default_rng([job["seed"], rank])
    X = rng.standard_normal((n, hi - lo), dtype=np.float32)
    results = []
    group = Group()  # counts the collectives' time
    for rule in job["rules"]:
        f = _f_for(rule, n)

        def call():
            return aggregate(X, rule, f, group=group)

        times, coll = [], []
        call()
        for _ in range(job["repeat"]):
            dist.barrier()
            c0 = group.seconds
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
            coll.append(group.seconds - c0)
        i = int(np.argsort(times)[len(times) // 2])
        results.append({"rule": rule, "impl": "fedagg.distributed", "f": f, "seconds": statistics.median(times),
                        "collective": coll[i], "peak_bytes": _maxrss(), "input_bytes": X.nbytes})
        if job["single"]:
            times = []
            fedagg.aggregate(X, rule, f)
            for _ in range(job["repeat"]):
                t0 = time.perf_counter()
                fedagg.aggregate(X, rule, f)
                times.append(time.perf_counter() - t0)
            results.append({"rule": rule, "impl": "fedagg.aggregate (1 process)", "f": f,
                            "seconds": statistics.median(times), "collective": 0.0,
                            "peak_bytes": _maxrss(), "input_bytes": X.nbytes})
    with open(out_path, "w") as fh:
        json.dump(results, fh)
    dist.destroy_process_group()


def lines(res: Dict[str, Any]) -> List[str]:
    out = [f"distributed: n = {res['n']}, gloo processes on this host ({res['cpu_count']} CPUs), "
           f"{res['threads']} fedagg thread(s) per shard, median of {res['repeat']}; weak: "
           f"{res['d_shard']:,} coordinates per shard, strong: {res['d_total']:,} in all",
           f"{'rule':18s} {'scaling':8s} {'K':>3s} {'impl':30s} {'d/shard':>11s} {'time':>10s} {'GB/s':>7s} "
           f"{'vs K=' + str(res['shards'][0]):>7s} {'collective':>10s} {'rows/shard':>10s} {'peak RSS':>9s}"]
    for r in res["rows"]:
        gbps = 4.0 * res["n"] * r["d"] / r["seconds"] / 1e9
        rel = f"{r['vs_first']:.2f}x" if "vs_first" in r else "-"
        out.append(f"{r['rule']:18s} {r['scaling']:8s} {r['K']:3d} {r['impl']:30s} {r['d_shard']:11,d} "
                   f"{r['seconds'] * 1e3:8.1f}ms {gbps:7.2f} {rel:>7s} {100 * r['collective']:9.1f}% "
                   f"{r['input_bytes'] / 1e6:8.0f}MB {r['peak_bytes'] / 1e6:7.0f}MB")
    return out


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
