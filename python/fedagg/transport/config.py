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
    heartbeat: float = 2.0  # ZMTP heartbeat interval; a peer silent for 5 intervals is dropped
    io_threads: Optional[int] = None  # libzmq I/O threads; None: one per 4 cores, 1 to 4 (about 1 GB/s each)
    ledger: Any = None  # fedagg.ledger.LedgerGate: registered, staked, committed, signed updates only
    admission: Optional[str] = None  # "federated", "ledger" or "both" (default: "ledger" with a ledger)
    shard: Any = None  # transport.shards.ShardSpec: this server owns one coordinate range of a sharded round

    def check(self) -> None:
        if self.chunk_bytes < 4096 or self.chunk_bytes > (4 << 20) or self.chunk_bytes % 4:
            raise ValueError("chunk_bytes must be a multiple of 4 in [4 KiB, 4 MiB]")
        if self.io_threads is None:
            self.io_threads = max(1, min(4, (os.cpu_count() or 1) // 4))
        check_name(self.device)
        for name in ("quorum", "min_updates", "credits", "max_peers", "io_threads", "max_inflight"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.deadline > 0 or not self.rate > 0 or not self.upload_timeout > 0:
            raise ValueError("deadline, rate and upload_timeout must be positive")
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
        # The pipeline must work on the smallest round the server may close: try it now,
        # on zeros, rather than fail at the first close.
        from .. import aggregate

        kw = dict(self.rule_params)
        if self.clip_norm is not None:
            kw["clip_norm"] = self.clip_norm
        try:
            aggregate(np.zeros((self.min_updates, 4), dtype=np.float32), self.rule, self.f, **kw)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"the aggregation pipeline cannot run on {self.min_updates} updates: {e}") from None
        if self.dp is not None:
            self.dp.check_weights(self.rule, None)
