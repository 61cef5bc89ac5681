"""Privacy accounting with Google's ``dp-accounting`` (RDP and PLD accountants).

Each round of DP aggregation is one Poisson-sampled Gaussian event: sampling
rate q (the chance that a given participant takes part; 1 when everyone does)
and noise multiplier z = noise std / L2 sensitivity. ``epsilon`` composes
the rounds so far; ``calibrate`` finds the z that meets a target (epsilon, delta)
after a number of rounds. The discrete Gaussian is accounted as the Gaussian of
the same z: its Renyi divergences are at most the Gaussian's (Canonne, Kamath,
Steinke 2020, Prop. 5/Cor. 9), which the RDP accountant relies on; the PLD
accountant's Gaussian curve is the usual, close approximation for it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional

_KINDS = ("pld", "rdp")
# PLD's privacy-loss grid grows like 1 / z^2 (about 10^10 points at z = 1e-3: tens of GiB).
# Below this z the epsilon is in the hundreds anyway; RDP accounts it in constant memory.
PLD_MIN_NOISE = 0.1


def _dp():
    try:
        import dp_accounting
    except ImportError:  # pragma: no cover - the "privacy" extra installs it
        raise ImportError("privacy accounting needs dp-accounting: pip install 'fedagg[privacy]'") from None
    return dp_accounting


def _event(noise_multiplier: float, sampling_rate: float):
    dp = _dp()
    g = dp.GaussianDpEvent(noise_multiplier)
    return g if sampling_rate == 1.0 else dp.PoissonSampledDpEvent(sampling_rate, g)


def _accountant(kind: str):
    dp = _dp()
    if kind == "pld":
        return dp.pld.PLDAccountant()
    if kind == "rdp":
        return dp.rdp.RdpAccountant()
    raise ValueError(f"accountant must be one of {_KINDS}, got {kind!r}")


def _check(noise_multiplier: float, sampling_rate: float, delta: Optional[float] = None) -> None:
    if not (isinstance(noise_multiplier, (int, float)) and math.isfinite(noise_multiplier) and noise_multiplier > 0):
        raise ValueError(f"noise_multiplier must be a positive number, got {noise_multiplier!r}")
    if not (isinstance(sampling_rate, (int, float)) and 0 < sampling_rate <= 1):
        raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
    if delta is not None and not (isinstance(delta, (int, float)) and 0 < delta < 1):
        raise ValueError(f"delta must be in (0, 1), got {delta!r}")


def check_accountable(noise_multiplier: float, accountant: str) -> None:
    """Refuse a noise multiplier the accountant cannot account in bounded memory."""
    if accountant == "pld" and noise_multiplier < PLD_MIN_NOISE:
        raise ValueError(f"noise_multiplier {noise_multiplier:g} is below {PLD_MIN_NOISE} (epsilon would be in the "
                         "hundreds): the PLD accountant cannot represent it in bounded memory; "
                         "use accountant='rdp'")


def epsilon(noise_multiplier: float, sampling_rate: float, rounds: int, delta: float, *,
            accountant: str = "pld") -> float:
    """Epsilon after `rounds` Poisson-sampled Gaussian rounds, at `delta`."""
    _check(noise_multiplier, sampling_rate, delta)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ValueError(f"rounds must be a non-negative integer, got {rounds!r}")
    if rounds == 0:
        return 0.0
    check_accountable(float(noise_multiplier), accountant)
    acc = _accountant(accountant)
    acc.compose(_event(float(noise_multiplier), float(sampling_rate)), rounds)
    return float(acc.get_epsilon(delta))


def calibrate(target_epsilon: float, delta: float, rounds: int, sampling_rate: float = 1.0, *,
              accountant: str = "pld") -> float:
    """The smallest noise multiplier (to 1e-4 relative) whose epsilon after `rounds` is <= target."""
    _check(1.0, sampling_rate, delta)
    if not (isinstance(target_epsilon, (int, float)) and math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a positive number, got {target_epsilon!r}")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    dp = _dp()

    def solve(kind: str, bracket):
        return float(dp.calibrate_dp_mechanism(
            lambda: _accountant(kind),
            lambda z: dp.SelfComposedDpEvent(_event(z, float(sampling_rate)), rounds),
            float(target_epsilon), float(delta), bracket, tol=1e-4))

    # RDP is cheap at any z and never below PLD's epsilon, so its answer bounds
    # PLD's from above; searching PLD only near it keeps PLD off tiny z, where
    # its discretization needs huge arrays.
    z_rdp = solve("rdp", dp.LowerEndpointAndGuess(1e-2, 1.0))
    if accountant == "rdp":
        return z_rdp
    return solve(accountant, dp.ExplicitBracketInterval(0.5 * z_rdp, z_rdp))


@dataclass
class PrivacyRecord:
    """What one DP round did, for the server's log and the participants.

    Holds no seed and no noise: the noise must stay secret for the guarantee.
    """

    round: int
    mechanism: str  # "gaussian" or "discrete_gaussian"
    rule: str
    participants: int
    clip_norm: float
    sensitivity: float  # L2 sensitivity of the released aggregate (add/remove one participant)
    noise_multiplier: float  # noise std / sensitivity, as accounted
    noise_stddev: float  # per coordinate, in the aggregate's units
    sampling_rate: float
    epsilon: float  # all rounds so far, at delta
    delta: float
    accountant: str
    grid_step: Optional[float] = None  # discrete mode: the integer grid's step
    next_clip_norm: Optional[float] = None  # adaptive clipping: C for the next round
    unclipped_fraction: Optional[float] = None  # adaptive clipping: the noised estimate used

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Ledger:
    """The rounds accounted so far (one event per round; heterogeneous rounds allowed)."""

    delta: float
    accountant: str = "pld"
    events: List[tuple] = field(default_factory=list)  # (noise_multiplier, sampling_rate)

    def __post_init__(self):
        _check(1.0, 1.0, self.delta)
        _accountant(self.accountant)

    def add(self, noise_multiplier: float, sampling_rate: float) -> float:
        """Account one more round; returns epsilon so far."""
        _check(noise_multiplier, sampling_rate)
        check_accountable(float(noise_multiplier), self.accountant)
        self.events.append((float(noise_multiplier), float(sampling_rate)))
        return self.epsilon()

    def epsilon(self) -> float:
        if not self.events:
            return 0.0
        acc = _accountant(self.accountant)
        runs: List[list] = []  # consecutive equal events compose as one self-composition
        for e in self.events:
            if runs and runs[-1][0] == e:
                runs[-1][1] += 1
            else:
                runs.append([e, 1])
        for (z, q), count in runs:
            acc.compose(_event(z, q), count)
        return float(acc.get_epsilon(self.delta))
