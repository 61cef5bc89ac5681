"""Audit a recorded round from the chain plus the round's bundle (ledger/bundle.py).

What is checked, each as a named entry of ``AuditReport.checks``:

- ``contract_code``: the code at the contract address is the genuine Registry's;
- ``round``: the manifest names this chain, this contract, and the round key of its session
  and round; the round is recorded on chain;
- ``bundle_hash``, ``model_hash``, ``prev_model_hash``: the manifest, the model and the model
  the round started from are the ones recorded;
- ``commitments``: every leaf's commitment is the participant's commitment on chain, and the
  leaves are every participant that committed (their count is the contract's, the contract's
  own hash chain over them matches), so no one was left out silently;
- ``merkle_root``: the recorded root is the root of those leaves;
- ``reveals``: each aggregated participant's revealed hash matches its commitment, and (when the
  bundle keeps the updates) the bytes match that hash: a flipped bit names the participant;
- ``evidence``: each CONTRADICTED code carries a signature by the participant's registered key
  over a hash that is not the committed one;
- ``policy``: the rule and f the server ran are the chain's policy (when it sets one);
- ``model``: with the updates kept and no DP noise, the model recomputed from the previous
  model, the updates and the recorded rule is the recorded model (bit for bit, or within float32
  rounding where the server's streaming mean sums in another order: said which).

Participants that committed but are not in the aggregate are listed with the reason the
server gave (``left_out``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from . import bundle, crypto, merkle


def model_hash(model: np.ndarray) -> bytes:
    """keccak256 of the model's float32 little-endian bytes (what the aggregator records)."""
    from eth_utils import keccak

    return keccak(np.ascontiguousarray(model, dtype="<f4").tobytes())


@dataclass
class AuditReport:
    session: int
    round: int
    checks: Dict[str, bool] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)  # what failed, naming the participant where one is at fault
    left_out: Dict[str, Dict[str, str]] = field(default_factory=dict)  # committed, not aggregated: code + reason
    model_recomputed: str = "not recomputed"

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    def fail(self, check: str, why: str) -> None:
        self.checks[check] = False
        self.problems.append(why)

    def as_dict(self) -> Dict[str, Any]:
        return {"session": self.session, "round": self.round, "ok": self.ok, "checks": self.checks,
                "problems": self.problems, "left_out": self.left_out, "model_recomputed": self.model_recomputed}


