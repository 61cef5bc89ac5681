"""Central DP (the server adds noise to the aggregate) and local DP (each
participant noises its own update before it leaves).

Sensitivity, precisely (L2, neighbouring rounds differ by adding or removing
one participant's clipped update):

* ``mean``: the released value is sum_i w_i clip_C(x_i) / m, where m =
  ``expected_participants`` is fixed in advance (the fixed-denominator estimator
  of McMahan et al. 2018), not the number that showed up. Weights must lie in
  [0, 1] (cap them, e.g. min(n_i / n_cap, 1)) and m is then the expected total
  weight. Sensitivity: C / m. Weights normalised by their actual sum, or larger
  than 1, have no bounded sensitivity and are refused.
* every other rule: one participant can move a robust aggregate anywhere the
  rule allows, so the aggregate is itself clipped to norm C and the
  sensitivity is 2C (its diameter). Robustness costs privacy: about 2m times
  the mean's noise.

The noise std is z times the sensitivity; each round is accounted as a
Poisson-sampled Gaussian of multiplier z with the given sampling rate.
"""

from __future__ import annotations

import math
from typing import Any, List, Optional

import numpy as np

from .. import _gpu
from .._arrays import is_torch_tensor
from .accounting import Ledger, PrivacyRecord, check_accountable
from .clipping import AdaptiveClip
from .noise import add_gaussian, check_seed, discrete_gaussian, gaussian, rational_sigma2

_ROUND_STRIDE = 1 << 44  # Philox offsets per round: rounds never share noise


def _positive(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) or not (
            math.isfinite(float(v)) and float(v) > 0):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}")
    return float(v)


def _host64(x: Any) -> np.ndarray:
    if is_torch_tensor(x):
        return x.detach().double().cpu().numpy().reshape(-1)
    lib = _gpu.library_of(x)
    if lib is not None:
        return np.asarray(lib.to_host(x), dtype=np.float64).reshape(-1)
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _like(values: np.ndarray, x: Any):
    """float64 host values in x's type, dtype, shape and device."""
    if is_torch_tensor(x):
        import torch

        return torch.from_numpy(values.reshape(tuple(x.shape))).to(device=x.device, dtype=x.dtype)
    lib = _gpu.library_of(x)
    if lib is not None:
        return lib.from_host(values.reshape(x.shape)).astype(x.dtype)
    return values.reshape(np.shape(x)).astype(x.dtype)


def _norm(x: Any) -> float:
    if is_torch_tensor(x):
        import torch

        return float(torch.linalg.vector_norm(x.detach().double()))
    lib = _gpu.library_of(x)
    if lib is not None:
        return float(lib.cp.linalg.norm(x.astype(lib.cp.float64)))
    return float(np.linalg.norm(np.asarray(x, dtype=np.float64)))


