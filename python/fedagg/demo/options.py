"""The demo's options and results (no torch here: the command line imports this)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

ATTACKS = ("none", "signflip", "noise", "alie")
CODECS = ("none", "topk", "uniform8", "sign", "rotation")


class DemoError(RuntimeError):
    """The demo could not run; the message says what failed (and where the logs are)."""


@dataclass
class Options:
    participants: int = 10
    byzantine: int = 3
    attack: str = "signflip"
    rule: str = "multi_krum"
    f: Optional[int] = None  # default: the number of Byzantine participants
    rounds: int = 15
    codec: str = "none"
    dp_noise: float = 0.0  # central DP noise multiplier z (0: off)
    dp_clip: float = 1.0  # clip norm C of every update when DP is on
    ledger: bool = True  # admit participants through the chain (else: plain federated)
    commit_seconds: float = 10.0  # longest commit phase on chain (it ends once all have committed)
    epochs: int = 2
    lr: float = 0.1
    seed: int = 0
    compare: bool = True  # also run the plain mean under the same attack
    plot: Optional[str] = "fedagg-demo.png"
    bundles: Optional[str] = None  # folder for each ledger round's bundle (<bundles>/<rule>/); None: a temporary one
    keep_chain: bool = False  # after the runs, keep each run's chain serving (to audit) until interrupted
    secure: bool = False  # secure rounds: SecAgg+ over buckets, the rule over the bucket means (no ledger)
    bucket_size: int = 3  # participants per bucket (secure)

    def check(self) -> None:
        from .. import RULES

        if not 1 <= self.participants <= 32:
            raise ValueError("participants must be in [1, 32] (one process each on this machine)")
        if not 0 <= self.byzantine < self.participants:
            raise ValueError("byzantine must be in [0, participants)")
        if self.attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS}, got {self.attack!r}")
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.codec not in CODECS:
            raise ValueError(f"codec must be one of {CODECS}, got {self.codec!r}")
        if not 1 <= self.rounds <= 1000:
            raise ValueError("rounds must be in [1, 1000]")
        if self.f is not None and self.f < 0:
            raise ValueError("f must be >= 0")
        if self.rule == "mean" and self.f:
            raise ValueError("f: the mean takes no f (it tolerates no Byzantine update); choose a robust rule")
        if self.dp_noise < 0 or not self.dp_clip > 0:
            raise ValueError("dp_noise must be >= 0 and dp_clip > 0")
        if self.dp_noise > 0:
            from ..privacy.accounting import check_accountable

            check_accountable(self.dp_noise, "pld")
        if self.keep_chain and not (self.ledger and self.bundles):
            raise ValueError("keep_chain needs the ledger and a bundles folder (what an audit reads)")
        if self.epochs < 1 or not self.lr > 0 or self.commit_seconds < 0:
            raise ValueError("epochs must be >= 1, lr > 0, commit_seconds >= 0")
        if self.attack == "none" and self.byzantine:
            raise ValueError("byzantine participants need an attack (or set byzantine to 0)")
        honest = self.participants - self.byzantine
        if self.secure:
            self._check_secure()
            return
        for rule, f in self.runs():
            need = min_updates(rule, f, honest)
            if need > self.participants:
                raise ValueError(f"{rule} with f = {f} needs rounds of at least {need} updates: "
                                 f"give at least {need} participants (or a smaller f)")

    def _check_secure(self) -> None:
        from ..rules import RULES as SPECS

        if self.ledger:
            raise ValueError("secure rounds run without the ledger (docs/secure.md): set ledger=False (--no-ledger)")
        if self.codec != "none":
            raise ValueError("secure rounds send masked ring vectors: codec must be 'none'")
        if self.bucket_size < 3:
            raise ValueError("bucket_size must be >= 3")
        buckets = self.participants // self.bucket_size
        for rule, f in self.runs():
            if buckets < SPECS[rule].min_n(f):
                raise ValueError(f"{rule} with f = {f} runs over bucket means: it needs {SPECS[rule].min_n(f)} "
                                 f"buckets, and {self.participants} participants make {buckets} of "
                                 f"{self.bucket_size} (give more participants or a smaller bucket_size)")

    def runs(self) -> List[Tuple[str, int]]:
        """(rule, f) of each run: the chosen rule, then the plain mean (with compare)."""
        f = self.f if self.f is not None else 0 if self.rule == "mean" else self.byzantine
        out = [(self.rule, f)]
        if self.compare and self.rule != "mean":
            out.append(("mean", 0))
        return out


@dataclass
class RoundRow:
    round: int
    accuracy: float
    excluded: List[str]  # participant labels the rule left out ("p3*": Byzantine)
    refused: Dict[str, str]  # label -> reason the server refused its upload
    epsilon: Optional[float]
    bytes_in: int
    seconds: float
    ledger_seconds: float


@dataclass
class RunResult:
    rule: str
    f: int
    rows: List[RoundRow] = field(default_factory=list)
    seconds: float = 0.0
    gas: Dict[str, int] = field(default_factory=dict)
    audit: Optional[Dict[str, object]] = None  # the demo's own audit of its bundles (ledger runs)
    chain: Optional[Dict[str, str]] = None  # rpc, contract, bundles: where to audit the run again
    node: object = None  # the chain node process, kept serving with keep_chain


def byzantine_indices(opts: Options) -> List[int]:
    """Spread over the participants, fixed by the seed."""
    rng = np.random.default_rng([opts.seed, 7])
    return sorted(int(i) for i in rng.choice(opts.participants, opts.byzantine, replace=False))


def min_updates(rule: str, f: int, honest: int) -> int:
    """The fewest updates a late round closes with: the honest ones, or what the rule needs if more."""
    from ..rules import RULES as SPECS

    return max(1, honest, SPECS[rule].min_n(f))
