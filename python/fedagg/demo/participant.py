"""One demo participant, as its own process: registers and stakes on the chain, then each
round fetches the global model over ZeroMQ, trains on its shard, commits its update's hash
on chain, and uploads the update signed (Byzantine ones upload their attack instead).

    python -m fedagg.demo.participant --endpoint tcp://127.0.0.1:PORT --index 3 ... (see --help)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import numpy as np
import torch

from . import task

STAKE = 2 * 10**18

def parse(argv=None):
    ap = argparse.ArgumentParser(prog="python -m fedagg.demo.participant")
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--index", type=int, required=True)
    ap.add_argument("--data", required=True, help=".npz file with this participant's X and y")
    ap.add_argument("--participants", type=int, required=True)
    ap.add_argument("--byzantine", type=int, default=0, help="how many there are (ALIE's z needs it)")
    ap.add_argument("--attack", choices=task.ATTACKS, default="none")
    ap.add_argument("--rounds", type=int, required=True)
    ap.add_argument("--codec", choices=task.CODECS, default="none")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chain", default=None, help="JSON-RPC URL of the chain (ledger admission)")
    ap.add_argument("--contract", default=None)
    ap.add_argument("--account", default=None)
    ap.add_argument("--abi", default=None, help="JSON file with the contract's ABI (saves compiling it)")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--coalition", default=None, help=".npz of every attacker's X0, y0, X1, y1, ... (alie)")
    ap.add_argument("--until-stdin-closes", action="store_true", help="exit when stdin reaches EOF")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from ..integrations.torch import Participant
    from ..ledger.evm import LedgerError
    from ..transport import Client, TransportError

    a = parse(argv)
    if a.until_stdin_closes:
        _exit_when_stdin_closes()
    torch.set_num_threads(1)  # many processes share two cores
    with np.load(a.data) as shard:  # this participant's data only
        X, y = shard["X"], shard["y"]
    coalition = []  # an ALIE attacker knows the data of every attacker (they collude)
    if a.coalition:
        with np.load(a.coalition) as c:
            coalition = [(c[f"X{k}"], c[f"y{k}"]) for k in range(len(c.files) // 2)]
    if a.attack == "alie" and len(coalition) < 2:
        raise SystemExit("alie needs a coalition of at least 2 attackers (--coalition)")
    net = task.model(a.seed)
    codec = task.make_codec(a.codec)
    me = Participant(net, codec=codec if a.attack == "none" else None)
    rng = np.random.default_rng([a.seed, a.index])

    # torch initialises lazily (about a second here): do it before the rounds, not inside the first.
    task.train(task.model(a.seed), X[:2], y[:2], epochs=1, lr=0.0, seed=0)

    signer = None
    pid = f"p{a.index}"
    if a.chain:
        from ..ledger import EvmLedger, LedgerParticipant, connect

        abi = json.loads(open(a.abi).read()) if a.abi else None
        signer = LedgerParticipant(EvmLedger(connect(a.chain), a.contract, abi=abi), a.account)
        signer.register(STAKE)
        pid = signer.account

    with Client(a.endpoint, pid, timeout=a.timeout) as c:
        last = -1
        for _ in range(a.rounds):
            try:
                if last >= 0:
                    c.wait_round(last, a.timeout)
                rnd, model = c.model()
            except TransportError as e:
                print(f"{pid}: the server is gone ({e.reason}); stopping", file=sys.stderr)
                return 0
            t0 = time.monotonic()
            me.begin(model)
            task.train(net, X, y, epochs=a.epochs, lr=a.lr, seed=a.seed * 1000 + rnd)
            update = me.update()
            if a.attack != "none":
                estimates = ()
                if a.attack == "alie":  # the coalition's honest updates: the spread to hide in
                    estimates = tuple(_honest_on(me, model, Xc, yc, a, rnd, k) for k, (Xc, yc) in enumerate(coalition))
                update = task.attack(a.attack, update.numpy(), rng, estimates=estimates,
                                     n=a.participants, f=a.byzantine)
                if codec is not None:
                    update = codec.encode(update)
            elif codec is None:
                update = update.numpy()
            t1 = time.monotonic()
            sig = None
            if signer is not None:
                sig = _commit(signer, rnd, update, pid, c.state["session"])
                if sig is None:  # not on chain: the server would refuse it; wait for the next round
                    last = rnd
                    continue
            print(f"{pid}: round {rnd}: trained in {t1 - t0:.2f} s, committed in {time.monotonic() - t1:.2f} s",
                  file=sys.stderr)
            try:
                if signer is not None:  # reveal only once the chain itself shows the commit window closed
                    c.wait_phase("upload", a.timeout)
                    signer.wait_window_closed(rnd, session=c.state["session"], timeout=a.timeout, poll=0.1)
                c.submit(update, rnd, signature=sig)
            except TransportError as e:
                print(f"{pid}: round {rnd} refused: {e.reason} {e.detail}", file=sys.stderr)
            except LedgerError as e:  # the window did not close on chain: the update stays unrevealed
                print(f"{pid}: round {rnd} not revealed: {e}", file=sys.stderr)
            last = rnd
    return 0


def _honest_on(me, model, X, y, a, rnd: int, k: int) -> np.ndarray:
    """The honest update of coalition member k: the same in every attacker (same data, same seed),
    so the whole coalition sends one vector, as in Baruch et al. 2019."""
    me.begin(model)
    task.train(me.params.module, X, y, epochs=a.epochs, lr=a.lr, seed=a.seed * 1000 + rnd + 7919 * k)
    return me.update().numpy()


def _exit_when_stdin_closes() -> None:
    """The parent holds our stdin; at its EOF (the parent is gone, however it went) we go too."""
    def watch():
        try:
            sys.stdin.buffer.read()
        finally:
            os._exit(3)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _commit(signer, rnd: int, update, pid: str, session: int, tries: int = 3):
    """Commit on chain, retrying transient failures (a busy node); None if it cannot."""
    from ..ledger import LedgerError

    for attempt in range(tries):
        try:
            return signer.commit(rnd, update, session=session)
        except LedgerError as e:  # the contract said no
            if "already committed" in str(e):  # an earlier try got through; its answer was lost
                return signer.sign(rnd, update, session=session)
            print(f"{pid}: round {rnd}: commit refused: {e}", file=sys.stderr)
            return None
        except OSError as e:  # the node was busy or reset the connection (requests' errors are OSErrors)
            print(f"{pid}: round {rnd}: commit failed ({e}); try {attempt + 1} of {tries}", file=sys.stderr)
        time.sleep(0.2 * (attempt + 1))
    return None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
