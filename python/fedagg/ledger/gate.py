"""The server's and the participants' side of the ledger.

Server (``LedgerGate``), per round, off the hot path: read the policy and open the round on
chain (keyed by session and round), snapshot the registry (one batched read); after the
commit phase, close the commit window and read every commitment (one batched read); check
each update against the snapshot (registered, staked, not slashed), its Ed25519 signature and
its commitment before its bytes reach the aggregator; at the close, list every participant
that committed with its fate, record the round (model hash chained to the previous one,
Merkle root, bundle hash) and write the round's bundle (ledger/bundle.py). Participant
(``LedgerParticipant``): register and stake once; per round, commit the update's hash on
chain, check on chain that the commit window closed, then reveal (upload) it signed.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np

from . import bundle, crypto, merkle
from .audit import model_hash
from .base import Ledger
from .evm import Entry, LedgerError

SCORE_SCALE = 1_000_000  # scores in the bundle are integers: weight in the aggregate x 1e6
REPLAY_LOOKBACK = 16  # rounds searched to tell a replayed signature from a wrong one


@dataclass
class RoundCost:
    """Time and gas the ledger cost the aggregator in one round."""

    seconds: float = 0.0  # in chain calls
    gas: Dict[str, int] = field(default_factory=dict)
    calls: int = 0
    hash_seconds: float = 0.0  # hashing uploads to check them against their commitments
    call_seconds: Dict[str, float] = field(default_factory=dict)  # per kind of chain call


class LedgerGate:
    """Admission, verification and records of ledger-validated participants, for fedagg.transport.Server."""

    def __init__(self, chain: Ledger, *, commit_seconds: float = 5.0, window_blocks: int = 1_000_000,
                 stake_weighted: bool = False, poll_seconds: float = 0.25, bundle_dir: Optional[str] = None,
                 keep_updates: bool = True):
        """commit_seconds: the longest commit phase; it ends sooner once every admitted participant
        has committed (checked every poll_seconds). bundle_dir: where each recorded round's bundle
        is written (None: the bundle's hash is still recorded, the folder is not written);
        keep_updates: the bundle keeps the aggregated updates' bytes (so an audit can recompute the
        model), else only their hashes."""
        if commit_seconds < 0 or poll_seconds <= 0:
            raise ValueError("commit_seconds must be >= 0 and poll_seconds > 0")
        if window_blocks < 1:
            raise ValueError("window_blocks must be >= 1")
        self.poll_seconds = float(poll_seconds)
        self.chain = chain
        self.commit_seconds = float(commit_seconds)
        self.window_blocks = int(window_blocks)
        self.stake_weighted = stake_weighted
        self.bundle_dir = None if bundle_dir is None else Path(bundle_dir)
        self.keep_updates = bool(keep_updates) and self.bundle_dir is not None
        self.policy = chain.policy()
        self.min_stake = self.policy.min_stake
        self.snapshot: Dict[str, Entry] = {}
        self.commitments: Optional[Dict[str, bytes]] = None
        self.cost = RoundCost()
        self.round, self.session, self.key = -1, 0, 0
        self.revealed: Dict[str, bytes] = {}  # address -> SHA-256 of the update it revealed, once verified
        self.refusals: Dict[str, Dict[str, str]] = {}  # address -> the server's last refusal this round
        self.evidence: Dict[str, Dict[str, str]] = {}  # address -> revealed hash + signature contradicting it
        self.encodings: Dict[str, str] = {}
        self.last_bundle: Optional[Path] = None

    def _timed(self, fn, kind: str):
        before = {k: len(v) for k, v in self.chain.gas.items()}
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            dt = time.monotonic() - t0
            self.cost.seconds += dt
            self.cost.call_seconds[kind] = self.cost.call_seconds.get(kind, 0.0) + dt
            self.cost.calls += 1
            for k, v in self.chain.gas.items():
                new = v[before.get(k, 0):]
                if new:
                    self.cost.gas[k] = self.cost.gas.get(k, 0) + sum(new)

    # ---------------------------------------------------------------- the round
    def start_round(self, rnd: int, session: int) -> None:
        """Read the policy, open round (session, rnd) on chain (a retry finds it open) and snapshot
        the registry. Raises LedgerError when this server's account is not the policy's aggregator."""
        self.round, self.session, self.key = rnd, int(session), crypto.round_key(session, rnd)
        self.commitments, self.cost = None, RoundCost()
        self.revealed, self.refusals, self.evidence, self.encodings = {}, {}, {}, {}
        if self.bundle_dir is not None:  # a pending bundle of an earlier try of this round
            shutil.rmtree(self._pending(), ignore_errors=True)
        self.policy = self._timed(self.chain.policy, "policy")
        self.min_stake = self.policy.min_stake
        if _checksum(self.policy.aggregator) != _checksum(self.chain.aggregator):
            raise LedgerError(f"the chain's policy names {self.policy.aggregator} as the aggregator, not this "
                              f"server's account {self.chain.aggregator}")
        if self.chain.deadline(self.key) == 0:
            self._timed(lambda: self.chain.open_round(self.key, self.window_blocks), "open_round")
        self.snapshot = self._timed(self.chain.snapshot, "snapshot")

    def admit(self, address: str) -> Optional[str]:
        """None if `address` may take part this round, else the reason."""
        e = self.snapshot.get(_checksum(address))
        if e is None or not e.registered:
            return "unregistered"
        if e.slashed:
            return "slashed"
        if e.stake < self.min_stake:
            return "unstaked"
        return None

    def all_committed(self) -> bool:
        """Whether every participant the snapshot admits has committed (one batched read), so the
        commit window may close before ``commit_seconds``."""
        eligible = [a for a in self.snapshot if self.admit(a) is None]
        if not eligible:
            return False
        got = self._timed(lambda: self.chain.commitments(self.key, eligible), "commitments")
        return len(got) == len(eligible)

    def commit_count(self) -> int:
        """How many participants committed in this round so far (one view call)."""
        return int(self._timed(lambda: self.chain.commit_count(self.key), "commit_count"))

    def close_commits(self) -> None:
        """End the commit window and read every commitment in one batched call: the contract takes
        none after this, so the set is final."""
        def run():
            self.chain.close_commits(self.key)
            return self.chain.commitments(self.key, list(self.snapshot))
        self.commitments = self._timed(run, "close_commits")

    def check(self, address: str, digest: bytes, signature: bytes, *, session: int) -> Optional[str]:
        """None if the update with this SHA-256 and signature is admissible, else the reason.

        `session`: the server's session id, which the signature must cover."""
        address = _checksum(address)
        why = self.admit(address)
        if why:
            return why
        key = self.snapshot[address].signing_key
        where = self.chain.signing_domain()
        if not crypto.verify(key, self.round, digest, signature, session=session, domain=where):
            for old in range(max(0, self.round - REPLAY_LOOKBACK), self.round):
                if crypto.verify(key, old, digest, signature, session=session, domain=where):
                    return "replayed"
            return "signature"
        if self.commitments is None:
            return "commit-phase"
        got = self.commitments.get(address)
        if got is None:
            return "uncommitted"
        if got != crypto.commitment(self.key, address, digest):
            # signed by its key, yet not what it committed: the evidence goes in the bundle
            self.evidence[address] = {"update_sha256": digest.hex(), "signature": bytes(signature).hex()}
            return "commitment"
        self.revealed[address] = bytes(digest)
        return None

    def refused(self, address: str, reason: str, detail: str = "") -> None:
        """The server refused this participant's message this round (the bundle says why)."""
        self.refusals[_checksum(address)] = {"reason": reason, "detail": detail[:300]}

    def _pending(self) -> Path:
        return self.bundle_dir / f".pending-{self.key:x}"

    def keep(self, address: str, data, encoding: str) -> None:
        """An update about to be aggregated: its encoding, and (keep_updates) its bytes, written to the
        round's pending bundle; `data` may be None when keep_updates is off."""
        address = _checksum(address)
        self.encodings[address] = encoding
        if self.keep_updates and data is not None:
            folder = self._pending()
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{address}.bin").write_bytes(memoryview(data).cast("B"))

    def weights(self, addresses: Sequence[str]) -> np.ndarray:
        return np.array([float(self.snapshot[_checksum(a)].stake) for a in addresses])

    def record(self, model: np.ndarray, prev_model: np.ndarray, accepted: Sequence[str], scores: Sequence[int],
               excluded_by_rule: Iterable[str], run: Dict[str, Any]) -> Dict[str, Any]:
        """List every participant that committed with its code, record the round, write its bundle.

        accepted: the aggregated participants in aggregation order; scores: their weight in the
        aggregate x SCORE_SCALE; run: how the server aggregated (rule, f, rule_params, clip_norm,
        server_lr, dp, privacy, weights; a buffered server: mode, staleness, max_staleness and each
        update's base version and staleness scale, in `accepted`'s order). Returns {"bundle": folder
        or None, "bundle_hash": hex}."""
        accepted = [_checksum(a) for a in accepted]
        excluded = {_checksum(a) for a in excluded_by_rule}
        score = dict(zip(accepted, (int(s) for s in scores)))
        weight = dict(zip(accepted, (float(w) for w in run.get("weights") or [1.0] * len(accepted))))
        per_update = {k: dict(zip(accepted, run[k])) for k in ("bases", "scales") if run.get(k) is not None}
        committed = dict(self.commitments or {})
        leaves, listing = [], []
        for a in sorted(committed, key=lambda x: int(x, 16)):
            if a in score:
                code = merkle.EXCLUDED if a in excluded else merkle.AGGREGATED
            elif self.refusals.get(a, {}).get("reason") == "commitment":
                code = merkle.CONTRADICTED
            else:
                code = merkle.REFUSED
            entry = {"address": a, "commitment": committed[a].hex(), "code": code}
            if a in score:
                entry.update(update_sha256=self.revealed[a].hex(), score=score[a], weight=weight[a],
                             encoding=self.encodings.get(a, "float32"))
                if per_update:  # buffered: the version it was computed on (in its hash) and its weight
                    entry.update(base=int(per_update["bases"][a]), scale=float(per_update["scales"][a]))
            else:
                entry["refusal"] = self.refusals.get(a, {"reason": "never revealed", "detail": ""})
            leaves.append(entry)
            listing.append((a, code))
        missing = [a for a in accepted if a not in committed]
        if missing:
            raise LedgerError(f"aggregated participants without a commitment: {missing}")
        root = merkle.root([merkle.leaf(e["address"], bytes.fromhex(e["commitment"]), e["code"]) for e in leaves])
        manifest = {
            "format": bundle.FORMAT, "chain_id": int.from_bytes(self.chain.signing_domain()[:32], "big"),
            "contract": _checksum(getattr(self.chain, "address", "0x" + "00" * 20)),
            "session": self.session, "round": self.round, "round_key": hex(self.key),
            "model_hash": model_hash(model).hex(), "prev_model_hash": model_hash(prev_model).hex(),
            "d": int(np.size(model)), "merkle_root": root.hex(), "leaves": leaves, "order": accepted,
            "refusals": {a: r for a, r in self.refusals.items() if a not in score},
            "evidence": self.evidence,
            "policy": {"rule": self.policy.rule, "f": self.policy.f, "epsilon_micro": self.policy.epsilon_micro,
                       "min_stake": str(self.policy.min_stake), "aggregator": self.policy.aggregator,
                       "max_slash_bps": self.policy.max_slash_bps},
            "run": {k: v for k, v in run.items() if k not in ("weights", "bases", "scales")},
            "updates_kept": self.keep_updates,
        }
        digest = bundle.bundle_hash(manifest)
        self._timed(lambda: self.chain.record_round(self.key, model_hash(model), model_hash(prev_model), root,
                                                    digest, listing), "record_round")
        folder = None
        if self.bundle_dir is not None:
            folder = bundle.write(self.bundle_dir, manifest, model, prev_model, self._pending())
            self.last_bundle = folder
        return {"bundle": None if folder is None else str(folder), "bundle_hash": digest.hex(),
                "merkle_root": root.hex(), "round_key": hex(self.key)}


