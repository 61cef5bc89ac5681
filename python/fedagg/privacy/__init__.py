"""Differential privacy: clipping, noise, accounting.

>>> from fedagg import privacy
>>> privacy.accounting.epsilon(3.0, 0.1, 512, 1e-6) > 3.7     # PLD: about 3.77
True

- ``CentralDP``: clip -> rule -> noise on the server, for ``fedagg.aggregate(..., dp=)`` and
  ``fedagg.Aggregator(..., dp=)``, with a ``PrivacyRecord`` per round (``info.privacy``).
- ``LocalDP``: clip + noise on the participant before the update leaves.
- ``AdaptiveClip``: the clipping norm learned toward a quantile (Andrew et al. 2021).
- ``gaussian`` / ``add_gaussian``: Philox4x32-10 noise, the same floats on CPU and GPU.
- ``discrete_gaussian``: exact samples of N_Z(0, sigma^2) (Canonne, Kamath, Steinke 2020).
- ``accounting``: epsilon and calibration with dp-accounting (PLD or RDP).
"""

from . import accounting
from .accounting import Ledger, PrivacyRecord, calibrate, epsilon
from .clipping import AdaptiveClip
from .mechanism import CentralDP, LocalDP
from .noise import add_gaussian, discrete_gaussian, gaussian, new_seed, rational_sigma2

__all__ = ["AdaptiveClip", "CentralDP", "Ledger", "LocalDP", "PrivacyRecord", "accounting", "add_gaussian",
           "calibrate", "discrete_gaussian", "epsilon", "gaussian", "new_seed", "rational_sigma2"]
