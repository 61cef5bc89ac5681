"""Who is connected: one entry per connection that said HELLO, its claim on an id, its rate limit.

A participant entry costs a few hundred bytes and no receive buffer (buffers are taken when an
upload starts, transport/buffers.py), so the table can be large; when it is full, the entry
seen least recently that has no upload in progress makes room. A flood of HELLOs therefore
only cycles idle entries: it never locks out a participant that is uploading, and a
participant whose idle entry was evicted is told ``unknown`` and says HELLO again.

Ids are claims. With CURVE the id is the authenticated key, so a new connection presenting the
key is the participant itself (a reconnection) and takes its entry over. In plain mode anyone
can claim any id; what the table guarantees there:
- an upload belongs to the connection that started it: another connection can continue it only
  by presenting the secret the first one sent in its HELLO (``{"secret": ...}``; fedagg's Client
  sends a random one), so a reconnecting participant resumes and an impostor does not;
- a claim without the secret never inherits the entry's message counter (seq), so it cannot
  make the participant's next messages look replayed; it only replaces an entry with nothing
  in progress.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, Optional, Tuple


@dataclass
class Peer:
    routing_id: bytes
    pid: str
    key: str  # the authenticated CURVE key (z85), "" in plain mode
    secret: Optional[bytes]  # SHA-256 of the secret its HELLO presented, if any
    tokens: float
    last_refill: float
    last_seen: float
    last_seq: int = -1
    address: Optional[str] = None  # the ledger address this participant speaks for


class PeerTable:
    """Connections by ZeroMQ routing id, and which connection speaks for each participant id."""

    def __init__(self, max_peers: int, rate: float):
        self.max_peers, self.rate = max_peers, rate
        self._by_rid: "OrderedDict[bytes, Peer]" = OrderedDict()  # least recently seen first
        self._by_pid: Dict[str, Peer] = {}

    def __len__(self) -> int:
        return len(self._by_rid)

    def __iter__(self) -> Iterator[Peer]:
        return iter(list(self._by_rid.values()))

    def get(self, rid: bytes) -> Optional[Peer]:
        return self._by_rid.get(rid)

    def of(self, pid: str) -> Optional[Peer]:
        return self._by_pid.get(pid)

    def remove(self, peer: Peer) -> None:
        if self._by_rid.get(peer.routing_id) is peer:
            del self._by_rid[peer.routing_id]
        if self._by_pid.get(peer.pid) is peer:
            del self._by_pid[peer.pid]

    def charge(self, peer: Peer, now: float) -> bool:
        """Take one message from the peer's token bucket (burst = rate); False: over its rate."""
        peer.tokens = min(self.rate, peer.tokens + (now - peer.last_refill) * self.rate)
        peer.last_refill = now
        if peer.tokens < 1:
            return False
        peer.tokens -= 1
        peer.last_seen = now
        self._by_rid.move_to_end(peer.routing_id)
        return True

    def hello(self, rid: bytes, pid: str, key: str, secret: Optional[str], seq: int, address: Optional[str],
              now: float, uploading: Callable[[str], bool]) -> Tuple[Optional[Peer], str, str, Optional[str]]:
        """Admit a HELLO: (peer, "", "", dropped_pid) or (None, reason, detail, None).

        `uploading(pid)` says whether pid has an upload in progress (such entries are never
        evicted or replaced without the secret). dropped_pid: a participant id whose upload
        the caller must abandon (this connection used to speak for it).
        """
        digest = hashlib.sha256(secret.encode()).digest() if secret else None
        prev = self._by_rid.get(rid)  # this connection's entry (it may have spoken for another id)
        owner = self._by_pid.get(pid)  # the entry that speaks for pid now
        last_seq, tokens, refill = -1, self.rate, now
        dropped = None
        if owner is not None and owner is not prev:
            same = bool(key) and owner.key == key  # CURVE: the same authenticated key
            if not same and owner.secret is not None and digest is not None:
                same = hmac.compare_digest(owner.secret, digest)
            if same:  # the participant reconnected: its entry, counter and upload move here
                last_seq, tokens, refill = owner.last_seq, owner.tokens, owner.last_refill
                digest = owner.secret if digest is None else digest
            elif uploading(pid):
                return None, "claimed", (f"{pid!r} has an upload in progress on another connection; "
                                         "present that connection's HELLO secret to resume it"), None
            self.remove(owner)  # an entry with nothing in progress: the new claim replaces it
        if prev is not None:
            if prev.pid != pid:  # a connection speaks for one participant at a time
                dropped = prev.pid
            last_seq, tokens, refill = max(last_seq, prev.last_seq), prev.tokens, prev.last_refill
            if prev.pid == pid and prev.secret is not None:
                digest = prev.secret if digest is None else digest
        if seq <= last_seq:
            return None, "replayed", f"seq {seq} <= {last_seq}", None
        if prev is not None:
            self.remove(prev)
        elif len(self._by_rid) >= self.max_peers and not self._evict_one(uploading):
            return None, "busy", f"{self.max_peers} connections hold uploads in progress", None
        peer = Peer(rid, pid, key, digest, tokens, refill, now, seq, address)
        self._by_rid[rid] = peer
        self._by_pid[pid] = peer
        return peer, "", "", dropped

    def _evict_one(self, uploading: Callable[[str], bool]) -> bool:
        """Drop the least recently seen entry with no upload in progress; False if there is none."""
        for rid, p in self._by_rid.items():
            if not uploading(p.pid):
                self.remove(p)
                return True
        return False
