"""``fedagg audit``: verify recorded rounds from the chain plus the bundles the server wrote."""

from __future__ import annotations

import json
from pathlib import Path


def add_commands(sub, int_at_least) -> None:
    a = sub.add_parser("audit", help="verify recorded rounds against the chain and their bundles",
                       description="Checks each round bundle (a folder the server wrote, or a folder of them) "
                                   "against the registry contract: the contract's code, the recorded hashes "
                                   "(manifest, model, previous model), every commitment, the Merkle root, each "
                                   "update's bytes against its commitment, the evidence behind each "
                                   "'contradicted' code, the policy, and the model recomputed from the updates. "
                                   "Exit status 0 when every check of every round passes, 1 otherwise.")
    a.add_argument("--rpc", required=True, help="JSON-RPC URL of the chain (e.g. http://127.0.0.1:8545)")
    a.add_argument("--contract", required=True, help="address of the fedagg registry contract")
    a.add_argument("bundle", type=Path, help="a round's bundle folder, or a folder of them")
    a.add_argument("--no-recompute", action="store_true", help="skip recomputing the model from the updates")
    a.set_defaults(func=_audit)


def _audit(args) -> int:
    from . import EvmLedger, audit_bundles, audit_round, connect

    if not args.bundle.is_dir():
        raise SystemExit(f"fedagg audit: {args.bundle} is not a folder")
    chain = EvmLedger(connect(args.rpc), args.contract)
    if (args.bundle / "manifest.json").is_file():
        reports = [audit_round(chain, args.bundle, recompute=not args.no_recompute)]
    else:
        reports = audit_bundles(chain, args.bundle, recompute=not args.no_recompute)
        if not reports:
            raise SystemExit(f"fedagg audit: no round bundle in {args.bundle}")
    print(json.dumps({"ok": all(r.ok for r in reports), "rounds": [r.as_dict() for r in reports]}, indent=2))
    return 0 if all(r.ok for r in reports) else 1