class CentralDP:
    """DP-FedAvg-style central differential privacy for ``fedagg.aggregate`` and ``Aggregator``.

    >>> dp = CentralDP(clip_norm=1.0, noise_multiplier=1.1, expected_participants=100, delta=1e-5)
    >>> out, info = fedagg.aggregate(updates, "mean", dp=dp, return_info=True)   # doctest: +SKIP
    >>> info.privacy.epsilon                                                     # doctest: +SKIP

    clip_norm: C (or ``adaptive=AdaptiveClip(...)`` to learn it). noise_multiplier: z.
    sampling_rate: q, the chance a participant is in a round (1: all are).
    mode: "gaussian" (float noise from Philox; on the aggregate's device) or
    "discrete": the aggregate is put on the grid of step ``grid_step`` (a power
    of two; by default 1/64 of sensitivity / sqrt(d)) by unbiased randomized
    rounding, exact discrete Gaussian noise N_Z(0, (z * Delta_grid)^2) is added
    to the integers, Delta_grid = Delta / step + sqrt(d) (rounding can move an
    aggregate by at most one step per coordinate), and the result is scaled
    back. The released floats are then integer multiples of the step whatever
    the input, so their bit patterns carry nothing about it: the floating-point
    attacks on float Gaussian noise (Mironov 2012) do not apply, and the
    guarantee is the discrete Gaussian's: rho = 1 / (2 z^2) zCDP per round.
    seed: None draws a fresh seed per round from the OS CSPRNG; an integer makes
    the noise reproducible (round r uses offsets r * 2^44 of the Philox stream).
    """

    def __init__(self, *, noise_multiplier: float, clip_norm: Optional[float] = None,
                 adaptive: Optional[AdaptiveClip] = None, expected_participants: Optional[float] = None,
                 sampling_rate: float = 1.0, delta: float = 1e-5, mode: str = "gaussian",
                 grid_step: Optional[float] = None, accountant: str = "pld", seed: Optional[int] = None):
        self.noise_multiplier = _positive(noise_multiplier, "noise_multiplier")
        if (clip_norm is None) == (adaptive is None):
            raise ValueError("give exactly one of clip_norm and adaptive")
        if adaptive is not None and not isinstance(adaptive, AdaptiveClip):
            raise TypeError("adaptive must be a fedagg.privacy.AdaptiveClip")
        self.adaptive = adaptive
        self._clip = None if clip_norm is None else _positive(clip_norm, "clip_norm")
        self.expected_participants = (None if expected_participants is None
                                      else _positive(expected_participants, "expected_participants"))
        if not (isinstance(sampling_rate, (int, float)) and 0 < sampling_rate <= 1):
            raise ValueError(f"sampling_rate must be in (0, 1], got {sampling_rate!r}")
        self.sampling_rate = float(sampling_rate)
        if mode not in ("gaussian", "discrete"):
            raise ValueError(f"mode must be 'gaussian' or 'discrete', got {mode!r}")
        self.mode = mode
        if grid_step is not None:
            g = _positive(grid_step, "grid_step")
            if math.frexp(g)[0] != 0.5:
                raise ValueError(f"grid_step must be a power of two (exact scaling), got {grid_step!r}")
        self.grid_step = grid_step
        self.ledger = Ledger(delta=delta, accountant=accountant)
        check_accountable(self.noise_multiplier, accountant)
        self._fixed_seed = None if seed is None else check_seed(seed)
        self.round = 0
        self.records: List[PrivacyRecord] = []

    @property
    def clip_norm(self) -> float:
        """C for the coming round."""
        return self.adaptive.clip_norm if self.adaptive is not None else self._clip

    def epsilon(self) -> float:
        return self.ledger.epsilon()

    def check_weights(self, rule: str, weights: Optional[np.ndarray]) -> None:
        if rule == "mean":
            if self.expected_participants is None:
                raise ValueError("DP mean needs expected_participants (the fixed denominator m): dividing by "
                                 "the number of participants that showed up has unbounded sensitivity")
            if weights is not None and (np.any(weights < 0) or np.any(weights > 1)):
                raise ValueError("DP mean needs weights in [0, 1] (cap them): larger weights make the "
                                 "sensitivity unbounded")

    # ---------------------------------------------------------------- the round
    def release(self, out: Any, *, rule: str, participants: int, unclipped: int, weight_sum: float,
                shard: Any = None):
        """Noise the rule's output `out` (x's type and device); returns (noised, record).

        `shard` (fedagg.distributed): `out` is coordinates ``shard.lo .. shard.lo + len(out)`` of an
        aggregate of ``shard.d`` coordinates; the aggregate's norm is the group's, the seed rank
        0's, and the noise is the slice of the whole aggregate's stream, so the concatenated
        shards are noised exactly as one process would noise the whole.
        """
        C, z = self.clip_norm, self.noise_multiplier
        seed = self._fixed_seed if self._fixed_seed is not None else check_seed(None)
        lo, d_total, norm_of = 0, None, _norm
        if shard is not None:
            seed, lo, d_total, norm_of = shard.common_seed(seed), shard.lo, shard.d, shard.norm
        base = self.round * _ROUND_STRIDE
        m_count = self.expected_participants or float(participants)
        z_value = z if self.adaptive is None else self.adaptive.value_noise_multiplier(z, m_count)
        if rule == "mean":
            m = self.expected_participants
            sensitivity = C / m
            if weight_sum != m:  # the rule divided by the actual total weight: use the fixed m instead
                out = out * (weight_sum / m)
        else:
            sensitivity = 2.0 * C
            norm = norm_of(out)
            if norm > C:
                out = out * (C / norm)
        d_local = int(np.prod(out.shape))
        d = d_local if d_total is None else d_total
        step = None
        if self.mode == "gaussian":
            std = z_value * sensitivity
            noised = add_gaussian(out, std, seed=seed, offset=base + lo)
            mechanism = "gaussian"
        else:
            step = self.grid_step or 2.0 ** math.floor(math.log2(sensitivity / (64.0 * math.sqrt(d))))
            delta_grid = sensitivity / step + math.sqrt(d)
            p, q = rational_sigma2((z_value * delta_grid) ** 2)
            from .. import _core

            ints, ok = _core.round_to_grid(_host64(out), step, seed ^ 0x9E3779B97F4A7C15, lo)
            if shard is not None:
                ok = shard.all(ok)
            if not ok:
                raise ValueError("aggregate is non-finite or too large for the grid")
            ints += discrete_gaussian(d_local, p / q, seed=seed, offset=base + lo)
            noised = _like(ints.astype(np.float64) * step, out)
            std = math.sqrt(p / q) * step
            mechanism = "discrete_gaussian"
        b = None
        if self.adaptive is not None:
            count_noise = float(gaussian(1, 1.0, seed=seed, offset=base + _ROUND_STRIDE // 2)[0])
            b = self.adaptive.step(unclipped, m_count, count_noise)
        eps = self.ledger.add(z, self.sampling_rate)
        record = PrivacyRecord(
            round=self.round, mechanism=mechanism, rule=rule, participants=participants, clip_norm=C,
            sensitivity=sensitivity, noise_multiplier=z, noise_stddev=std, sampling_rate=self.sampling_rate,
            epsilon=eps, delta=self.ledger.delta, accountant=self.ledger.accountant, grid_step=step,
            next_clip_norm=None if self.adaptive is None else self.adaptive.clip_norm,
            unclipped_fraction=b)
        self.records.append(record)
        self.round += 1
        return noised, record


class LocalDP:
    """Local DP on the participant: clip to C, add N(0, (z * 2C)^2) before the update leaves.

    Any two updates of one participant are within 2C after clipping, so each
    release is a Gaussian mechanism of multiplier z for that participant.
    """

    def __init__(self, *, clip_norm: float, noise_multiplier: float, delta: float = 1e-5,
                 accountant: str = "pld", seed: Optional[int] = None):
        self.clip_norm = _positive(clip_norm, "clip_norm")
        self.noise_multiplier = _positive(noise_multiplier, "noise_multiplier")
        self.ledger = Ledger(delta=delta, accountant=accountant)
        check_accountable(self.noise_multiplier, accountant)
        self._fixed_seed = None if seed is None else check_seed(seed)
        self.round = 0

    def privatize(self, update: Any):
        """The clipped, noised update (float32, the update's type and device)."""
        from .. import clip

        x = clip([update], self.clip_norm)[0]
        seed = self._fixed_seed if self._fixed_seed is not None else check_seed(None)
        noised = add_gaussian(x, self.noise_multiplier * 2.0 * self.clip_norm, seed=seed,
                              offset=self.round * _ROUND_STRIDE)
        self.ledger.add(self.noise_multiplier, 1.0)
        self.round += 1
        return noised

    def epsilon(self) -> float:
        return self.ledger.epsilon()
