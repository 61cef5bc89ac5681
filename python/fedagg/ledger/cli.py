"""``fedagg audit``: verify a finished round from the chain alone plus the published model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def add_commands(sub, int_at_least) -> None:
    a = sub.add_parser("audit", help="verify a round record on the chain against the published model",
                       description="Reads the round record (model hash, Merkle root of the accepted "
                                   "participants, their scores) from the registry contract and checks the "
                                   "published model's hash and each named participant's inclusion proof.")
    a.add_argument("--rpc", required=True, help="JSON-RPC URL of the chain (e.g. http://127.0.0.1:8545)")
    a.add_argument("--contract", required=True, help="address of the fedagg registry contract")
    a.add_argument("--round", type=int_at_least(0), required=True, dest="round_id", help="the round to verify")
    a.add_argument("--model", type=Path, required=True, help="the published model (.npy, float32)")
    a.add_argument("--participant", action="append", default=[], help="an address whose inclusion to prove")
    a.set_defaults(func=_audit)


def _audit(args) -> int:
    from . import EvmLedger, audit_round, connect, merkle

    chain = EvmLedger(connect(args.rpc), args.contract)
    model = np.load(args.model, allow_pickle=False)
    rep = audit_round(chain, args.round_id, model, args.participant)
    out = rep.as_dict()
    rec = chain.round_record(args.round_id)
    out["proofs"] = {p: [h.hex() for h in merkle.proof(rec.accepted, p)] for p, ok in rep.included.items() if ok}
    out["merkle_root"] = rec.merkle_root.hex()
    out["model_hash"] = rec.model_hash.hex()
    print(json.dumps(out, indent=2))
    return 0 if rep.ok else 1
