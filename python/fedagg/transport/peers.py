"""Who is connected: one entry per connection that said HELLO, its claim on an id, its rate limit.

A participant entry costs a few hundred bytes and no receive buffer (buffers are taken when an
upload starts, transport/buffers.py), so the table can be large; when it is full, the entry
seen least recently that has no upload in progress makes room (when every entry is uploading,
the least recently seen one, whose upload is given up). A flood of HELLOs therefore only cycles
idle entries, and a participant whose idle entry was evicted is told ``unknown`` and says HELLO
again.

Ids are claims. With CURVE the id is the authenticated key, so a new connection presenting the
key is the participant itself (a reconnection) and takes its entry over. In plain mode anyone
can claim any id; what the table guarantees there:
- an upload belongs to the connection that started it: another connection can continue it only
  by presenting the secret the first one sent in its HELLO (``{"secret": ...}``; fedagg's Client
  sends a random one), so a reconnecting participant resumes and an impostor does not (the
  secret is kept with the upload, so this holds even after the entry itself was dropped);
- a refused HELLO changes nothing;
- a claim without the secret never inherits the entry's message counter (seq), so it cannot
  make the participant's next messages look replayed; it only replaces an entry with nothing
  in progress.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple


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
              now: float, upload: Callable[[str], Tuple[bool, Optional[bytes]]]
              ) -> Tuple[Optional[Peer], str, str, List[str]]:
        """Admit a HELLO: (peer, "", "", abandon) or (None, reason, detail, []); a refusal changes nothing.

        `upload(pid)` is (whether pid has an upload in progress, the secret digest of the HELLO
        that started it). `abandon`: participant ids whose uploads the caller must give up (the
        id this connection spoke for before, an entry evicted to make room).
        """
        digest = hashlib.sha256(secret.encode()).digest() if secret else None

        def matches(d: Optional[bytes]) -> bool:
            return d is not None and digest is not None and hmac.compare_digest(d, digest)

        prev = self._by_rid.get(rid)  # this connection's entry (it may have spoken for another id)
        owner = self._by_pid.get(pid)  # the entry that speaks for pid now
        uploading, upload_secret = upload(pid)
        # CURVE: the id is the authenticated key, so the connection is the participant itself
        same = owner is not None and owner is not prev and (bool(key) or matches(owner.secret))
        mine = prev is not None and prev is owner  # this connection already speaks for pid
        if uploading and not (mine or key or same or matches(upload_secret)):
            return None, "claimed", (f"{pid!r} has an upload in progress on another connection; present that "
                                     "connection's HELLO secret to resume it"), []
        last_seq, tokens, refill = -1, self.rate, now
        if same:  # the participant reconnected: its counter and rate limit come along
            last_seq, tokens, refill = owner.last_seq, owner.tokens, owner.last_refill
            digest = owner.secret if digest is None else digest
        if prev is not None:
            last_seq, tokens, refill = max(last_seq, prev.last_seq), prev.tokens, prev.last_refill
            if prev.pid == pid and digest is None:
                digest = prev.secret
        if seq <= last_seq:
            return None, "replayed", f"seq {seq} <= {last_seq}", []
        abandon: List[str] = []
        if owner is not None and owner is not prev:  # moved here, or replaced by a fresh claim
            self.remove(owner)
        if prev is not None:
            if prev.pid != pid:  # a connection speaks for one participant at a time
                abandon.append(prev.pid)
            self.remove(prev)
        elif len(self._by_rid) >= self.max_peers:
            abandon += self._evict_one(lambda p: upload(p)[0])
        peer = Peer(rid, pid, key, digest, tokens, refill, now, seq, address)
        self._by_rid[rid] = peer
        self._by_pid[pid] = peer
        return peer, "", "", abandon

    def _evict_one(self, uploading: Callable[[str], bool]) -> List[str]:
        """Make room: drop the least recently seen entry with no upload in progress, or, when every
        entry is uploading, the least recently seen one (returned: its upload must be given up)."""
        for p in self._by_rid.values():
            if not uploading(p.pid):
                self.remove(p)
                return []
        p = next(iter(self._by_rid.values()))
        self.remove(p)
        return [p.pid]
