"""One demo run: a chain node, the Registry contract, an aggregation server and N
participant processes on loopback, until the rounds are done.

Every wait is bounded: the node's start, the registrations, each round (the server
is stopped if none closes in time), and the participants' exit.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from . import task
from .options import DemoError, Options, RoundRow, RunResult, byzantine_indices, min_updates

ETH = 10**18


class _Processes:
    """Child processes with their logs in one folder; all of them killed on exit."""

    def __init__(self, logdir: Path):
        self.logdir, self.procs = logdir, []

    def start(self, name: str, args: List[str], stdout=subprocess.DEVNULL) -> subprocess.Popen:
        log = open(self.logdir / f"{name}.log", "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        # Each child holds a pipe from us as stdin and exits at its EOF: if this process dies,
        # however it dies, no node with unlocked accounts or participant outlives it.
        p = subprocess.Popen([sys.executable, *args, "--until-stdin-closes"], stdin=subprocess.PIPE, stdout=stdout,
                             stderr=log, env=env)
        log.close()
        self.procs.append((name, p))
        return p

    def wait(self, timeout: float, exclude=()) -> None:
        """Wait (bounded) for the processes to exit by themselves, except those named in exclude."""
        end = time.monotonic() + timeout
        for name, p in self.procs:
            if name in exclude:
                continue
            try:
                p.wait(max(0.1, end - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass

    def detach(self, name: str) -> subprocess.Popen:
        """Stop managing process `name` (it is no longer killed with the others); returns it."""
        for i, (n, p) in enumerate(self.procs):
            if n == name:
                del self.procs[i]
                return p
        raise KeyError(name)

    def kill(self) -> None:
        for _, p in self.procs:
            if p.poll() is None:
                p.kill()
        for _, p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
            for pipe in (p.stdin, p.stdout):
                if pipe is not None:
                    pipe.close()

    def tails(self, lines: int = 5) -> str:
        out = []
        for f in sorted(self.logdir.glob("*.log")):
            text = f.read_text(errors="replace").strip().splitlines()[-lines:]
            if text:
                out.append(f"--- {f.name}\n" + "\n".join(text))
        return "\n".join(out)


def _start_node(procs: _Processes, accounts: int, timeout: float = 60.0) -> str:
    """The embedded chain in its own process; returns its URL."""
    p = procs.start("node", ["-m", "fedagg.ledger.node", "--accounts", str(accounts)], stdout=subprocess.PIPE)
    got: "queue.Queue[str]" = queue.Queue()
    threading.Thread(target=lambda: got.put(p.stdout.readline().decode().strip()), daemon=True).start()
    try:
        url = got.get(timeout=timeout)
    except queue.Empty:
        raise DemoError(f"the chain node did not start in {timeout:.0f} s") from None
    if not url.startswith("http://127.0.0.1:"):
        raise DemoError(f"the chain node failed to start:\n{procs.tails()}")
    return url


def run_one(opts: Options, rule: str, f: int, on_row: Callable[[RoundRow], None], *,
            round_timeout: float = 90.0, on_step: Optional[Callable[[str], None]] = None) -> RunResult:
    """Run `opts.rounds` rounds with `rule`; calls on_row after each round, and on_step(text) as each
    part starts (chain node, contract, server, participants, training)."""
    from .. import privacy
    from ..transport import Server, ServerConfig

    step = on_step or (lambda text: None)
    step("loading scikit-learn's digits and the model")
    data = task.load(opts.participants, opts.seed)
    Xt, yt = data.X[data.test], data.y[data.test]
    eval_net = task.model(opts.seed)
    from ..integrations.torch import ParameterVector

    initial = ParameterVector(task.model(opts.seed)).get().numpy()
    bad = set(byzantine_indices(opts))
    labels: Dict[str, str] = {}
    result = RunResult(rule, f)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fedagg-demo-") as tmp:
        procs = _Processes(Path(tmp))
        server = worker = None
        try:
            gate, chain_args, accounts = None, [], []
            if opts.ledger:
                from ..ledger import EvmLedger, LedgerGate, compiled, connect

                bundles = Path(opts.bundles) / rule if opts.bundles else Path(tmp) / "bundles"

                step("starting the chain node (the embedded py-evm chain, served on loopback)")
                url = _start_node(procs, opts.participants + 2)
                step(f"chain node at {url}; compiling and deploying the registry contract")
                w3 = connect(url)
                owner, agg, *accounts = w3.eth.accounts
                chain = EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH)
                step(f"registry contract at {chain.address}")
                gate = LedgerGate(chain, commit_seconds=opts.commit_seconds, bundle_dir=str(bundles))
                result.chain = {"rpc": url, "contract": chain.address, "bundles": str(bundles)}
                abi_file = Path(tmp) / "registry-abi.json"
                abi_file.write_text(json.dumps(compiled()[0]))
                chain_args = ["--chain", url, "--contract", chain.address, "--abi", str(abi_file)]
            dp = secure = None
            need = min_updates(rule, f, opts.participants - opts.byzantine)
            if opts.secure:  # each bucket's sum carries dp_noise x dp_clip, as central DP's sum would
                from ..rules import RULES as SPECS
                from ..transport import SecureConfig

                secure = SecureConfig(bucket_size=opts.bucket_size, clip=opts.dp_clip,
                                      sigma=opts.dp_noise * opts.dp_clip / np.sqrt(opts.bucket_size),
                                      phase_seconds=30.0)
                need = min(opts.participants, max(need, opts.bucket_size * SPECS[rule].min_n(f)))
            elif opts.dp_noise > 0:
                dp = privacy.CentralDP(noise_multiplier=opts.dp_noise, clip_norm=opts.dp_clip,
                                       expected_participants=opts.participants)
            cfg = ServerConfig(bind="tcp://127.0.0.1:0", rule=rule, f=f, quorum=opts.participants,
                               min_updates=need, deadline=opts.commit_seconds + 20.0, rounds=opts.rounds,
                               ledger=gate, dp=dp, secure=secure)
            rows: "queue.Queue[Any]" = queue.Queue()
            # The model as the round left it (the server moves on while the row is built).
            step(f"starting the aggregation server ({rule}, f = {f})")
            server = Server(initial, cfg, on_round=lambda rec: rows.put((rec, server.model.copy())))
            step(f"aggregation server at {server.endpoint}; starting {opts.participants} participant processes "
                 "(each loads torch and its shard)")
            worker = threading.Thread(target=server.serve, name="fedagg-demo-server", daemon=True)
            coalition = Path(tmp) / "coalition.npz"  # what colluding attackers share (ALIE uses it)
            np.savez(coalition, **{f"{k}{j}": (data.X if k == "X" else data.y)[data.shards[i]]
                                   for j, i in enumerate(sorted(bad)) for k in ("X", "y")})
            for i in range(opts.participants):
                attack = opts.attack if i in bad else "none"
                shard = Path(tmp) / f"p{i}.npz"
                np.savez(shard, X=data.X[data.shards[i]], y=data.y[data.shards[i]])
                args = ["-m", "fedagg.demo.participant", "--endpoint", server.endpoint, "--index", str(i),
                        "--data", str(shard),
                        "--participants", str(opts.participants), "--byzantine", str(opts.byzantine),
                        "--attack", attack, "--rounds", str(opts.rounds), "--codec", opts.codec,
                        "--epochs", str(opts.epochs), "--lr", str(opts.lr), "--seed", str(opts.seed)]
                if attack == "alie":
                    args += ["--coalition", str(coalition)]
                label = f"p{i}" + ("*" if i in bad else "")
                if opts.ledger:
                    args += chain_args + ["--account", accounts[i]]
                    labels[accounts[i]] = label
                else:
                    labels[f"p{i}"] = label
                procs.start(f"p{i}", args)
            if gate is not None:  # round 0's snapshot must see every registration
                step(f"waiting for the {opts.participants} participants to register and stake on chain")
                _wait_registered(gate.chain, opts.participants, procs, timeout=120.0, on_step=step)
            step(f"training: round 0 starts (each participant trains {opts.epochs} epochs on its shard, "
                 + ("commits its update's hash on chain and uploads it signed)" if gate is not None else
                    "uploads its update)"))
            worker.start()
            for _ in range(opts.rounds):
                try:
                    rec, model = rows.get(timeout=round_timeout)
                except queue.Empty:
                    raise DemoError(f"no round closed in {round_timeout:.0f} s; the processes said:\n"
                                    f"{procs.tails()}") from None
                row = _row(rec, model, eval_net, Xt, yt, labels)
                result.rows.append(row)
                on_row(row)
            worker.join(30)
            procs.wait(30, exclude=("node",))
            if gate is not None:
                from ..ledger import audit_bundles

                result.gas = {k: int(sum(v)) for k, v in gate.chain.gas.items()}
                step(f"auditing the {opts.rounds} rounds from the chain and their bundles in {bundles}")
                reports = audit_bundles(gate.chain, bundles)
                result.audit = {"ok": bool(reports) and all(r.ok for r in reports), "rounds": len(reports),
                                "problems": [p for r in reports for p in r.problems]}
                if opts.keep_chain:  # the node outlives the run (run() ends it when interrupted)
                    result.node = procs.detach("node")
        finally:
            if server is not None:  # whatever happened (an error, Ctrl-C), no server is left running
                if worker is not None and worker.is_alive():
                    server.stop()
                    worker.join(10)
                elif worker is None or not worker.ident:
                    server.close()
            procs.kill()
    result.seconds = time.monotonic() - t0
    return result


def _wait_registered(chain, n: int, procs: _Processes, timeout: float,
                     on_step: Callable[[str], None] = lambda text: None) -> None:
    end = time.monotonic() + timeout
    shown, shown_at = 0, time.monotonic()
    while True:
        got = len(chain.registered())
        if got >= n:
            on_step(f"all {n} participants registered")
            return
        if got != shown and time.monotonic() - shown_at >= 5.0:  # a line every 5 s at most
            shown, shown_at = got, time.monotonic()
            on_step(f"{got} of {n} participants registered")
        if time.monotonic() > end:
            raise DemoError(f"only {len(chain.registered())} of {n} participants registered in {timeout:.0f} s:\n"
                            f"{procs.tails()}")
        if any(p.poll() not in (None, 0) for _, p in procs.procs):
            raise DemoError(f"a process failed before registering:\n{procs.tails()}")
        time.sleep(0.2)


def _row(rec: Dict[str, Any], model: np.ndarray, net, Xt, yt, labels: Dict[str, str]) -> RoundRow:
    name = lambda pid: labels.get(pid, pid)  # noqa: E731
    priv = rec.get("privacy") or {}
    if rec.get("buckets") is not None:  # a secure round reports its own release; the run has made round + 1
        priv = {"epsilon": _secure_epsilon(priv, int(rec["round"]) + 1)}
    return RoundRow(
        round=int(rec["round"]), accuracy=task.accuracy(net, model, Xt, yt),
        excluded=sorted((name(p) for p in rec.get("excluded_by_rule", [])), key=lambda s: int(s[1:].rstrip("*"))
                        if s[1:].rstrip("*").isdigit() else 10**9),
        refused={name(r.get("id", "?")): r.get("reason", "?") for r in rec.get("rejected", [])},
        epsilon=priv.get("epsilon"), bytes_in=int(rec.get("bytes_in", 0)), seconds=float(rec.get("seconds", 0.0)),
        ledger_seconds=float((rec.get("ledger") or {}).get("seconds", 0.0)))


def _secure_epsilon(priv: Dict[str, Any], rounds: int) -> Optional[float]:
    """Epsilon of `rounds` secure releases like this round's (its smallest bucket: the least noise)."""
    if not priv or not priv.get("sigma"):
        return None
    from ..secure import Encoding

    enc = Encoding(clip=priv["clip"], sigma=priv["sigma"], gamma=priv["gamma"], n=min(priv["bucket_sizes"]),
                   d=priv["d"])
    return enc.epsilon(priv["delta"], rounds)
