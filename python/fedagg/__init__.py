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
    """What was compiled in and what this machine can use now.

    ``cuda`` has ``compiled`` (the wheel has the CUDA backend, fedagg._cuda),
    ``usable``, ``devices``, ``reason`` (why it is not usable: None when it is)
    and, when compiled, ``toolkit`` (the CUDA version it was built with; its
    runtime is linked statically, so only the NVIDIA driver is needed) and
    ``architectures`` (CMAKE_CUDA_ARCHITECTURES of the build).
    """
    return {
        "cpu": {"compiled": True, "usable": True, "isa": _core.isa(),
                "isas": list(_core.available_isas()), "threads": _core.num_threads()},
        "cuda": _cuda_status(),
    }


def _cuda_status() -> dict:
    import importlib
    import importlib.util

    try:
        from . import _cuda_build  # written by CMakeLists.txt next to fedagg._cuda
        build = {"toolkit": _cuda_build.CUDA_VERSION, "architectures": _cuda_build.CUDA_ARCHITECTURES}
    except ImportError:
        build = {"toolkit": None, "architectures": None}
    try:
        compiled = importlib.util.find_spec(f"{__name__}._cuda") is not None
    except (ImportError, ValueError):
        compiled = False
    if not compiled:
        return {"compiled": False, "usable": False, "devices": 0,
                "reason": "not compiled in: fedagg was built without the CUDA backend (FEDAGG_CUDA=OFF, "
                          "or no nvcc found with FEDAGG_CUDA=AUTO)", **build}
    if not _gpu.compiled():
        try:  # the same import again, for its error
            importlib.import_module(f"{__name__}._cuda")
            reason = "the CUDA backend (fedagg._cuda) failed to load"
        except Exception as e:  # noqa: BLE001 - any failure is the answer here
            reason = f"the CUDA backend (fedagg._cuda) failed to load: {type(e).__name__}: {e}"
        return {"compiled": True, "usable": False, "devices": 0, "reason": reason, **build}
    n = _gpu.device_count()
    return {"compiled": True, "usable": n > 0, "devices": n,
            "reason": None if n > 0 else _no_device_reason(build["toolkit"]), **build}


_driver_reason = None


def _no_device_reason(toolkit) -> str:
    """Why the CUDA runtime sees no device, asked of the NVIDIA driver (libcuda.so.1) directly."""
    global _driver_reason
    if _driver_reason is None:
        try:
            _driver_reason = _probe_driver(toolkit)
        except Exception as e:  # noqa: BLE001 - never fail backends()
            _driver_reason = f"no CUDA device usable ({type(e).__name__}: {e})"
    return _driver_reason


def _probe_driver(toolkit) -> str:
    import ctypes
    import os

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return ("no NVIDIA driver (libcuda.so.1) found: install the NVIDIA driver; "
                "no CUDA toolkit is needed, the CUDA runtime is linked into fedagg")

    def err(rc: int) -> str:
        name, text = ctypes.c_char_p(), ctypes.c_char_p()
        cuda.cuGetErrorName(rc, ctypes.byref(name))
        cuda.cuGetErrorString(rc, ctypes.byref(text))
        return f"{(name.value or b'CUDA error %d' % rc).decode()}: {(text.value or b'').decode()}"

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hint = f" (CUDA_VISIBLE_DEVICES={visible!r})" if visible is not None else ""
    rc = cuda.cuInit(0)
    if rc == 100:  # CUDA_ERROR_NO_DEVICE
        return f"no CUDA device: the NVIDIA driver found none{hint}"
    if rc != 0:
        return f"the NVIDIA driver failed to initialise{hint}: {err(rc)}"
    version, count = ctypes.c_int(0), ctypes.c_int(0)
    cuda.cuDriverGetVersion(ctypes.byref(version))
    driver = f"{version.value // 1000}.{version.value % 1000 // 10}"
    major = int(str(toolkit).split(".")[0]) if toolkit else 0
    if version.value and major and version.value < major * 1000:
        return (f"the NVIDIA driver is too old: it supports CUDA {driver}, fedagg's CUDA backend was built "
                f"with CUDA {toolkit} and needs a driver for CUDA {major}.0 or newer")
    rc = cuda.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        return f"the NVIDIA driver could not count devices{hint}: {err(rc)}"
    if count.value == 0:
        return f"no CUDA device{hint}"
    return f"the CUDA runtime sees no device although the NVIDIA driver (CUDA {driver}) sees {count.value}"


def set_num_threads(n: int) -> None:
    """Threads used by the CPU kernels (0: all cores, or $FEDAGG_NUM_THREADS)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    return _core.num_threads()
