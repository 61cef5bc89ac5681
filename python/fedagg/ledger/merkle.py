"""A Merkle tree of the accepted participants of a round (keccak256, sorted pairs).

Leaves are keccak256(address bytes), sorted; an inner node is keccak256 of its
two children in ascending order (the OpenZeppelin MerkleProof convention), so a
proof is a list of sibling hashes and needs no left/right flags. An odd node
is carried up unchanged. The empty tree's root is 32 zero bytes.
"""

from __future__ import annotations

from typing import List, Sequence


def _keccak(data: bytes) -> bytes:
    from eth_utils import keccak

    return keccak(data)


def leaf(address: str) -> bytes:
    a = address[2:] if address.startswith("0x") else address
    return _keccak(bytes.fromhex(a))


def _pair(a: bytes, b: bytes) -> bytes:
    return _keccak(a + b if a <= b else b + a)


def _levels(addresses: Sequence[str]) -> List[List[bytes]]:
    level = sorted(leaf(a) for a in addresses)
    levels = [level]
    while len(level) > 1:
        level = [_pair(level[i], level[i + 1]) if i + 1 < len(level) else level[i]
                 for i in range(0, len(level), 2)]
        levels.append(level)
    return levels


def root(addresses: Sequence[str]) -> bytes:
    if not addresses:
        return bytes(32)
    return _levels(addresses)[-1][0]


def proof(addresses: Sequence[str], address: str) -> List[bytes]:
    levels = _levels(addresses)
    idx = levels[0].index(leaf(address))  # ValueError if not a member
    out = []
    for level in levels[:-1]:
        sib = idx ^ 1
        if sib < len(level):
            out.append(level[sib])
        idx //= 2
    return out


def verify(root_hash: bytes, address: str, path: Sequence[bytes]) -> bool:
    h = leaf(address)
    for sib in path:
        h = _pair(h, sib)
    return h == root_hash
