"""The Merkle tree of a round's record: one leaf per participant that committed.

    leaf = keccak256(address (20 bytes) | commitment (32 bytes) | code (1 byte))

with code the participant's fate in the round (Registry.vy: 0 aggregated, 1 excluded by
the rule, 2 contradicted its commitment, 3 refused or never revealed). Leaves are sorted;
an inner node is keccak256 of its two children in ascending order (the OpenZeppelin
MerkleProof convention), so a proof is a list of sibling hashes and needs no left/right
flags. An odd node is carried up unchanged. The empty tree's root is 32 zero bytes. The
contract checks a proof this way before it slashes (evidence).
"""

from __future__ import annotations

from typing import List, Sequence

AGGREGATED, EXCLUDED, CONTRADICTED, REFUSED = 0, 1, 2, 3
CODES = {AGGREGATED: "aggregated", EXCLUDED: "excluded by the rule", CONTRADICTED: "contradicted its commitment",
         REFUSED: "refused or never revealed"}


def _keccak(data: bytes) -> bytes:
    from eth_utils import keccak

    return keccak(data)


def leaf(address: str, commitment: bytes, code: int) -> bytes:
    a = bytes.fromhex(address[2:] if address.startswith("0x") else address)
    if len(a) != 20 or len(commitment) != 32 or code not in CODES:
        raise ValueError("a leaf is a 20-byte address, a 32-byte commitment and a code in 0..3")
    return _keccak(a + bytes(commitment) + bytes([code]))


def _pair(a: bytes, b: bytes) -> bytes:
    return _keccak(a + b if a <= b else b + a)


def _levels(leaves: Sequence[bytes]) -> List[List[bytes]]:
    level = sorted(leaves)
    levels = [level]
    while len(level) > 1:
        level = [_pair(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]
        levels.append(level)
    return levels


def root(leaves: Sequence[bytes]) -> bytes:
    if not leaves:
        return bytes(32)
    return _levels(leaves)[-1][0]


def proof(leaves: Sequence[bytes], item: bytes) -> List[bytes]:
    levels = _levels(leaves)
    idx = levels[0].index(item)  # ValueError if not a member
    out = []
    for level in levels[:-1]:
        sib = idx ^ 1
        if sib < len(level):
            out.append(level[sib])
        idx //= 2
    return out


def verify(root_hash: bytes, item: bytes, path: Sequence[bytes]) -> bool:
    h = item
    for sib in path:
        h = _pair(h, sib)
    return h == root_hash


def chain(leaves_in_order: Sequence[bytes]) -> bytes:
    """The contract's own hash chain over the listed leaves (Registry.vy list_participants)."""
    acc = bytes(32)
    for x in leaves_in_order:
        acc = _keccak(acc + x)
    return acc
