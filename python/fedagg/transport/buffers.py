"""Receive memory: an upload's buffer is taken when its first chunk arrives, never at HELLO,
and the bytes held for a round (uploads in progress, accepted updates, spare buffers) stay
under one budget in bytes, whatever the number of connections. Raw buffers live on the
server's device (device.py): host arrays, or CUDA tensors of a GPU server.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from .protocol import Codec


def default_budget() -> int:
    """Half of the machine's physical memory (the server's default receive budget)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # not POSIX: 8 GiB
        return 8 << 30


def round_budget(cfg, device, d: int) -> int:
    """Bytes of updates a round may hold on `device` (a ServerConfig's receive memory, or its default);
    refuses (ValueError) a configuration whose round cannot fit, naming the numbers."""
    from .device import fits
    from .rounds import is_foldable

    one = 4 * d
    keeps = not is_foldable(cfg.rule, cfg.rule_params)
    free = device.free_bytes()  # a GPU's free memory (None: host)
    if cfg.receive_memory is not None:
        budget = cfg.receive_memory
    else:
        budget = default_budget() if free is None else int(0.9 * free) - 2 * d * 8
    if budget < one:
        raise ValueError(f"receive memory of {budget} bytes cannot hold one update of {one} bytes")
    have = free if free is not None else 2 * default_budget()
    where = f"on {device.name}" if free is not None else "in host memory"
    fixed = 2 * one + (8 * d if not keeps else 0)  # model, new model, float64 sum
    if cfg.receive_memory is not None:
        fits(f"receive memory {budget} bytes and the round's own buffers (model, next model"
             f"{', float64 sum' if fixed > 2 * one else ''}) {where}", budget + fixed, have)
    if keeps:  # the round must be able to hold the updates it closes on
        fits(f"rule {cfg.rule} holds every update of a round until it closes: quorum {cfg.quorum} x {one} "
             f"bytes in the receive memory (lower quorum, raise --receive-memory-gb, or use rule mean, "
             f"which folds each update and holds only the uploads in flight)", cfg.quorum * one, budget)
    return budget


@dataclass
class Upload:
    """An update streaming in. Only the connection that speaks for its participant (peers.py) adds to it."""

    codec: Codec
    buf: Any  # the destination: a float32 buffer on the device (raw), or host bytes (compressed)
    total: int
    charge: int  # bytes of the budget it holds (a compressed one: at least what its decoded update will)
    secret: Optional[bytes] = None  # the HELLO secret digest of the connection that started it (peers.py)
    received: int = 0
    finite: bool = True
    sha256: Any = None  # with a ledger: the running hash of the bytes received, chunk by chunk
    base: int = 0  # the round (buffered mode: the model version) its CHUNKs name
    started: float = field(default_factory=time.monotonic)
    last_chunk: float = field(default_factory=time.monotonic)


class ReceiveBuffers:
    """Float32 buffers of d for raw uploads and a byte budget over everything a round holds.

    Spent raw buffers go back to a pool (their pages are faulted in already, so the next
    upload does not fault them in while it streams); the pool only holds what the budget
    leaves free, and only buffers it handed out (each once).
    """

    def __init__(self, d: int, budget: int, device: Any = None):
        from .device import HostDevice

        self.d, self.model_bytes = d, 4 * d
        self.budget = int(budget)
        self.device = device if device is not None else HostDevice(d)
        self._held = 0  # bytes of uploads in progress and accepted updates
        self.peak = 0  # the most ever held (what the round's memory came to)
        self.pool: List[Any] = []
        self._pooled: set = set()  # data pointers of the pooled buffers: each enters once
        self._owned: set = set()  # data pointers of the raw buffers this pool allocated
        self.spent_bytes: List[np.ndarray] = []  # byte buffers given back (a secure round's masked inputs)

    @property
    def held(self) -> int:
        return self._held

    @held.setter
    def held(self, nbytes: int) -> None:
        self._held = nbytes
        self.peak = max(self.peak, nbytes)

    def room(self, nbytes: int) -> bool:
        return self.held + nbytes <= self.budget

    def take_raw(self) -> Any:
        """A float32 buffer of d on the device, faulted in (counted as held)."""
        self.held += self.model_bytes
        if self.pool:
            buf = self.pool.pop()
            self._pooled.discard(_ptr(buf))
            return buf
        buf = self.device.alloc()
        self._owned.add(_ptr(buf))
        self._trim()
        return buf

    def take_bytes(self, nbytes: int, charge: int) -> np.ndarray:
        """A byte buffer for a compressed upload or a masked input, holding `charge` (>= nbytes) bytes of
        the budget: one given back (recycle_bytes) of that size if there is one (faulted in already)."""
        self.held += charge
        for i in range(len(self.spent_bytes) - 1, -1, -1):
            if self.spent_bytes[i].nbytes == nbytes:
                buf = self.spent_bytes.pop(i)
                self._trim()
                return buf
        self._trim()
        return np.empty(nbytes, dtype=np.uint8)

    def recycle_bytes(self, buf: np.ndarray) -> None:
        """A byte buffer from take_bytes back, kept while the budget has room for it (the next upload
        of its size reuses it)."""
        if self.held + self._pooled_bytes() + buf.nbytes <= self.budget:
            self.spent_bytes.append(buf)

    def release(self, nbytes: int) -> None:
        """An upload or accepted update of nbytes is gone (its buffer may be recycled separately)."""
        self.held = max(0, self.held - nbytes)
        self._trim()

    def recycle(self, arrays) -> None:
        """Raw buffers this pool handed out back into it, each once, within the budget (others are ignored)."""
        for arr in arrays:
            key = _ptr(arr)
            if key not in self._owned or key in self._pooled:
                continue
            if self.held + (len(self.pool) + 1) * self.model_bytes <= self.budget:
                self.pool.append(arr)
                self._pooled.add(key)
            else:  # freed: its address may come back as another array's, which this pool does not own
                self._owned.discard(key)

    def spare(self, *avoid: np.ndarray) -> np.ndarray:
        """A host float32 buffer of d for the next model: from the pool (host device) unless one of `avoid`."""
        bad = {_ptr(a) for a in avoid}
        if self.device.name == "cpu":  # the pool's buffers are host memory: one can be the model
            for i in range(len(self.pool) - 1, -1, -1):
                if _ptr(self.pool[i]) not in bad:
                    buf = self.pool.pop(i)
                    self._pooled.discard(_ptr(buf))
                    self._owned.discard(_ptr(buf))  # a model now, never an upload again
                    return buf
        return np.empty(self.d, dtype=np.float32)

    def _pooled_bytes(self) -> int:
        return len(self.pool) * self.model_bytes + sum(b.nbytes for b in self.spent_bytes)

    def _trim(self) -> None:
        while self.spent_bytes and self.held + self._pooled_bytes() > self.budget:
            self.spent_bytes.pop()
        while self.pool and self.held + len(self.pool) * self.model_bytes > self.budget:
            key = _ptr(self.pool.pop())
            self._pooled.discard(key)
            self._owned.discard(key)

    def stats(self) -> Dict[str, Any]:
        return {"held_bytes": self.held, "peak_bytes": self.peak, "pooled_bytes": self._pooled_bytes(),
                "budget": self.budget}


def _ptr(arr: Any) -> int:
    """The address of an array's data: NumPy (and stand-ins), or a torch tensor's."""
    if isinstance(arr, np.ndarray):
        return arr.__array_interface__["data"][0]
    return int(arr.data_ptr())

