"""Where a server's round lives: host memory, or a CUDA device (``ServerConfig.device``).

Each raw chunk is checked (CRC-32C, finiteness) as it is copied, in one pass:

- on the host, straight into the update's buffer;
- on a GPU, into a pinned staging slot, from which a copy stream moves it to the update's
  device buffer while the next chunks arrive (no whole-update host copy). A slot is reused
  once its copy is done (an event per slot); work on an update waits for the copy stream.

The rules, clipping and DP noise then run where the updates are (fedagg's CUDA backend takes
device arrays), and the aggregate comes back to the host once, into the model buffer that is
broadcast. The fold of the mean (``fold``) is ``acc += (double) x * c`` in two roundings (no
fused multiply-add), update after update, on every device, so a CPU and a GPU server make the
same sums.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Tuple

import numpy as np

from .. import _core


def check_name(name: str) -> str:
    if not isinstance(name, str) or not (name in ("cpu", "cuda") or (name.startswith("cuda:") and name[5:].isdigit())):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    return name


def open_device(name: str, d: int, chunk_bytes: int):
    """The device named by ``ServerConfig.device``: "cpu", "cuda" or "cuda:N"."""
    if check_name(name) == "cpu":
        return HostDevice(d)
    return CudaDevice(d, TorchCuda(name), chunk_bytes)


class HostDevice:
    """Updates in host memory (NumPy), computed on by fedagg._core."""

    name = "cpu"
    like = None  # what compressed payloads decode next to (None: host arrays)

    def __init__(self, d: int):
        self.d = d

    def alloc(self) -> np.ndarray:
        buf = np.empty(self.d, dtype=np.float32)
        buf.view(np.uint8)[::4096] = 0  # one write per page: no first-touch faults while the update streams in
        return buf

    def write(self, buf: np.ndarray, offset: int, body, raw: bool) -> Tuple[int, bool]:
        """Copy one chunk into buf at byte `offset`; (CRC-32C of the chunk, all finite)."""
        view = buf.view(np.uint8)
        return _core.copy_crc32c(view[offset:offset + len(body)], body, raw)

    def ready(self, buf) -> None:
        """Before computing on an update: its chunks have landed (they are copied synchronously here)."""

    def computing(self):
        """The context the round's computations run in (decode, fold, rule, noise)."""
        return contextlib.nullcontext()

    def sqnorm(self, x) -> float:
        return float(_core.sqnorms([x])[0])

    def finite(self, x) -> bool:
        return not _core.nonfinite_rows([x])[0]

    def accumulator(self):
        return np.zeros(self.d)

    def scale(self, x, c: float) -> None:
        """x *= c in place (float32: c rounded to float32, each product rounded once)."""
        np.multiply(x, np.float32(c), out=x)

    def fold(self, acc, xs, c: np.ndarray) -> None:
        """acc += c[0] * xs[0], then += c[1] * xs[1], ... (float64, each product rounded, no FMA)."""
        _core.fold_f64(acc, xs, c)

    def mean(self, acc, total: float, out=None):
        """acc / total as float32 (into `out`, a previous result, when given)."""
        if out is None:
            out = np.empty(self.d, dtype=np.float32)
        np.divide(acc, total, out=out, casting="unsafe")
        return out

    def to_host(self, x, out: Optional[np.ndarray] = None) -> np.ndarray:
        """x in host memory: a copy into `out` (allocated if None); x itself is never returned."""
        if out is None:
            return np.array(x, copy=True)
        np.copyto(out, x)
        return out

    def host_view(self, x) -> np.ndarray:
        """x readable from the host: itself here (an accepted update does not change)."""
        return np.asarray(x)

    def from_host(self, a: np.ndarray):
        return a

    def free_bytes(self) -> Optional[int]:
        return None  # host memory is the receive budget's business

    def close(self) -> None:
        pass


