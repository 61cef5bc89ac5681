"""The bytes of the SecAgg+ messages, for a transport to carry (docs/secure.md, "Wire format").

Big-endian, no padding, every count and length checked against the group's parameters before it
is used: a message from the network that is truncated, padded, out of range or repeated is
refused with ValueError naming the problem, never half-parsed.
"""

from __future__ import annotations

import struct
from typing import Dict, List, Mapping, Sequence, Tuple

from . import shamir
from .protocol import Advertisement, Ciphertext, Params, UnmaskRequest, UnmaskResponse

SIGNATURE_BYTES = 64  # Ed25519
NONCE_BYTES = 12
CIPHERTEXT_BODY = 2 * shamir.SHARE_BYTES + 16  # two shares and the Poly1305 tag


class _Reader:
    def __init__(self, data: bytes, what: str):
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"{what}: expected bytes, got {type(data).__name__}")
        self.data, self.pos, self.what = bytes(data), 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise ValueError(f"{self.what}: truncated at byte {self.pos} (needs {n} more)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def index(self, p: Params, field: str) -> int:
        i = self.u32()
        if i >= p.n:
            raise ValueError(f"{self.what}: {field} {i} is not a participant (n = {p.n})")
        return i

    def count(self, p: Params, field: str) -> int:
        c = self.u32()
        if c > p.n:
            raise ValueError(f"{self.what}: {c} {field}, more than the n = {p.n} participants")
        return c

    def indices(self, p: Params, field: str) -> List[int]:
        out = [self.index(p, field) for _ in range(self.count(p, field + "s"))]
        if out != sorted(set(out)):
            raise ValueError(f"{self.what}: {field}s must be strictly increasing (no repeats)")
        return out

    def end(self) -> None:
        if self.pos != len(self.data):
            raise ValueError(f"{self.what}: {len(self.data) - self.pos} bytes after the message")


def _u32(i: int) -> bytes:
    return struct.pack(">I", i)


def _indices(ids) -> bytes:
    ids = sorted(int(i) for i in ids)
    return _u32(len(ids)) + b"".join(_u32(i) for i in ids)


# ----------------------------------------------------------------------------- advertisements

def _ad(ad: Advertisement) -> bytes:
    if len(ad.signature) not in (0, SIGNATURE_BYTES):
        raise ValueError(f"a signature is 0 or {SIGNATURE_BYTES} bytes")
    return (_u32(ad.index) + ad.c_pk + ad.s_pk + ad.commitment + struct.pack(">H", len(ad.signature))
            + ad.signature)


def _read_ad(r: _Reader, p: Params) -> Advertisement:
    i = r.index(p, "index")
    c_pk, s_pk, commitment = r.take(32), r.take(32), r.take(32)
    n = r.u16()
    if n not in (0, SIGNATURE_BYTES):
        raise ValueError(f"{r.what}: a signature of {n} bytes (0 or {SIGNATURE_BYTES})")
    return Advertisement(i, c_pk, s_pk, commitment, r.take(n))


def advertisement(ad: Advertisement) -> bytes:
    return _ad(ad)


def parse_advertisement(data: bytes, p: Params) -> Advertisement:
    r = _Reader(data, "advertisement")
    ad = _read_ad(r, p)
    r.end()
    return ad


def roster(ads: Mapping[int, Advertisement]) -> bytes:
    return _u32(len(ads)) + b"".join(_ad(ads[i]) for i in sorted(ads))


def parse_roster(data: bytes, p: Params) -> Dict[int, Advertisement]:
    r = _Reader(data, "roster")
    out: Dict[int, Advertisement] = {}
    for _ in range(r.count(p, "advertisements")):
        ad = _read_ad(r, p)
        if ad.index in out:
            raise ValueError(f"roster: participant {ad.index} twice")
        out[ad.index] = ad
    r.end()
    return out


# -------------------------------------------------------------------------------- ciphertexts

def ciphertexts(cts: Sequence[Ciphertext]) -> bytes:
    out = [_u32(len(cts))]
    for c in cts:
        if len(c.nonce) != NONCE_BYTES or len(c.body) != CIPHERTEXT_BODY:
            raise ValueError(f"a share ciphertext has a {NONCE_BYTES}-byte nonce and a {CIPHERTEXT_BODY}-byte "
                             "body")
        out.append(_u32(c.sender) + _u32(c.receiver) + c.nonce + c.body)
    return b"".join(out)


def parse_ciphertexts(data: bytes, p: Params) -> List[Ciphertext]:
    r = _Reader(data, "share ciphertexts")
    out = []
    for _ in range(r.count(p, "ciphertexts")):
        sender, receiver = r.index(p, "sender"), r.index(p, "receiver")
        out.append(Ciphertext(sender, receiver, r.take(NONCE_BYTES), r.take(CIPHERTEXT_BODY)))
    r.end()
    return out


# --------------------------------------------------------------------- consistency, unmasking

def survivors(u3) -> bytes:
    return _indices(u3)


def parse_survivors(data: bytes, p: Params) -> frozenset:
    r = _Reader(data, "survivors")
    out = frozenset(r.indices(p, "survivor"))
    r.end()
    return out


def unmask_request(req: UnmaskRequest) -> bytes:
    sigs = sorted(req.signatures.items())
    if any(len(s) != SIGNATURE_BYTES for _, s in sigs):
        raise ValueError(f"signatures are {SIGNATURE_BYTES} bytes")
    return (_indices(req.survivors) + _indices(req.dropped) + _u32(len(sigs))
            + b"".join(_u32(i) + s for i, s in sigs))


def parse_unmask_request(data: bytes, p: Params) -> UnmaskRequest:
    r = _Reader(data, "unmask request")
    u3 = frozenset(r.indices(p, "survivor"))
    dropped = frozenset(r.indices(p, "dropped participant"))
    sigs: Dict[int, bytes] = {}
    for _ in range(r.count(p, "signatures")):
        i = r.index(p, "signer")
        if i in sigs:
            raise ValueError(f"unmask request: two signatures of {i}")
        sigs[i] = r.take(SIGNATURE_BYTES)
    r.end()
    return UnmaskRequest(u3, dropped, sigs)


def _shares(shares: Mapping[int, bytes]) -> bytes:
    items = sorted(shares.items())
    if any(len(s) != shamir.SHARE_BYTES for _, s in items):
        raise ValueError(f"shares are {shamir.SHARE_BYTES} bytes")
    return _u32(len(items)) + b"".join(_u32(v) + s for v, s in items)


def _read_shares(r: _Reader, p: Params, field: str) -> Dict[int, bytes]:
    out: Dict[int, bytes] = {}
    last = -1
    for _ in range(r.count(p, field + "s")):
        v = r.index(p, field)
        if v <= last:
            raise ValueError(f"{r.what}: {field}s must be strictly increasing (no repeats)")
        last = v
        out[v] = r.take(shamir.SHARE_BYTES)
    return out


def unmask_response(res: UnmaskResponse) -> bytes:
    return _u32(res.index) + _shares(res.self_shares) + _shares(res.key_shares)


def parse_unmask_response(data: bytes, p: Params) -> UnmaskResponse:
    r = _Reader(data, "unmask response")
    i = r.index(p, "index")
    self_shares = _read_shares(r, p, "seed share owner")
    key_shares = _read_shares(r, p, "key share owner")
    r.end()
    if set(self_shares) & set(key_shares):
        raise ValueError("unmask response: both shares of one participant")
    return UnmaskResponse(i, self_shares, key_shares)


def sizes(p: Params) -> Tuple[int, int]:
    """Upper bounds on one participant's upload and download in the key phases (bytes)."""
    ad = 4 + 96 + 2 + SIGNATURE_BYTES
    ct = 8 + NONCE_BYTES + CIPHERTEXT_BODY
    up = ad + 4 + p.k * ct + 4 + 4 * p.n + SIGNATURE_BYTES + 4 + 8 + p.k * (4 + shamir.SHARE_BYTES)
    down = 4 + p.n * ad + 4 + p.k * ct + 2 * (4 + 4 * p.n) + 4 + p.n * (4 + SIGNATURE_BYTES)
    return up, down
