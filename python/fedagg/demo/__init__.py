"""``fedagg demo``: federated training under attack, end to end, on one machine.

A chain node (the embedded py-evm chain, served on loopback), the Registry
contract, an aggregation server and N participant processes over ZeroMQ. The
participants register and stake on chain, then each round train a small MLP on
their shard of scikit-learn's digits, commit their update's hash on chain and
upload it signed; some are Byzantine and attack. The server admits only
registered, staked, committed, correctly signed updates, aggregates with the
chosen rule, and records the round on chain. The same run with the plain mean
shows what the robust rule prevented; the accuracy of both goes into a PNG.

Needs the demo extra: ``pip install "fedagg[demo]"`` (torch, scikit-learn,
matplotlib, pyzmq, rich and the ledger's web3/vyper/pynacl).

>>> from fedagg import demo
>>> results = demo.run(demo.Options(rounds=3))        # doctest: +SKIP
"""

from __future__ import annotations

from typing import List, Optional

from .options import DemoError, Options, RoundRow, RunResult, byzantine_indices

__all__ = ["DemoError", "Options", "RoundRow", "RunResult", "run"]


def run(opts: Options, view=None) -> List[RunResult]:
    """The robust run, then (opts.compare) the plain mean under the same attack; writes opts.plot."""
    from .report import View, plot
    from .runner import run_one

    opts.check()
    view = view or View()
    runs = opts.runs()
    bad = ", ".join(f"p{i}" for i in byzantine_indices(opts)) or "none"
    results = []
    for rule, rf in runs:
        view.start_run(f"{rule} (f={rf}): {opts.participants} participants, Byzantine ({opts.attack}): {bad}; "
                       f"admission: {'ledger' if opts.ledger else 'federated'}; codec: {opts.codec}"
                       + (f"; secure: SecAgg+ buckets of {opts.bucket_size}" if opts.secure else ""), opts.rounds)
        try:
            results.append(run_one(opts, rule, rf, view.row, on_step=view.step))
        finally:
            view.end_run()
    path: Optional[str] = plot(results, opts, opts.plot) if opts.plot else None
    view.summary(results, opts, path)
    if opts.keep_chain:
        _serve_chains(results, view)
    return results


def _serve_chains(results, view) -> None:
    """Keep the runs' chain nodes serving until interrupted, so their rounds can be audited."""
    import time

    try:
        for res in results:
            c = res.chain
            view._print(f"audit {res.rule}: fedagg audit --rpc {c['rpc']} --contract {c['contract']} {c['bundles']}")
        view._print("the chains stay up until Ctrl-C")
        while all(res.node is None or res.node.poll() is None for res in results):
            time.sleep(0.5)
    finally:
        for res in results:
            if res.node is not None and res.node.poll() is None:
                res.node.kill()
                res.node.wait(5)
