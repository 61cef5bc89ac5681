"""Accepted updates per second through `fedagg serve`: N participant threads, small updates, rounds at quorum N.

    python bench/many_participants.py [--n 50] [--d 100000] [--rounds 8] [--generator threads|load]

Each participant fetches the model, submits its update and waits for the next round
(Client.wait_round), so the rate includes the notice of each new round. One process for the
server, one for the participants; loopback only; every wait bounded. Also prints the server
process's CPU time per accepted update (user + system, from /proc; Linux). `--generator load`
drives the identities with fedagg.transport.load (one thread, no model download, no Client) and
times the whole run, HELLOs included.
"""

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np

from fedagg.transport import Client


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--d", type=int, default=100_000, help="float32 values per update (default 100,000: 400 KB)")
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--generator", choices=["threads", "load"], default="threads")
    a = ap.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ep = f"tcp://127.0.0.1:{port}"
    srv = subprocess.Popen([sys.executable, "-m", "fedagg", "serve", "--bind", ep, "--d", str(a.d), "--quorum",
                            str(a.n), "--rounds", str(a.rounds + (a.generator == "threads")), "--deadline", "120",
                            "--linger", "5"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        srv.stdout.readline()  # listening
        # the round records follow on stdout: read them, or a full pipe would stall the server
        threading.Thread(target=srv.stdout.read, daemon=True).start()
        done, cpu = {}, {}
        if a.generator == "load":
            from fedagg.transport.load import Load

            c0, t0 = cpu_seconds(srv.pid), time.monotonic()
            report = Load(ep, a.n, a.d, rounds=a.rounds, timeout=120).run()
            seconds, used = time.monotonic() - t0, cpu_seconds(srv.pid) - c0
            accepted = sum(len(v) for v in report.rounds.values())
            print(f"{a.n} identities x {4 * a.d / 1e3:.0f} KB (load generator): {accepted / seconds:.0f} accepted "
                  f"updates/s over {a.rounds} rounds; server CPU {used / accepted * 1e3:.2f} ms per accepted update")
            return 0

        def participant(i: int) -> None:
            x = np.full(a.d, 0.01, np.float32)
            with Client(ep, f"p{i}", timeout=60) as c:
                for k in range(a.rounds + 1):  # round 0 warms up; rounds 1.. are timed
                    rnd, _ = c.model()
                    c.submit(x, rnd)
                    c.wait_round(rnd, 60)
                    if i == 0:
                        done[k] = time.monotonic()
                        cpu[k] = cpu_seconds(srv.pid)

        ts = [threading.Thread(target=participant, args=(i,)) for i in range(a.n)]
        [t.start() for t in ts]
        [t.join(600) for t in ts]
        seconds = done[a.rounds] - done[0]
        per_update = (cpu[a.rounds] - cpu[0]) / (a.n * a.rounds)
        print(f"{a.n} participants x {4 * a.d / 1e3:.0f} KB: {a.n * a.rounds / seconds:.0f} accepted updates/s "
              f"over {a.rounds} rounds ({seconds / a.rounds * 1e3:.0f} ms a round); server CPU "
              f"{per_update * 1e3:.2f} ms per accepted update")
    finally:
        srv.kill()
        srv.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
