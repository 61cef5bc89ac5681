"""Hashes, commitments and Ed25519 signatures of updates (PyNaCl).

    update_hash = SHA-256(update bytes)                       (synchronous rounds)
                  SHA-256(b"fedagg-base" | base as uint64 | update bytes)
                                                          (buffered servers: `base` is the model
                                                           version the update was computed on)
    round_key   = session << 64 | round   (the round's id on chain)
    commitment  = keccak256(round_key as uint256 | participant address (20 bytes) | update_hash)
    signature   = Ed25519 over b"fedagg-update" | chain id as uint256 | registry address (20 bytes)
                  | session as uint64 | round as uint256 | update_hash

The commitment goes on chain before the upload; the signature travels with the
update, made by the key the participant registered. `session` is the server's session id
(STATE's header, below 2**63): rounds on chain are keyed by session and round, so a second
server on the same registry, which starts again at round 0, opens other rounds, and a signed
upload of one server session is refused by any other; the chain id and the registry's
address (``domain``) keep it from being replayed to a server of another registry or chain.
"""

from __future__ import annotations

import hashlib
from typing import Any, Tuple

import numpy as np

DOMAIN = b"fedagg-update"
BASE_DOMAIN = b"fedagg-base"


def base_prefix(base: int) -> bytes:
    """What a buffered server's update hash starts with: the version the update was computed on,
    so the commitment fixes the staleness the update is weighed by (the aggregator cannot change it)."""
    if not 0 <= int(base) < 1 << 64:
        raise ValueError(f"a model version is an integer in [0, 2**64), got {base!r}")
    return BASE_DOMAIN + int(base).to_bytes(8, "big")


def hasher(base=None):
    """A SHA-256 object fed what precedes the update's bytes (nothing, or base_prefix(base))."""
    return hashlib.sha256(b"" if base is None else base_prefix(base))


def update_hash(update: Any, base=None) -> bytes:
    """SHA-256 of the bytes uploaded: a float32 array's, a compress.Payload's frames as packed for
    the wire, or any buffer's; for a buffered server, preceded by base_prefix(base)."""
    if hasattr(update, "to_frames"):  # a fedagg.compress.Payload travels as its packed frames
        from ..transport.protocol import pack_frames

        update = pack_frames(update.to_frames())
    if isinstance(update, np.ndarray):
        update = np.ascontiguousarray(update)
    h = hasher(base)
    h.update(memoryview(update).cast("B"))
    return h.digest()


def _address(address: str) -> bytes:
    a = address[2:] if address.startswith("0x") else address
    raw = bytes.fromhex(a)
    if len(raw) != 20:
        raise ValueError(f"not a 20-byte address: {address!r}")
    return raw


def round_key(session: int, round_id: int) -> int:
    """The round's id on chain: the server session in the high bits, the round in the low 64."""
    session, round_id = int(session), int(round_id)
    if not 0 <= session < 1 << 64 or not 0 <= round_id < 1 << 64:
        raise ValueError(f"session and round must be in [0, 2**64): {session}, {round_id}")
    return session << 64 | round_id


def commitment(key: int, address: str, digest: bytes) -> bytes:
    """keccak256(round key | address | update hash): what a participant commits on chain."""
    from eth_utils import keccak

    if len(digest) != 32:
        raise ValueError("update hash must be 32 bytes")
    return keccak(int(key).to_bytes(32, "big") + _address(address) + digest)


def domain(chain_id: int, registry: str) -> bytes:
    """What a signature is bound to besides the session and round: the chain and the registry contract."""
    return int(chain_id).to_bytes(32, "big") + _address(registry)


def _message(round_id: int, digest: bytes, session: int, where: bytes) -> bytes:
    if len(where) != 52:
        raise ValueError("domain must be crypto.domain(chain_id, registry address): 52 bytes")
    return DOMAIN + where + int(session).to_bytes(8, "big") + int(round_id).to_bytes(32, "big") + digest


def keypair() -> Tuple[bytes, bytes]:
    """(public 32 bytes, secret 32-byte seed) of a new Ed25519 key."""
    from nacl.signing import SigningKey

    sk = SigningKey.generate()
    return bytes(sk.verify_key), bytes(sk)


def sign(secret: bytes, round_id: int, digest: bytes, *, session: int, domain: bytes) -> bytes:
    from nacl.signing import SigningKey

    return SigningKey(secret).sign(_message(round_id, digest, session, domain)).signature


def verify(public: bytes, round_id: int, digest: bytes, signature: bytes, *, session: int, domain: bytes) -> bool:
    from nacl.exceptions import BadSignatureError
    from nacl.signing import VerifyKey

    message = _message(round_id, digest, session, domain)
    try:
        VerifyKey(public).verify(message, signature)
        return True
    except (BadSignatureError, ValueError, TypeError):
        return False
