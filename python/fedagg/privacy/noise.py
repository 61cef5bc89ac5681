"""Noise generation: Gaussian from Philox4x32-10, and the exact discrete Gaussian.

Normal number ``g`` of the stream ``seed`` is a fixed function of ``(seed, g)``
(Philox4x32-10 block ``g // 4``, Box-Muller): ``gaussian(d, s, seed, offset)`` is
the stream's numbers ``offset .. offset + d - 1`` times ``s``, the same floats
on the CPU (multithreaded) and on a GPU (one kernel), whatever the thread count.
Box-Muller from 32-bit words never draws beyond 6.77 standard deviations.

Philox is a fast counter-based generator, not a cryptographic one: the
*seeds* come from the operating system's CSPRNG (``new_seed``) unless the
caller fixes one to reproduce a run. For noise whose floating-point
representation must not leak the input (Mironov 2012), use the discrete
Gaussian on an integer grid (``discrete_gaussian``; ``CentralDP(mode="discrete")``).
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from typing import Any, Optional, Tuple

import numpy as np

from .. import _core, _gpu
from .._arrays import is_torch_tensor

_MAX_SIGMA2_BITS = 40  # the exact sampler's integer range: sigma^2 = p / q with p, q < 2^40


def new_seed() -> int:
    """A 63-bit seed from the operating system's CSPRNG."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def check_seed(seed: Any) -> int:
    if seed is None:
        return new_seed()
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2^64), got {seed!r}")
    return int(seed)


def _check_offset(offset: Any) -> int:
    if isinstance(offset, bool) or not isinstance(offset, (int, np.integer)) or not 0 <= int(offset) < 2**63:
        raise ValueError(f"offset must be an integer in [0, 2^63), got {offset!r}")
    return int(offset)


def _check_std(stddev: Any) -> float:
    try:
        s = float(stddev)
    except (TypeError, ValueError):
        raise TypeError(f"stddev must be a number, got {type(stddev).__name__}") from None
    if not (math.isfinite(s) and 0 <= s <= 3.0e38):
        raise ValueError(f"stddev must be finite and >= 0, got {stddev!r}")
    return s


def _check_d(d: Any) -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)) or int(d) < 0:
        raise ValueError(f"d must be a non-negative integer, got {d!r}")
    return int(d)


def gaussian(d: int, stddev: float = 1.0, *, seed: Optional[int] = None, offset: int = 0, like: Any = None):
    """``stddev`` times normal numbers ``offset .. offset + d - 1`` of stream ``seed``, float32.

    ``like``: None (NumPy), or a torch tensor / CuPy array whose library and
    device the result takes (generated there: on a GPU by fedagg's kernel).
    """
    d, stddev, seed, offset = _check_d(d), _check_std(stddev), check_seed(seed), _check_offset(offset)
    lib = None if like is None else _gpu.library_of(like)
    if lib is not None:
        if _gpu._cuda is None:
            raise RuntimeError("fedagg was built without the CUDA backend (fedagg.backends())")
        out = lib.empty((d,), "float32")
        with lib.activate():
            _gpu._cuda.gaussian_noise(lib.ptr(out), d, stddev, seed, offset, False, lib.stream())
        return out
    out = np.empty(d, dtype=np.float32)
    _core.gaussian_noise(out, stddev, seed, offset, False)
    if like is not None and is_torch_tensor(like):
        import torch

        return torch.from_numpy(out)
    if like is not None and not isinstance(like, np.ndarray):
        raise TypeError(f"like must be a NumPy array, a torch tensor or a CuPy array, got {type(like).__name__}")
    return out


def add_gaussian(x: Any, stddev: float, *, seed: Optional[int] = None, offset: int = 0):
    """x + stddev * N (the stream of ``gaussian``), in place for contiguous float32 x; returns it.

    Other dtypes (float16, bfloat16, float64) get the float32 noise added
    through their library (a new array of x's dtype).
    """
    stddev, seed, offset = _check_std(stddev), check_seed(seed), _check_offset(offset)
    lib = _gpu.library_of(x)
    if lib is not None:
        flat_f32 = str(x.dtype).split(".")[-1] == "float32" and _contiguous(x)
        if flat_f32 and _gpu._cuda is not None:
            with lib.activate():
                _gpu._cuda.gaussian_noise(lib.ptr(x), int(np.prod(x.shape)), stddev, seed, offset, True, lib.stream())
            return x
        return x + gaussian(int(np.prod(x.shape)), stddev, seed=seed, offset=offset, like=x).reshape(x.shape)
    if is_torch_tensor(x):
        import torch

        if x.dtype == torch.float32 and x.is_contiguous():
            _core.gaussian_noise(x.detach().view(-1).numpy(), stddev, seed, offset, True)
            return x
        return x + torch.from_numpy(gaussian(x.numel(), stddev, seed=seed, offset=offset)).reshape(x.shape)
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a NumPy array, a torch tensor or a CuPy array, got {type(x).__name__}")
    if x.dtype == np.float32 and x.flags.c_contiguous and x.flags.writeable:
        _core.gaussian_noise(x.reshape(-1), stddev, seed, offset, True)
        return x
    if x.dtype.kind != "f":
        raise TypeError(f"x must be floating point, got {x.dtype}")
    return (x + gaussian(x.size, stddev, seed=seed, offset=offset).reshape(x.shape)).astype(x.dtype)


def _contiguous(x: Any) -> bool:
    return x.is_contiguous() if hasattr(x, "is_contiguous") else bool(x.flags.c_contiguous)


def rational_sigma2(sigma2: float) -> Tuple[int, int]:
    """The smallest p / q >= sigma2 with q a power of two and p, q < 2^40 (exact for the sampler)."""
    if not (math.isfinite(sigma2) and 0 < sigma2 < 2.0 ** (_MAX_SIGMA2_BITS - 1)):
        raise ValueError(f"discrete Gaussian: sigma^2 must be in (0, 2^39), got {sigma2!r}")
    q = 1 << max(0, min(_MAX_SIGMA2_BITS - 1, _MAX_SIGMA2_BITS - 2 - math.ceil(math.log2(sigma2 + 1))))
    p = math.ceil(Fraction(sigma2) * q)  # rounded up: never less noise than asked for
    return p, q


def discrete_gaussian(d: int, sigma2: float, *, seed: Optional[int] = None, offset: int = 0) -> np.ndarray:
    """int64 samples of the discrete Gaussian N_Z(0, sigma2) (Canonne, Kamath, Steinke 2020).

    Sampled exactly with integer arithmetic (no floating point touches a
    sample) from Philox words, coordinate ``offset + j`` owning its own counter
    range; sigma2 is first rounded *up* to p / q (``rational_sigma2``).
    """
    d, seed, offset = _check_d(d), check_seed(seed), _check_offset(offset)
    p, q = rational_sigma2(float(sigma2))
    out = np.empty(d, dtype=np.int64)
    _core.discrete_gaussian(out, p, q, seed, offset, False)
    return out
