"""One demo participant, as its own process: registers and stakes on the chain, then each
round fetches the global model over ZeroMQ, trains on its shard, commits its update's hash
on chain, and uploads the update signed (Byzantine ones upload their attack instead).

    python -m fedagg.demo.participant --endpoint tcp://127.0.0.1:PORT --index 3 ... (see --help)
"""

from __future__ import annotations

import argparse
import json
import sys
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
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from ..integrations.torch import Participant
    from ..transport import Client, TransportError

    a = parse(argv)
    torch.set_num_threads(1)  # many processes share two cores
    with np.load(a.data) as shard:  # this participant's data only
        X, y = shard["X"], shard["y"]
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
                if a.attack == "alie":  # honest updates on halves of its data: the spread to hide in
                    estimates = tuple(_honest_on(me, model, X, y, a, rnd, k) for k in range(4))
                update = task.attack(a.attack, update.numpy(), rng, estimates=estimates,
                                     n=a.participants, f=a.byzantine)
                if codec is not None:
                    update = codec.encode(update)
            elif codec is None:
                update = update.numpy()
            t1 = time.monotonic()
            sig = signer.commit(rnd, update) if signer else None
            print(f"{pid}: round {rnd}: trained in {t1 - t0:.2f} s, committed in {time.monotonic() - t1:.2f} s",
                  file=sys.stderr)
            try:
                c.submit(update, rnd, signature=sig)
            except TransportError as e:
                print(f"{pid}: round {rnd} refused: {e.reason} {e.detail}", file=sys.stderr)
            last = rnd
    return 0


def _honest_on(me, model, X, y, a, rnd: int, k: int) -> np.ndarray:
    half = np.random.default_rng([a.seed, a.index, rnd, k]).permutation(len(X))[: max(1, len(X) // 2)]
    me.begin(model)
    task.train(me.params.module, X[half], y[half], epochs=a.epochs, lr=a.lr, seed=k)
    return me.update().numpy()


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