def audit_round(chain, folder, *, recompute: bool = True) -> AuditReport:
    """Verify the round whose bundle is in `folder` against `chain` (an EvmLedger on the registry)."""
    from eth_utils import keccak, to_checksum_address

    from .evm import LedgerError, runtime_code

    folder = Path(folder)
    manifest, raw = bundle.load(folder)
    session, rnd = int(manifest["session"]), int(manifest["round"])
    rep = AuditReport(session, rnd)
    rep.checks["contract_code"] = chain.code() == runtime_code()
    if not rep.checks["contract_code"]:
        rep.problems.append(f"the code at {chain.address} is not the fedagg Registry")
    key = crypto.round_key(session, rnd)
    domain = chain.signing_domain()
    rep.checks["round"] = (int(manifest["round_key"], 16) == key and to_checksum_address(manifest["contract"]) ==
                           chain.address and int(manifest["chain_id"]) == int.from_bytes(domain[:32], "big"))
    if not rep.checks["round"]:
        rep.problems.append("the manifest names another chain, contract or round key")
    try:
        rec = chain.round_record(key)
    except LedgerError as e:
        rep.fail("round", f"round {rnd} of session {session} is not recorded on chain: {e}")
        return rep
    _expect(rep, "bundle_hash", keccak(raw) == rec.bundle_hash, "the manifest is not the one recorded on chain")
    model = np.load(folder / "model.npy", allow_pickle=False)
    prev = np.load(folder / "prev_model.npy", allow_pickle=False)
    _expect(rep, "model_hash", model_hash(model) == rec.model_hash, "model.npy is not the recorded model")
    _expect(rep, "prev_model_hash", model_hash(prev) == rec.prev_model_hash,
            "prev_model.npy is not the model the round started from")

    leaves = manifest["leaves"]
    addrs = [to_checksum_address(e["address"]) for e in leaves]
    on_chain = chain.commitments(key, addrs)
    hashes, ok = [], True
    for e, a in zip(leaves, addrs):
        c = bytes.fromhex(e["commitment"])
        if on_chain.get(a) != c:
            ok = False
            rep.problems.append(f"{a}: the bundle's commitment is not its commitment on chain")
        hashes.append(merkle.leaf(a, c, int(e["code"])))
    in_order = sorted(range(len(addrs)), key=lambda i: int(addrs[i], 16))
    complete = (len(leaves) == rec.listed == chain.commit_count(key) and
                merkle.chain([hashes[i] for i in in_order]) == rec.leaves_hash)
    if not complete:
        ok = False
        rep.problems.append(f"the bundle lists {len(leaves)} participants; {rec.listed} are recorded and "
                            f"{chain.commit_count(key)} committed on chain (or the listed leaves differ)")
    rep.checks["commitments"] = ok
    _expect(rep, "merkle_root", merkle.root(hashes) == rec.merkle_root == bytes.fromhex(manifest["merkle_root"]),
            "the recorded Merkle root is not the root of the bundle's leaves")

    snapshot = chain.snapshot(addrs) if addrs else {}
    run, policy = manifest.get("run", {}), manifest.get("policy", {})
    buffered = run.get("mode") == "buffered"
    weigh = _staleness(rep, run, rnd) if buffered else None
    rep.checks["reveals"] = rep.checks["evidence"] = True
    rows: Dict[str, bytes] = {}
    for e, a in zip(leaves, addrs):
        code = int(e["code"])
        if code in (merkle.AGGREGATED, merkle.EXCLUDED):
            digest = bytes.fromhex(e["update_sha256"])
            base = None
            if buffered:  # the version it was computed on is in its hash: the staleness weight must follow
                base, scale = e.get("base"), e.get("scale")
                if not (isinstance(base, int) and weigh is not None
                        and rnd - int(run.get("max_staleness", 0)) <= base <= rnd and scale == weigh(rnd - base)):
                    rep.fail("staleness", f"{a}: computed on version {base!r}, weighed {scale!r} in version {rnd}: "
                             f"not what staleness {run.get('staleness')!r} with max_staleness "
                             f"{run.get('max_staleness')!r} gives")
                    base = None if not isinstance(base, int) or not 0 <= base < 1 << 64 else base
            if crypto.commitment(key, a, digest) != on_chain.get(a):
                rep.fail("reveals", f"{a}: the update aggregated is not the one it committed")
            if manifest.get("updates_kept"):
                path = folder / "updates" / f"{a}.bin"
                data = path.read_bytes() if path.is_file() else None
                if data is None:
                    rep.fail("reveals", f"{a}: its update is missing from the bundle")
                elif crypto.update_hash(data, base) != digest:
                    rep.fail("reveals", f"{a}: its update's bytes do not match its commitment")
                else:
                    rows[a] = data
        if code != merkle.AGGREGATED:
            rep.left_out[a] = {"code": merkle.CODES[code],
                               "reason": (e.get("refusal") or {}).get("reason", "excluded by the rule")}
        if code == merkle.CONTRADICTED:
            ev = manifest.get("evidence", {}).get(a)
            entry = snapshot.get(a)
            good = (ev is not None and entry is not None and
                    crypto.verify(entry.signing_key, rnd, bytes.fromhex(ev["update_sha256"]),
                                  bytes.fromhex(ev["signature"]), session=session, domain=domain) and
                    crypto.commitment(key, a, bytes.fromhex(ev["update_sha256"])) != on_chain.get(a))
            if not good:
                rep.fail("evidence", f"{a}: marked as contradicting its commitment without valid evidence")

    _expect(rep, "policy", not policy.get("rule") or (run.get("rule") == policy["rule"] and
                                                      int(run.get("f", 0)) == int(policy.get("f", 0))),
            f"the server ran {run.get('rule')!r} with f = {run.get('f')}; the chain's policy says "
            f"{policy.get('rule')!r} with f = {policy.get('f')}")
    if recompute and manifest.get("updates_kept") and rep.checks["reveals"] and rep.checks.get("staleness", True):
        _recompute(rep, manifest, prev, model, rows, leaves)
    return rep


def _staleness(rep: AuditReport, run, rnd: int):
    """A buffered round's staleness weight function (None, and a failed check, if the manifest's is unknown)."""
    from ..transport.staleness import staleness_weight

    try:
        weigh = staleness_weight(run.get("staleness"))
    except (TypeError, ValueError) as e:
        rep.fail("staleness", f"the round's staleness weight is unknown: {e}")
        return None
    rep.checks.setdefault("staleness", True)
    return weigh


