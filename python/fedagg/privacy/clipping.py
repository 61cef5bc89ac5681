"""Adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially
Private Learning with Adaptive Clipping").

Each round, with m participants of whom u had ||update|| <= C:
    b = (u + N(0, sigma_b^2)) / m            the noised fraction left unclipped
    C <- C * exp(-eta * (b - gamma))         geometric step toward quantile gamma
So C grows when more than 1 - gamma of the updates were clipped and shrinks
otherwise. The count is a second Gaussian query; with the centered bits
b_i - 1/2 its sensitivity is 1/2, so both queries together cost one Gaussian of
multiplier z when the update noise uses z_value = (z^-2 - (2 sigma_b)^-2)^-1/2
(the paper's Theorem 1; needs 2 sigma_b > z).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional


@dataclass
class AdaptiveClip:
    """State and step of the adaptive clipping norm.

    initial: C for the first round. target_quantile: gamma, the fraction of
    updates to leave unclipped. learning_rate: eta (the paper uses 0.2).
    count_stddev: sigma_b; None means m / 20 each round (the paper's choice).
    """

    initial: float = 0.1
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: Optional[float] = None

    def __post_init__(self):
        if not (math.isfinite(self.initial) and self.initial > 0):
            raise ValueError(f"initial clip norm must be positive, got {self.initial!r}")
        if not 0 < self.target_quantile < 1:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if self.count_stddev is not None and not (math.isfinite(self.count_stddev) and self.count_stddev > 0):
            raise ValueError(f"count_stddev must be positive, got {self.count_stddev!r}")
        self.clip_norm = float(self.initial)

    def sigma_b(self, participants: float) -> float:
        return self.count_stddev if self.count_stddev is not None else participants / 20.0

    def value_noise_multiplier(self, z: float, participants: float) -> float:
        """The update noise's multiplier so that updates and count together cost z."""
        sb = self.sigma_b(participants)
        if not 2 * sb > z:
            raise ValueError(f"adaptive clipping needs 2 * count_stddev ({2 * sb:g}) > noise_multiplier ({z:g}); "
                             "raise count_stddev or the number of participants")
        return (z ** -2 - (2 * sb) ** -2) ** -0.5

    def step(self, unclipped: int, participants: float, count_noise: float) -> float:
        """Move C given the count of unclipped updates and one N(0, 1) draw; returns the noised fraction."""
        b = (unclipped + self.sigma_b(participants) * count_noise) / participants
        self.clip_norm *= math.exp(-self.learning_rate * (b - self.target_quantile))
        return b
