"""Audit a finished round from the chain alone plus the published model."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from . import merkle


def model_hash(model: np.ndarray) -> bytes:
    """keccak256 of the model's float32 little-endian bytes (what the aggregator records)."""
    from eth_utils import keccak

    return keccak(np.ascontiguousarray(model, dtype="<f4").tobytes())


@dataclass
class AuditReport:
    round: int
    model_ok: bool
    merkle_ok: bool  # the recorded root is the root of the recorded participants
    included: Dict[str, bool] = field(default_factory=dict)  # participant -> Merkle proof verifies
    scores: Dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.model_ok and self.merkle_ok and all(self.included.values())

    def as_dict(self) -> Dict[str, Any]:
        return {"round": self.round, "ok": self.ok, "model_ok": self.model_ok, "merkle_ok": self.merkle_ok,
                "included": self.included, "scores": self.scores}


def audit_round(chain, round_id: int, model: Optional[np.ndarray] = None,
                participants: Optional[List[str]] = None) -> AuditReport:
    """Check a round record: the model's hash, the Merkle root, each participant's inclusion proof."""
    rec = chain.round_record(round_id)
    model_ok = model is not None and model_hash(model) == rec.model_hash
    merkle_ok = merkle.root(rec.accepted) == rec.merkle_root
    included = {}
    for p in participants or []:
        try:
            path = merkle.proof(rec.accepted, p)
            included[p] = merkle.verify(rec.merkle_root, p, path)
        except ValueError:
            included[p] = False
    scores = dict(zip(rec.accepted, rec.scores))
    return AuditReport(round_id, model_ok, merkle_ok, included, scores)