class CudaDevice:
    """Updates in the memory of one GPU; chunks staged through pinned host slots."""

    def __init__(self, d: int, backend, chunk_bytes: int, slots: int = 8):
        self.d = d
        self.backend = backend
        self.name = backend.name
        self.like = backend.like
        # a chunk is at most chunk_bytes (the server refuses larger ones): one slot each
        self._slots = [backend.pinned(chunk_bytes) for _ in range(slots)]  # (host uint8 view, handle)
        self._events: list = [None] * slots
        self._next = 0

    def alloc(self):
        return self.backend.empty_f32(self.d)

    def write(self, buf, offset: int, body, raw: bool) -> Tuple[int, bool]:
        if offset == 0:  # a buffer from the pool: refilled only after the compute on its last update
            self.backend.copies_after_compute()
        k = self._next
        self._next = (k + 1) % len(self._slots)
        if self._events[k] is not None:
            self.backend.wait(self._events[k])  # the slot's previous copy has left it
        host, handle = self._slots[k]
        n = len(body)
        crc, finite = _core.copy_crc32c(host[:n], body, raw)
        self._events[k] = self.backend.copy_in(buf, offset, handle, n)
        return crc, finite

    def ready(self, buf) -> None:
        self.backend.copies_before_compute()

    def computing(self):
        return self.backend.computing()

    def sqnorm(self, x) -> float:
        return self.backend.sqnorm(x)

    def finite(self, x) -> bool:
        return self.backend.finite(x)

    def accumulator(self):
        return self.backend.zeros_f64(self.d)

    def scale(self, x, c: float) -> None:
        with self.backend.computing():
            x.mul_(float(np.float32(c)))

    def fold(self, acc, xs, c: np.ndarray) -> None:
        for x, ci in zip(xs, c):  # one at a time, in order: the rounding of the CPU's one-pass fold
            self.backend.fold(acc, x, float(ci))

    def mean(self, acc, total: float, out=None):
        return self.backend.mean(acc, total)

    def to_host(self, x, out: Optional[np.ndarray] = None) -> np.ndarray:
        if out is None:
            out = np.empty(int(np.prod(x.shape)), dtype=np.float32 if str(x.dtype).endswith("float32") else np.float64)
        self.backend.to_host(x, out)
        return out

    def host_view(self, x) -> np.ndarray:
        return self.to_host(x)

    def from_host(self, a: np.ndarray):
        return self.backend.from_host(a)

    def free_bytes(self) -> Optional[int]:
        return self.backend.free_bytes()

    def close(self) -> None:
        self.backend.synchronize()


class TorchCuda:
    """The CUDA side of CudaDevice, through torch: a copy stream, a compute stream, pinned slots."""

    def __init__(self, name: str):
        try:
            import torch
        except ImportError:
            raise ValueError(f"device {name!r} needs torch with CUDA (pip install 'fedagg[torch]')") from None
        from .. import _gpu

        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r}: torch sees no CUDA device")
        if not _gpu.compiled():
            raise ValueError(f"device {name!r}: fedagg was built without the CUDA backend (see fedagg.backends())")
        dev = torch.device(name)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}: only {torch.cuda.device_count()} CUDA devices")
        self.torch, self.device = torch, torch.device("cuda", index)
        self.name = str(self.device)
        self.copy_stream = torch.cuda.Stream(self.device)
        self.compute_stream = torch.cuda.Stream(self.device)
        self.like = torch.empty(0, device=self.device)

    def pinned(self, nbytes: int):
        t = self.torch.empty(nbytes, dtype=self.torch.uint8, pin_memory=True)
        return t.numpy(), t

    def empty_f32(self, d: int):
        with self.torch.cuda.stream(self.compute_stream):
            return self.torch.empty(d, dtype=self.torch.float32, device=self.device)

    def copy_in(self, buf, offset: int, handle, nbytes: int):
        with self.torch.cuda.stream(self.copy_stream):
            buf.view(self.torch.uint8)[offset:offset + nbytes].copy_(handle[:nbytes], non_blocking=True)
            ev = self.torch.cuda.Event()
            ev.record(self.copy_stream)
        return ev

    def wait(self, event) -> None:
        event.synchronize()

    def copies_before_compute(self) -> None:
        self.compute_stream.wait_stream(self.copy_stream)

    def copies_after_compute(self) -> None:
        self.copy_stream.wait_stream(self.compute_stream)

    def computing(self):
        """Kernels launched inside (fedagg's, torch's) go to the compute stream, on this device."""
        return self.torch.cuda.stream(self.compute_stream)

    def sqnorm(self, x) -> float:
        from .. import _gpu

        with self.torch.cuda.stream(self.compute_stream):
            return float(_gpu.GpuOps(_gpu.library_of(x)).sqnorms([x])[0])

    def finite(self, x) -> bool:
        with self.torch.cuda.stream(self.compute_stream):
            return bool(self.torch.isfinite(x).all().item())

    def zeros_f64(self, d: int):
        with self.torch.cuda.stream(self.compute_stream):
            return self.torch.zeros(d, dtype=self.torch.float64, device=self.device)

    def fold(self, acc, x, c: float) -> None:
        with self.torch.cuda.stream(self.compute_stream):
            tmp = x.to(self.torch.float64)
            tmp.mul_(c)  # two roundings, as the CPU's acc[j] += c * x[j] (no FMA)
            acc.add_(tmp)

    def mean(self, acc, total: float):
        with self.torch.cuda.stream(self.compute_stream):
            return (acc / total).to(self.torch.float32)

    def to_host(self, x, out: np.ndarray) -> None:
        self.compute_stream.synchronize()
        self.torch.from_numpy(out).copy_(x.reshape(-1))

    def from_host(self, a: np.ndarray):
        with self.torch.cuda.stream(self.compute_stream):
            return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)

    def free_bytes(self) -> int:
        return int(self.torch.cuda.mem_get_info(self.device)[0])

    def synchronize(self) -> None:
        self.torch.cuda.synchronize(self.device)


def fits(what: str, need: int, have: int) -> None:
    """Refuse a configuration whose round cannot fit, naming the numbers."""
    if need > have:
        raise ValueError(f"{what}: needs {_gib(need)} but {_gib(have)} is available")


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{math.ceil(n / 2**20)} MiB"