class LedgerParticipant:
    """A participant's chain side: its account and Ed25519 key."""

    def __init__(self, chain: Ledger, account: str, secret: Optional[bytes] = None):
        self.chain = chain
        self.account = _checksum(account)
        if secret is None:
            self.public, self.secret = crypto.keypair()
        else:
            from nacl.signing import SigningKey

            self.secret, self.public = bytes(secret), bytes(SigningKey(bytes(secret)).verify_key)

    def register(self, stake: int) -> None:
        self.chain.register(self.account, self.public, stake)

    def commit(self, rnd: int, update: Any, *, session: int, base: Optional[int] = None) -> bytes:
        """Commit the update's hash for round `rnd` of server session `session` (``Client.state
        ["session"]``); returns the signature to send with it (bound to the session and round).
        A buffered server's round is the model version being built, and `base` the version the
        update was computed on (its hash covers it)."""
        digest = crypto.update_hash(update, base)
        key = crypto.round_key(session, rnd)
        self.chain.commit(self.account, key, crypto.commitment(key, self.account, digest))
        return crypto.sign(self.secret, rnd, digest, session=session, domain=self.chain.signing_domain())

    def sign(self, rnd: int, update: Any, *, session: int, base: Optional[int] = None) -> bytes:
        return crypto.sign(self.secret, rnd, crypto.update_hash(update, base), session=session,
                           domain=self.chain.signing_domain())

    def window_closed(self, rnd: int, *, session: int) -> bool:
        """Whether the chain itself says round `rnd`'s commit window is over (opened, deadline passed)."""
        deadline = self.chain.deadline(crypto.round_key(session, rnd))
        return deadline != 0 and self.chain.block_number() > deadline

    def submit(self, client, update: Any, rnd: int, *, base: Optional[int] = None, timeout: float = 120.0,
               poll: float = 0.2) -> Dict[str, Any]:
        """The whole participant side of a ledger round on a connected fedagg.transport.Client:
        commit on chain, wait until the chain (never the server's word alone) shows the commit
        window closed, then upload the update signed. A buffered server: `rnd` is the version being
        built (STATE's round in its commit phase), `base` the version the update was computed on.
        Raises LedgerError when the window does not close on chain within `timeout` seconds (the
        update is not revealed)."""
        session = int(client.state["session"])
        signature = self.commit(rnd, update, session=session, base=base)
        self.wait_window_closed(rnd, session=session, timeout=timeout, poll=poll)
        return client.submit(update, rnd if base is None else base, signature=signature)

    def wait_window_closed(self, rnd: int, *, session: int, timeout: float = 120.0, poll: float = 0.2) -> None:
        """Return once the chain shows round `rnd`'s commit window closed; LedgerError after `timeout` s."""
        end = time.monotonic() + timeout
        while not self.window_closed(rnd, session=session):
            if time.monotonic() > end:
                raise LedgerError(f"round {rnd}: the commit window is still open on chain after {timeout:.0f} s; "
                                  "the update is not revealed")
            time.sleep(poll)


def _checksum(address: str) -> str:
    from eth_utils import to_checksum_address

    return to_checksum_address(address)


__all__ = ["LedgerError", "LedgerGate", "LedgerParticipant", "RoundCost", "SCORE_SCALE"]
