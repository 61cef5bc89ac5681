"""fedagg: fast, robust aggregation for federated and decentralized training.

>>> import numpy as np, fedagg
>>> updates = np.random.default_rng(0).normal(size=(10, 1000)).astype(np.float32)
>>> agg, info = fedagg.aggregate(updates, rule="krum", f=2, return_info=True)
>>> agg.shape, info.selected.shape
((1000,), (1,))
"""

from . import _core, _gpu
from .aggregator import Aggregator
from .rules import (
    RULES,
    AggregationInfo,
    aggregate,
    bulyan,
    centered_clipping,
    clip,
    geometric_median,
    krum,
    mean,
    median,
    multi_krum,
    nnm,
    trimmed_mean,
)

__version__ = "0.1.0"

__all__ = [
    "RULES",
    "AggregationInfo",
    "Aggregator",
    "aggregate",
    "backends",
    "bulyan",
    "centered_clipping",
    "clip",
    "geometric_median",
    "get_num_threads",
    "krum",
    "mean",
    "median",
    "multi_krum",
    "nnm",
    "set_num_threads",
    "trimmed_mean",
]


def __getattr__(name: str):
    # The transport needs pyzmq (the "server" extra): imported on first use only.
    if name == "Client":
        from .transport.client import Client

        return Client
    raise AttributeError(f"module 'fedagg' has no attribute {name!r}")


def backends() -> dict:
    """What was compiled in and what this machine can use now."""
    return {
        "cpu": {"compiled": True, "usable": True, "isa": _core.isa(),
                "isas": list(_core.available_isas()), "threads": _core.num_threads()},
        "cuda": {"compiled": _gpu.compiled(), "usable": _gpu.device_count() > 0,
                 "devices": _gpu.device_count()},
    }


def set_num_threads(n: int) -> None:
    """Threads used by the CPU kernels (0: all cores, or $FEDAGG_NUM_THREADS)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    return _core.num_threads()