def _expect(rep: AuditReport, check: str, ok: bool, why: str) -> None:
    if ok:
        rep.checks.setdefault(check, True)
    else:
        rep.fail(check, why)


def _decode(data: bytes, encoding: str, d: int) -> np.ndarray:
    if encoding == "float32":
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    from ..compress import Payload, decode
    from ..transport.protocol import unpack_frames

    return np.asarray(decode(Payload.from_frames(unpack_frames(memoryview(data)))), dtype=np.float32).reshape(d)


def _recompute(rep: AuditReport, manifest, prev, model, rows, leaves) -> None:
    """The model again from the previous model, the kept updates and the recorded rule."""
    from .. import aggregate

    run = manifest.get("run", {})
    if run.get("dp") is not None:
        rep.model_recomputed = "not recomputed: the round added DP noise"
        return
    by = {e["address"]: e for e in leaves}
    order = manifest["order"]
    if not order:
        rep.model_recomputed = "not recomputed: no update was aggregated"
        return
    d = int(manifest["d"])
    stack = np.stack([_decode(rows[a], by[a].get("encoding", "float32"), d) for a in order])
    scales = np.array([float(by[a].get("scale", 1.0)) for a in order])
    kw = dict(run.get("rule_params") or {})
    if run.get("clip_norm") is not None:
        kw["clip_norm"] = float(run["clip_norm"])
    if run.get("stake_weighted"):
        kw["weights"] = np.array([float(by[a]["weight"]) for a in order])
    if run.get("streamed_mean"):
        agg = _streamed_mean(stack, kw.get("weights"), kw.get("clip_norm"), scales)
    else:
        stack *= scales.astype(np.float32)[:, None]  # a buffered server's rows: scale * update, in float32
        agg = np.asarray(aggregate(stack, run["rule"], int(run.get("f", 0)), **kw), dtype=np.float32)
    lr = np.float32(run.get("server_lr", 1.0))
    with np.errstate(over="ignore", invalid="ignore"):
        again = (agg * lr if lr != 1.0 else agg) + prev
    if model_hash(again) == model_hash(model):
        rep.model_recomputed = "exact"
        rep.checks["model"] = True
        return
    scale = max(1.0, float(np.max(np.abs(again))) if again.size else 1.0)
    err = float(np.max(np.abs(again.astype(np.float64) - model))) if again.size else 0.0
    if run.get("streamed_mean") and run.get("clip_norm") is not None and err <= 1e-5 * scale:
        # the clip scale comes from the server's float32 norm kernel, recomputed here in float64
        rep.model_recomputed = f"within float32 rounding (max difference {err:.3g}: clipping norms)"
        rep.checks["model"] = True
    else:
        rep.fail("model", f"the recorded model is not what the rule gives on the updates (max difference {err:.3g})")


def _streamed_mean(stack: np.ndarray, weights, clip_norm, scales) -> np.ndarray:
    """The server's streaming mean (transport/rounds.py MeanFold): acc += (w_i k_i s_i) * x_i in
    float64, in aggregation order, each product rounded (k_i: a buffered server's staleness scale,
    s_i: the clip of k_i x_i); then acc / sum(w) as float32."""
    w = np.ones(len(stack)) if weights is None else np.asarray(weights, dtype=np.float64)
    acc = np.zeros(stack.shape[1], dtype=np.float64)
    for x, wi, k in zip(stack, w, scales):
        x64 = x.astype(np.float64)
        s = 1.0
        if clip_norm is not None:
            norm = k * float(np.sqrt(np.dot(x64, x64)))
            s = min(1.0, float(clip_norm) / max(norm, np.finfo(np.float64).tiny))
        acc += np.float64(wi * k * s) * x64
    return (acc / float(np.sum(w))).astype(np.float32)


def audit_bundles(chain, root, *, recompute: bool = True) -> List[AuditReport]:
    """Audit every bundle folder under `root`, in session and round order."""
    return [audit_round(chain, p, recompute=recompute) for p in sorted(Path(root).iterdir())
            if p.is_dir() and not p.name.startswith(".") and (p / "manifest.json").is_file()]


__all__ = ["AuditReport", "audit_bundles", "audit_round", "model_hash"]
