"""The server's and the participants' side of the ledger.

Server (``LedgerGate``), per round, off the hot path: open the round on chain
and snapshot the registry (one batched read); after the commit phase, close the
commit window and read every commitment (one batched read); check each update
against the snapshot (registered, staked, not slashed), its Ed25519 signature
and its commitment before its bytes reach the aggregator; record the round's
outcome. Participant (``LedgerParticipant``): register and stake once; per
round, commit the update's hash on chain, then sign it for the upload.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

import numpy as np

from . import crypto, merkle
from .audit import model_hash
from .base import Ledger
from .evm import Entry, LedgerError

SCORE_SCALE = 1_000_000  # scores on chain are integers: weight in the aggregate x 1e6
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
    """Admission and verification of ledger-validated participants, for fedagg.transport.Server."""

    def __init__(self, chain: Ledger, *, commit_seconds: float = 5.0, window_blocks: int = 1_000_000,
                 stake_weighted: bool = False, poll_seconds: float = 0.25):
        """commit_seconds: the longest commit phase; it ends sooner once every admitted participant
        has committed (checked every poll_seconds)."""
        if commit_seconds < 0 or poll_seconds <= 0:
            raise ValueError("commit_seconds must be >= 0 and poll_seconds > 0")
        self.poll_seconds = float(poll_seconds)
        self.chain = chain
        self.commit_seconds = float(commit_seconds)
        self.window_blocks = int(window_blocks)
        self.stake_weighted = stake_weighted
        self.min_stake = chain.min_stake()
        self.snapshot: Dict[str, Entry] = {}
        self.commitments: Optional[Dict[str, tuple]] = None
        self.cost = RoundCost()
        self.round = -1

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
    def start_round(self, rnd: int) -> None:
        self.round, self.commitments, self.cost = rnd, None, RoundCost()
        if self.chain.deadline(rnd) == 0:  # not opened yet (a restarted server finds it open)
            self._timed(lambda: self.chain.open_round(rnd, self.window_blocks), "open_round")
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
        got = self._timed(lambda: self.chain.commitments(self.round, eligible), "commitments")
        return len(got) == len(eligible)

    def close_commits(self) -> None:
        """End the commit window and read every commitment of the snapshot in one batched call."""
        def run():
            self.chain.close_commits(self.round)
            return self.chain.commitments(self.round, list(self.snapshot))
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
        if got is None:  # not there at the close: ask once more, to name a late commitment as such
            got = self._timed(lambda: self.chain.commitments(self.round, [address]), "commitments").get(address)
            if got is None:
                return "uncommitted"
        value, late = got
        if late:
            return "late-commit"
        if value != crypto.commitment(self.round, address, digest):
            return "commitment"
        return None

    def weights(self, addresses: Sequence[str]) -> np.ndarray:
        return np.array([float(self.snapshot[_checksum(a)].stake) for a in addresses])

    def record(self, model: np.ndarray, accepted: Sequence[str], scores: Sequence[int]) -> None:
        addrs = [_checksum(a) for a in accepted]
        self._timed(lambda: self.chain.record_round(self.round, model_hash(model), merkle.root(addrs), addrs,
                                                    [int(s) for s in scores]), "record_round")


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

    def commit(self, rnd: int, update: Any, *, session: int) -> bytes:
        """Commit the update's hash for round `rnd`; returns the signature to send with it.

        `session`: the server's session id (``Client.state["session"]``), bound into the signature."""
        digest = crypto.update_hash(update)
        self.chain.commit(self.account, rnd, crypto.commitment(rnd, self.account, digest))
        return crypto.sign(self.secret, rnd, digest, session=session, domain=self.chain.signing_domain())

    def sign(self, rnd: int, update: Any, *, session: int) -> bytes:
        return crypto.sign(self.secret, rnd, crypto.update_hash(update), session=session,
                           domain=self.chain.signing_domain())


def _checksum(address: str) -> str:
    from eth_utils import to_checksum_address

    return to_checksum_address(address)


__all__ = ["LedgerError", "LedgerGate", "LedgerParticipant", "RoundCost", "SCORE_SCALE"]
