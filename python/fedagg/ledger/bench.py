"""Ledger overhead of a round: n ledger-validated participants (threads of this
process) over ZeroMQ on loopback, on the embedded chain or a JSON-RPC node.

Reports the round's time, the aggregator's time in chain calls (open the round,
snapshot, close the commit window + batched read, record), their gas, and the
participants' own chain time (commit transactions).

>>> from fedagg.ledger import bench
>>> r = bench.run(n=2, d=1000, commit_seconds=0.5)
>>> r["accepted"], r["ledger_calls"] >= 3
(2, True)
"""

from __future__ import annotations

import threading
import time
from typing import Any, Dict, Optional

import numpy as np


def run(n: int = 16, d: int = 25_000_000, *, rpc: Optional[str] = None, commit_seconds: float = 15.0,
        rule: str = "mean") -> Dict[str, Any]:
    """commit_seconds must cover the participants' hashing and commit transactions."""
    from ..transport import Client, Server, ServerConfig
    from . import EvmLedger, LedgerGate, LedgerParticipant, connect, embedded

    w3 = connect(rpc) if rpc else embedded(accounts=n + 2)
    owner, agg = w3.eth.accounts[:2]
    chain = EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=10**18)
    people = [LedgerParticipant(chain, a) for a in w3.eth.accounts[2:2 + n]]
    for p in people:
        p.register(2 * 10**18)
    gate = LedgerGate(chain, commit_seconds=commit_seconds)
    server = Server(np.zeros(d, np.float32), ServerConfig(bind="tcp://127.0.0.1:0", rule=rule, quorum=n, rounds=1,
                                                         deadline=600.0, ledger=gate, rate=1e6))
    th = threading.Thread(target=server.serve, daemon=True)
    th.start()
    commit_time = [0.0] * n
    ready = threading.Barrier(n + 1)

    def participant(i: int) -> None:
        x = np.full(d, 0.5, dtype=np.float32)
        with Client(server.endpoint, people[i].account, timeout=600) as c:
            ready.wait()
            t0 = time.perf_counter()
            sig = people[i].commit(0, x, session=c.state["session"])
            commit_time[i] = time.perf_counter() - t0
            c.submit(x, 0, signature=sig)

    ts = [threading.Thread(target=participant, args=(i,)) for i in range(n)]
    for t in ts:
        t.start()
    ready.wait()
    t0 = time.perf_counter()
    for t in ts:
        t.join(900)
    th.join(900)
    rec = server.history[0]
    cost = rec["ledger"]
    return {"n": n, "d": d, "backend": rpc or "embedded py-evm", "accepted": len(rec["accepted"]),
            "round_seconds": rec["seconds"], "wall_seconds": time.perf_counter() - t0,
            "commit_phase_seconds": commit_seconds, "upload_and_aggregate_seconds": rec["seconds"] - commit_seconds,
            "ledger_seconds": cost["seconds"], "ledger_hash_seconds": cost["hash_seconds"], "ledger_calls": cost["calls"],
            "ledger_gas": cost["gas"], "ledger_call_seconds": cost["call_seconds"], "participant_commit_seconds_max": max(commit_time),
            "participant_commit_gas": int(np.mean(chain.gas.get("commit", [0]))),
            "aggregate_seconds": rec["aggregate_seconds"]}


def gas(n: int, *, rpc: Optional[str] = None) -> Dict[str, Any]:
    """Gas of one ledger round with n participants that all commit, straight on the contract (no
    server): open, each commit, close, the listing (256 per transaction) and the record.

    >>> g = gas(2)
    >>> g["list_participants_txs"], g["open_round"] > 0
    (1, True)
    """
    from . import EvmLedger, connect, crypto, embedded, merkle

    w3 = connect(rpc) if rpc else embedded(accounts=n + 2)
    owner, agg, *people = w3.eth.accounts[:n + 2]
    if len(people) < n:
        raise ValueError(f"the chain has {len(people) + 2} accounts; {n + 2} are needed")
    chain = EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=10**18)
    for a in people:
        chain.register(a, bytes(31) + b"\x01", 2 * 10**18)
    key = crypto.round_key(1, 0)
    chain.open_round(key, n + 10)
    com = {a: crypto.commitment(key, a, bytes([i % 256]) * 32) for i, a in enumerate(people)}
    for a in people:
        chain.commit(a, key, com[a])
    chain.close_commits(key)
    leaves = [merkle.leaf(a, com[a], merkle.AGGREGATED) for a in people]
    chain.record_round(key, b"\x01" * 32, b"\x02" * 32, merkle.root(leaves), b"\x03" * 32,
                       [(a, merkle.AGGREGATED) for a in people])
    g = chain.gas
    listing = sum(g.get("list_participants", []))
    return {"n": n, "backend": rpc or "embedded py-evm", "open_round": g["open_round"][0],
            "commit_each": int(np.mean(g["commit"])) if n else 0, "commit_max": max(g["commit"], default=0),
            "close_commits": g["close_commits"][0], "list_participants": listing,
            "list_participants_txs": len(g.get("list_participants", [])), "record_round": g["record_round"][0],
            "aggregator_total": g["open_round"][0] + g["close_commits"][0] + listing + g["record_round"][0],
            "register_each": int(np.mean(g["register"])) if n else 0, "deploy": g["deploy"][0]}
