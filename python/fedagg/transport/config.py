"""How a server runs rounds (``ServerConfig``), checked before anything starts."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from .device import check_name
from .protocol import DEFAULT_CHUNK, endpoint_host


def is_local(endpoint: str) -> bool:
    """Loopback TCP or ipc/inproc: the only places plain (unauthenticated) mode is allowed by default."""
    if endpoint.startswith(("ipc://", "inproc://")):
        return True
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint_host(endpoint)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class SecureConfig:
    """Secure rounds (SecAgg+ over buckets; docs/secure.md, "Secure rounds"): the round's participants
    are split into buckets of `bucket_size` by a seed drawn after they joined; each bucket's masked
    sum is unmasked and decoded into its mean; the server's rule runs over the bucket means (its f
    counts buckets: f Byzantine participants spoil at most f of them).

    Each participant clips its update to L2 norm `clip` and adds discrete Gaussian noise of
    stddev `sigma` (update units) before masking: a bucket's sum carries sqrt(s) sigma. `gamma`:
    the integer grid (None: the finest that keeps a bucket's sum in the ring with probability
    1 - 1e-9, secure.Encoding.for_ring). `k`: neighbours per participant in its bucket's graph
    (None: Bell et al.'s choice, all others for buckets up to 12); `max_dropout`: the share of a
    bucket that may drop out and still be unmasked. Each key phase ends when everyone answered or
    after `phase_seconds`; `delta`: the delta of the epsilon each round reports."""

    bucket_size: int = 8
    clip: float = 1.0
    sigma: float = 0.0
    gamma: Optional[float] = None
    bits: int = 32
    k: Optional[int] = None
    max_dropout: float = 0.2
    phase_seconds: float = 30.0
    delta: float = 1e-5

    def check(self) -> None:
        if not (isinstance(self.bucket_size, int) and not isinstance(self.bucket_size, bool) and self.bucket_size >= 3):
            raise ValueError(f"bucket_size must be an integer >= 3 (a bucket of 2 shows each member the other's "
                             f"update: its sum minus its own), got {self.bucket_size!r}")
        for name in ("clip", "phase_seconds"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < float("inf")):
                raise ValueError(f"secure {name} must be a positive number, got {v!r}")
        if not (isinstance(self.sigma, (int, float)) and 0 <= self.sigma < float("inf")):
            raise ValueError(f"secure sigma must be >= 0, got {self.sigma!r}")
        if self.gamma is not None and not (isinstance(self.gamma, (int, float)) and 0 < self.gamma < float("inf")):
            raise ValueError(f"secure gamma must be a positive number or None, got {self.gamma!r}")
        if not (isinstance(self.bits, int) and 8 <= self.bits <= 32):
            raise ValueError(f"secure bits must be in [8, 32], got {self.bits!r}")
        if not 0 <= self.max_dropout < 0.5:
            raise ValueError(f"max_dropout must be in [0, 0.5), got {self.max_dropout!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        from ..secure import Params

        for n in (self.bucket_size, 2 * self.bucket_size - 1):  # the sizes a bucket can have
            Params.for_group(n, 256, k=self.k if self.k is None else min(self.k, n - 1), bits=self.bits,
                             max_dropout=self.max_dropout)


@dataclass
class ServerConfig:
    """How the server runs rounds. Sizes in bytes, times in seconds."""

    bind: str = "tcp://127.0.0.1:5555"
    rule: str = "mean"
    f: int = 0
    rule_params: Dict[str, Any] = field(default_factory=dict)
    quorum: int = 1  # close the round once this many updates are accepted
    deadline: float = 60.0  # ... or this long after the round started, with >= min_updates
    min_updates: int = 1
    rounds: Optional[int] = None  # stop after this many rounds (None: run until stopped)
    server_lr: float = 1.0  # model += server_lr * aggregate
    clip_norm: Optional[float] = None
    dp: Any = None  # fedagg.privacy.CentralDP
    chunk_bytes: int = DEFAULT_CHUNK
    credits: int = 8  # chunks a participant may have in flight
    max_peers: int = 4096  # connections tracked at once (a few hundred bytes each; idle ones make room)
    receive_memory: Optional[int] = None  # bytes of updates held in a round (None: half the RAM, or 90% of the GPU's free memory)
    max_inflight: int = 256  # uploads streaming (or being made durable) at once; more are told `busy` with a retry_after
    device: str = "cpu"  # where updates are received into and aggregated: "cpu", "cuda" or "cuda:N"
    upload_timeout: float = 30.0  # an upload that receives nothing this long is abandoned, its buffer freed
    linger: float = 0.0  # after the last round: keep serving the final model this long (inf: until stopped)
    rate: float = 5000.0  # messages per second per connection (token bucket, burst = rate)
    state_dir: Optional[str] = None
    curve_secret_key: Optional[bytes] = None  # z85; with it, CURVE is on
    curve_public_key: Optional[bytes] = None
    allowed_keys: Optional[List[bytes]] = None  # z85 public keys of participants
    insecure: bool = False  # allow plain mode on a non-local endpoint (never by default)
    heartbeat: float = 2.0  # TCP keepalive: a connection silent 5 intervals is probed each interval, 5 misses drop it
    io_threads: Optional[int] = None  # libzmq I/O threads; None: one per 4 cores, 1 to 4 (about 1 GB/s each)
    ledger: Any = None  # fedagg.ledger.LedgerGate: registered, staked, committed, signed updates only
    admission: Optional[str] = None  # "federated", "ledger" or "both" (default: "ledger" with a ledger)
    shard: Any = None  # transport.shards.ShardSpec: this server owns one coordinate range of a sharded round
    secure: Optional[SecureConfig] = None  # secure rounds: the server learns bucket sums, never one update
    # "sync": rounds (every participant on the same model); "buffered": FedBuff, asynchronous. A
    # buffered server takes updates computed on any of the last max_staleness + 1 model versions,
    # each weighted by `staleness` (transport/staleness.py), and publishes a new version every
    # `quorum` (K) accepted updates; deadline and min_updates do not apply. With a ledger, each
    # version opens a commit window that closes at K commitments (or after the gate's
    # commit_seconds with min_updates), and the version takes every committed reveal, closing
    # at the deadline (from the window's close) with >= min_updates.
    mode: str = "sync"
    max_staleness: int = 10
    staleness: str = "sqrt"

    def check(self) -> None:
        if self.chunk_bytes < 4096 or self.chunk_bytes > (4 << 20) or self.chunk_bytes % 4:
            raise ValueError("chunk_bytes must be a multiple of 4 in [4 KiB, 4 MiB]")
        if self.io_threads is None:
            self.io_threads = max(1, min(4, (os.cpu_count() or 1) // 4))
        check_name(self.device)
        for name in ("quorum", "min_updates", "credits", "max_peers", "io_threads", "max_inflight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.deadline > 0 or not self.rate > 0 or not self.upload_timeout > 0 or not self.heartbeat > 0:
            raise ValueError("deadline, rate, upload_timeout and heartbeat must be positive")
        if not self.linger >= 0:
            raise ValueError("linger must be >= 0 seconds")
        if self.receive_memory is not None and self.receive_memory < 1:
            raise ValueError("receive_memory must be a positive number of bytes")
        if self.rounds is not None and self.rounds < 1:
            raise ValueError("rounds must be >= 1")
        if self.curve_secret_key is None and not self.insecure and not is_local(self.bind):
            raise ValueError(f"{self.bind} is not a loopback or ipc endpoint: CURVE keys are required "
                             "(fedagg keys generate), or pass insecure=True knowingly")
        if (self.curve_secret_key is None) != (self.curve_public_key is None):
            raise ValueError("give both the server's CURVE secret and public key")
        if self.admission is None:
            self.admission = "federated" if self.ledger is None else "ledger"
        if self.admission not in ("federated", "ledger", "both"):
            raise ValueError(f"admission must be 'federated', 'ledger' or 'both', got {self.admission!r}")
        if (self.admission != "federated") != (self.ledger is not None):
            raise ValueError("admission 'ledger' and 'both' need a ledger (fedagg.ledger.LedgerGate), "
                             "'federated' takes none")
        if self.admission == "both" and self.curve_secret_key is None:
            raise ValueError("admission 'both' needs CURVE keys and an allow-list")
        if self.shard is not None:
            from .shards import ShardSpec

            if not isinstance(self.shard, ShardSpec):
                raise TypeError("shard must be a fedagg.transport.shards.ShardSpec")
            if self.ledger is not None:
                raise ValueError("a sharded server cannot check ledger commitments yet: a shard sees a slice of "
                                 "each update, and the chain holds the hash of the whole")
        if self.min_updates > self.quorum:
            raise ValueError("min_updates must be <= quorum")
        smallest = self.min_updates
        if self.secure is not None:
            smallest = self._check_secure()
        if self.mode not in ("sync", "buffered"):
            raise ValueError(f"mode must be 'sync' or 'buffered', got {self.mode!r}")
        if self.mode == "buffered":
            smallest = self._check_buffered()
        # The pipeline must work on the smallest round the server may close: try it now,
        # on zeros, rather than fail at the first close.
        from .. import aggregate

        kw = dict(self.rule_params)
        if self.clip_norm is not None:
            kw["clip_norm"] = self.clip_norm
        what = "bucket means" if self.secure is not None else "updates"
        try:
            aggregate(np.zeros((smallest, 4), dtype=np.float32), self.rule, self.f, **kw)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"the aggregation pipeline cannot run on {smallest} {what}: {e}") from None
        if self.dp is not None:
            self.dp.check_weights(self.rule, None)

    def _check_buffered(self) -> int:
        """What buffered mode cannot be combined with (yet); returns the fewest updates a version takes."""
        from .staleness import staleness_weight

        if not (isinstance(self.max_staleness, int) and not isinstance(self.max_staleness, bool)
                and self.max_staleness >= 0):
            raise ValueError(f"max_staleness must be an integer >= 0 (model versions), got {self.max_staleness!r}")
        staleness_weight(self.staleness)
        refused = [(self.secure is not None, "secure rounds (SecAgg+ needs every member of a bucket at once)"),
                   (self.shard is not None, "shards (the shards agree on rounds, not on a stream of versions)")]
        for bad, what in refused:
            if bad:
                raise ValueError(f"buffered mode cannot be combined with {what}")
        return self.quorum if self.ledger is None else self.min_updates

    def _check_secure(self) -> int:
        """What secure rounds cannot be combined with (yet), said plainly; returns the fewest buckets."""
        if not isinstance(self.secure, SecureConfig):
            raise TypeError("secure must be a fedagg.transport.SecureConfig")
        self.secure.check()
        refused = [(self.ledger is not None, "a ledger (the chain would need each update's hash, which a secure "
                    "round never shows the server)"),
                   (self.shard is not None, "shards (each shard would need its own masks and key shares)"),
                   (self.dp is not None, "central DP (secure rounds add noise on the participants: SecureConfig.sigma)"),
                   (self.clip_norm is not None, "clip_norm (participants clip: SecureConfig.clip)"),
                   (self.device != "cpu", "a GPU device (the ring sums run on the host)")]
        for bad, what in refused:
            if bad:
                raise ValueError(f"secure rounds cannot be combined with {what}")
        if self.min_updates < self.secure.bucket_size:
            raise ValueError(f"min_updates ({self.min_updates}) must fill one bucket of {self.secure.bucket_size}")
        from ..secure import wire
        from ..secure.protocol import Params

        big = 2 * self.secure.bucket_size - 1
        need = max(wire.sizes(Params.for_group(big, 256, bits=self.secure.bits, k=self.secure.k
                                                if self.secure.k is None else min(self.secure.k, big - 1)))) + 1024
        if self.chunk_bytes < need:
            raise ValueError(f"chunk_bytes must be >= {need} for secure messages of buckets up to {big}")
        return self.min_updates // self.secure.bucket_size

