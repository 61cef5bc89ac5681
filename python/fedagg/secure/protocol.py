"""SecAgg+ (Bell et al. 2020) for one group of n participants: the server learns the sum of their
inputs in the ring Z_{2^bits}, never one input, while up to a set fraction drop out at any phase.

Phases (docs/secure.md):

0. Advertise. Each participant makes two X25519 key pairs for this round (c: encrypts its shares,
   s: agrees pairwise masks) and a self-mask seed b, and sends (c_pk, s_pk, SHA-256(b)), signed with
   its identity key where participants have them.
1. Share keys. Each splits b and s_sk into Shamir t-of-k shares for its k neighbours in the public
   graph (graph.py), encrypts each neighbour's pair with ChaCha20-Poly1305 under a key agreed from
   the c keys (HKDF, round and direction in its info; round and both ends as associated data), and
   the server routes them. U2: the participants whose shares the server received.
2. Masked input. y_u = x_u + PRG(b_u) + sum over neighbours v in U2 of +-PRG(s_uv) (+ if u < v),
   all mod 2^bits; PRG: the AES-128-CTR keystream, expanded and added natively in one pass. U3: the
   participants whose masked input the server received.
3. Consistency (with identity keys). The server sends U3; each participant signs it; shares are
   revealed only with t neighbours' signatures over the same U3 (so the server cannot tell some
   participants that u survived and others that it dropped).
4. Unmask. For each neighbour v: its b_v share if v is in U3, its s_v share if v dropped after
   phase 1: never both (a request asking both is refused). The server rebuilds each b_u of U3 and
   each s_u of the dropped from t shares, checks them against the advertised commitment and public
   key, removes the masks and has the sum.

An honest participant aborts (RoundAborted) rather than answer a request that could expose an input.
The server refuses the round (RoundRefused) rather than output a sum from too few survivors or a
secret it could not rebuild and verify.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Mapping, Optional, Sequence, Set

import numpy as np

from .. import _core
from . import shamir
from .graph import neighbours


class RoundAborted(RuntimeError):
    """A participant refuses to go on: answering could expose an input."""


class RoundRefused(RuntimeError):
    """The server cannot produce the sum safely (too few survivors, a secret it cannot rebuild)."""


_CRYPTO: Dict[str, object] = {}


def _crypto():
    if _CRYPTO:
        return _CRYPTO
    try:
        from cryptography.exceptions import InvalidSignature, InvalidTag
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
        from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError as e:  # pragma: no cover - the extra is missing
        raise ImportError("secure aggregation needs the `cryptography` package: pip install 'fedagg[secure]'") from e
    _CRYPTO.update(InvalidSignature=InvalidSignature, InvalidTag=InvalidTag, hashes=hashes,
                   Ed25519PrivateKey=Ed25519PrivateKey, Ed25519PublicKey=Ed25519PublicKey,
                   X25519PrivateKey=X25519PrivateKey, X25519PublicKey=X25519PublicKey,
                   ChaCha20Poly1305=ChaCha20Poly1305, HKDF=HKDF)
    return _CRYPTO


PRG = "aes128-ctr"  # the masks' PRG (apply_masks), named in a server's STATE
ROUND_ID_BYTES = 32
REBUILD_TRIES = 2000  # random t-subsets tried per secret when shares disagree


@dataclass(frozen=True)
class Params:
    """One SecAgg+ group: n participants, k neighbours each, threshold t, ring Z_{2^bits}, d
    coordinates; the sum is refused with fewer than `min_survivors` masked inputs.

    Security: the server learns one input only by rebuilding both its b and (for all its mask
    partners) the s keys; an honest neighbour reveals one of the two per participant, so 2t > k
    keeps a lying server from collecting t of each (with c participants colluding with the server
    in a neighbourhood it takes 2t > k + c: raise t). Dropouts: every participant needs t of its k
    neighbours alive at the end; the fewest survivors the server accepts is `min_survivors`. Sums
    are exact modulo 2^bits: the encoding must keep the true sum inside the ring (ddg.py)."""

    n: int
    k: int
    t: int
    d: int
    bits: int = 32
    min_survivors: Optional[int] = None

    def __post_init__(self):
        for name in ("n", "k", "t", "d", "bits"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool):
                raise TypeError(f"{name} must be an integer, got {type(v).__name__}")
        if self.n < 2:
            raise ValueError(f"secure aggregation needs n >= 2 participants, got {self.n}")
        neighbours(self.n, self.k, b"")  # validates k
        if not (2 * self.t > self.k and self.t <= self.k):
            raise ValueError("the threshold needs k / 2 < t <= k (a server asking both shares must not reach t "
                             f"twice); got t = {self.t}, k = {self.k}")
        if not 1 <= self.bits <= 32:
            raise ValueError(f"bits must be in [1, 32], got {self.bits}")
        if not 1 <= self.d <= 1 << 36:
            raise ValueError(f"d must be in [1, 2^36], got {self.d}")
        ms = self.t + 1 if self.min_survivors is None else self.min_survivors
        if not isinstance(ms, (int, np.integer)) or not max(2, self.t) <= ms <= self.n:
            raise ValueError(f"min_survivors must be in [max(2, t), n] = [{max(2, self.t)}, {self.n}], got {ms}")
        object.__setattr__(self, "min_survivors", int(ms))

    @classmethod
    def for_group(cls, n: int, d: int, *, k: Optional[int] = None, bits: int = 32,
                  max_dropout: float = 0.2) -> "Params":
        """Bell et al.'s shape: k about 2 log2(n) (all others for small n), t just above k / 2
        plus room for the tolerated dropouts among the neighbours."""
        if not 0 <= max_dropout < 0.5:
            raise ValueError(f"max_dropout must be in [0, 0.5), got {max_dropout}")
        if k is None:
            k = n - 1 if n <= 12 else min(n - 2, 2 * math.ceil(math.log2(n)) + 2 & ~1)
        t = k // 2 + 1
        return cls(n=n, k=k, t=t, d=d, bits=bits, min_survivors=max(t, 2, math.ceil((1 - max_dropout) * n)))

    @property
    def mask(self) -> int:
        return (1 << self.bits) - 1


@dataclass(frozen=True)
class Advertisement:
    index: int
    c_pk: bytes
    s_pk: bytes
    commitment: bytes  # SHA-256 of the self-mask seed b
    signature: bytes = b""

    def signed_bytes(self, round_id: bytes) -> bytes:
        return (b"fedagg secagg advertise" + round_id + self.index.to_bytes(4, "big") + self.c_pk + self.s_pk
                + self.commitment)


@dataclass(frozen=True)
class Ciphertext:
    sender: int
    receiver: int
    nonce: bytes
    body: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    survivors: FrozenSet[int]
    dropped: FrozenSet[int]
    signatures: Mapping[int, bytes] = field(default_factory=dict)  # over the survivors (phase 3)


@dataclass(frozen=True)
class UnmaskResponse:
    index: int
    self_shares: Mapping[int, bytes]  # v -> share of b_v, v in U3
    key_shares: Mapping[int, bytes]  # v -> share of s_v, v dropped


def survivors_bytes(round_id: bytes, survivors: Iterable[int]) -> bytes:
    return b"fedagg secagg survivors" + round_id + b"".join(i.to_bytes(4, "big") for i in sorted(survivors))


def _hkdf(secret: bytes, info: bytes) -> bytes:
    c = _crypto()
    return c["HKDF"](algorithm=c["hashes"].SHA256(), length=32, salt=None, info=info).derive(secret)


def _u32(i: int) -> bytes:
    return int(i).to_bytes(4, "big")


def pair_key(shared: bytes, round_id: bytes, u: int, v: int) -> bytes:
    a, b = min(u, v), max(u, v)
    return _hkdf(shared, b"fedagg secagg pair mask" + round_id + _u32(a) + _u32(b))


def self_key(seed: bytes, round_id: bytes, u: int) -> bytes:
    return _hkdf(seed, b"fedagg secagg self mask" + round_id + _u32(u))


def share_key(shared: bytes, round_id: bytes, sender: int, receiver: int) -> bytes:
    return _hkdf(shared, b"fedagg secagg share" + round_id + _u32(sender) + _u32(receiver))


def _aad(round_id: bytes, sender: int, receiver: int) -> bytes:
    return round_id + _u32(sender) + _u32(receiver)


def apply_masks(y: np.ndarray, keys: Sequence[bytes], signs: Sequence[int], bits: int) -> None:
    """y (uint32, in place) += sum_i signs[i] * PRG(keys[i]) mod 2^bits, natively, in one pass.

    PRG(key), key 32 bytes: the AES-128-CTR keystream under key[:16] from the initial counter block
    key[16:] (NIST SP 800-38A; OpenSSL's CTR mode), as little-endian uint32 words. On the CPU's AES
    instructions; on a CPU without them, OpenSSL's keystream (through `cryptography`) added by NumPy.
    """
    if keys and _core.secagg_prg_path() == "none":
        _apply_masks_openssl(y, keys, signs, bits)
        return
    _core.secagg_apply_masks(y, b"".join(keys), list(signs), bits)


def _apply_masks_openssl(y: np.ndarray, keys: Sequence[bytes], signs: Sequence[int], bits: int) -> None:
    """apply_masks without AES instructions: the same values, a keystream buffer per mask."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if not (isinstance(y, np.ndarray) and y.dtype == np.uint32 and y.ndim == 1 and y.flags.writeable):
        raise TypeError("data must be a writable 1-D uint32 array")  # what the native call checks
    if len(keys) != len(signs) or any(len(k) != 32 for k in keys) or any(s not in (1, -1) for s in signs):
        raise ValueError("one 32-byte key per sign, signs +1 or -1")
    if not 1 <= bits <= 32:
        raise ValueError("bits must be in [1, 32]")
    for key, sign in zip(keys, signs):
        stream = Cipher(algorithms.AES(key[:16]), modes.CTR(key[16:])).encryptor().update(bytes(4 * y.size))
        ks = np.frombuffer(stream, dtype="<u4")
        if sign > 0:
            np.add(y, ks, out=y)  # uint32: wraps modulo 2^32
        else:
            np.subtract(y, ks, out=y)
    y &= np.uint32(0xFFFFFFFF if bits == 32 else (1 << bits) - 1)


def check_ring(x: np.ndarray, params: Params, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.dtype != np.uint32 or x.ndim != 1:
        raise TypeError(f"{what} must be a 1-D uint32 array (an element of Z_2^{params.bits})")
    if x.size != params.d:
        raise ValueError(f"{what} has {x.size} coordinates, the round has d = {params.d}")
    if params.bits < 32 and x.size and int(x.max()) > params.mask:
        raise ValueError(f"{what} has values outside the ring Z_2^{params.bits}")
    return x


def _check_round_id(round_id: bytes) -> bytes:
    if not isinstance(round_id, (bytes, bytearray)) or len(round_id) != ROUND_ID_BYTES:
        raise ValueError(f"round_id must be {ROUND_ID_BYTES} bytes (session, round and group, hashed)")
    return bytes(round_id)


def _check_ad(ad: Advertisement, round_id: bytes, verify_key) -> Optional[str]:
    if not isinstance(ad, Advertisement):
        return "not an advertisement"
    if len(ad.c_pk) != 32 or len(ad.s_pk) != 32 or len(ad.commitment) != 32:
        return "keys and commitment must be 32 bytes"
    if ad.c_pk == ad.s_pk:
        return "the two public keys must differ"
    if verify_key is not None:
        try:
            verify_key.verify(ad.signature, ad.signed_bytes(round_id))
        except _crypto()["InvalidSignature"]:
            return "bad signature"
    return None


class Participant:
    """One participant of a SecAgg+ group, phase by phase. Keys, seeds and Shamir coefficients
    come from the OS CSPRNG; nothing here is reused across rounds."""

    def __init__(self, params: Params, index: int, round_id: bytes, graph_seed: bytes, *,
                 signing_key=None, verify_keys: Optional[Mapping[int, object]] = None):
        if not isinstance(params, Params):
            raise TypeError("params must be a fedagg.secure.Params")
        if not 0 <= index < params.n:
            raise ValueError(f"index must be in [0, {params.n}), got {index}")
        if (signing_key is None) != (verify_keys is None):
            raise ValueError("give both signing_key and verify_keys (identity keys), or neither")
        c = _crypto()
        self.params, self.index, self.round_id = params, int(index), _check_round_id(round_id)
        self.nbrs: Set[int] = neighbours(params.n, params.k, graph_seed)[self.index]
        self._sign, self._verify = signing_key, verify_keys
        self._c = c["X25519PrivateKey"].generate()
        self._s = c["X25519PrivateKey"].generate()
        self._b = os.urandom(32)
        self._phase = 0
        self._roster: Dict[int, Advertisement] = {}
        self._held: Dict[int, tuple] = {}  # v -> (share of b_v, share of s_v)
        self._u3: Optional[FrozenSet[int]] = None

    def _abort(self, why: str) -> RoundAborted:
        return RoundAborted(f"participant {self.index}: {why}")

    def _step(self, phase: int, what: str) -> None:
        if self._phase != phase:
            raise self._abort(f"{what} out of order (at phase {self._phase})")
        self._phase = phase + 1

    def advertise(self) -> Advertisement:
        self._step(0, "advertise")
        raw = lambda k: k.public_key().public_bytes_raw()  # noqa: E731
        ad = Advertisement(self.index, raw(self._c), raw(self._s), hashlib.sha256(self._b).digest())
        if self._sign is not None:
            signature = self._sign.sign(ad.signed_bytes(self.round_id))
            ad = Advertisement(ad.index, ad.c_pk, ad.s_pk, ad.commitment, signature)
        return ad

    def share_keys(self, roster: Mapping[int, Advertisement]) -> List[Ciphertext]:
        """Encrypted shares for the neighbours that advertised (roster: index -> advertisement)."""
        self._step(1, "share_keys")
        c = _crypto()
        live: Dict[int, Advertisement] = {}
        for v in sorted(self.nbrs):
            ad = roster.get(v)
            if ad is None:
                continue
            vk = None if self._verify is None else self._verify.get(v)
            if self._verify is not None and vk is None:
                raise self._abort(f"no identity key for neighbour {v}")
            why = _check_ad(ad, self.round_id, vk)
            if why is not None or ad.index != v:
                raise self._abort(f"neighbour {v}'s advertisement: {why or 'wrong index'}")
            live[v] = ad
        if len(live) < self.params.t:
            raise self._abort(f"{len(live)} neighbours advertised keys, fewer than t = {self.params.t}")
        mine = [(self._c.public_key().public_bytes_raw(), self._s.public_key().public_bytes_raw())]
        keys = [k for ad in live.values() for k in (ad.c_pk, ad.s_pk)] + list(mine[0])
        if len(set(keys)) != len(keys):
            raise self._abort("repeated public keys in the roster")
        self._roster = live
        xs = [v + 1 for v in live]
        sb = shamir.split(self._b, self.params.t, xs)
        ss = shamir.split(self._s.private_bytes_raw(), self.params.t, xs)
        out = []
        for v, ad in live.items():
            shared = self._c.exchange(c["X25519PublicKey"].from_public_bytes(ad.c_pk))
            key = share_key(shared, self.round_id, self.index, v)
            nonce = os.urandom(12)
            body = c["ChaCha20Poly1305"](key).encrypt(
                nonce, shamir.to_bytes(sb[v + 1]) + shamir.to_bytes(ss[v + 1]), _aad(self.round_id, self.index, v))
            out.append(Ciphertext(self.index, v, nonce, body))
        return out

    def masked_input(self, x: np.ndarray, inbox: Iterable[Ciphertext]) -> np.ndarray:
        """x (uint32 in the ring) masked, from the shares the neighbours sent (inbox)."""
        self._step(2, "masked_input")
        p = self.params
        check_ring(x, p, "the input")
        c = _crypto()
        for ct in inbox:
            if not isinstance(ct, Ciphertext) or ct.receiver != self.index or ct.sender not in self._roster:
                raise self._abort("a share ciphertext not meant for it or from no neighbour")
            if ct.sender in self._held:
                raise self._abort(f"two share ciphertexts from {ct.sender}")
            ad = self._roster[ct.sender]
            key = share_key(self._c.exchange(c["X25519PublicKey"].from_public_bytes(ad.c_pk)), self.round_id, ct.sender,
                            self.index)
            try:
                aead = c["ChaCha20Poly1305"](key)
                plain = aead.decrypt(ct.nonce, ct.body, _aad(self.round_id, ct.sender, self.index))
            except (c["InvalidTag"], ValueError):
                raise self._abort(f"the share ciphertext from {ct.sender} does not authenticate "
                                   "(forged, altered, or from another round)") from None
            if len(plain) != 2 * shamir.SHARE_BYTES:
                raise self._abort(f"a share message of the wrong size from {ct.sender}")
            self._held[ct.sender] = (plain[:shamir.SHARE_BYTES], plain[shamir.SHARE_BYTES:])
        if len(self._held) < p.t:
            raise self._abort(f"shares from {len(self._held)} neighbours, fewer than t = {p.t} "
                               "(a server withholding them could unmask this input)")
        keys, signs = [self_key(self._b, self.round_id, self.index)], [1]
        for v in sorted(self._held):
            shared = self._s.exchange(c["X25519PublicKey"].from_public_bytes(self._roster[v].s_pk))
            keys.append(pair_key(shared, self.round_id, self.index, v))
            signs.append(1 if self.index < v else -1)
        y = x.copy()
        apply_masks(y, keys, signs, p.bits)
        return y

    def consistency(self, survivors: Iterable[int]) -> bytes:
        """Phase 3: the signature over the survivors the server announced (b"" without identity keys)."""
        self._step(3, "consistency")
        self._u3 = frozenset(int(i) for i in survivors)
        return b"" if self._sign is None else self._sign.sign(survivors_bytes(self.round_id, self._u3))

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Phase 4: one share per neighbour that sent shares, of b_v or of s_v, never both."""
        if self._phase == 3 and self._sign is None:  # no identity keys: phase 3 has nothing to check
            self.consistency(request.survivors)
        self._step(4, "unmask")
        p = self.params
        u3, dropped = frozenset(request.survivors), frozenset(request.dropped)
        if u3 & dropped:
            raise self._abort(f"asked for both shares of {sorted(u3 & dropped)[:5]}: refused")
        if u3 != self._u3:
            raise self._abort("the survivors differ from those it was shown")
        if self.index not in u3:
            raise self._abort("told it did not survive")
        if len(u3) < p.min_survivors:
            raise self._abort(f"{len(u3)} survivors, fewer than {p.min_survivors}")
        mine = set(self._held)
        if (u3 | dropped) & mine != mine:
            raise self._abort(f"the request leaves neighbours {sorted(mine - (u3 | dropped))[:5]} "
                               "without a status")
        if self._sign is not None:
            # t neighbours must have been shown these same survivors: a server telling each
            # participant a different story (to collect b_u from some and the mask keys of u's
            # partners from others) cannot produce them. A signature that does not verify is
            # not counted (it may be a Byzantine neighbour's), never trusted.
            ok = 0
            message = survivors_bytes(self.round_id, u3)
            for v in self.nbrs & u3:
                sig, vk = request.signatures.get(v), self._verify.get(v)
                if not isinstance(sig, bytes) or vk is None:
                    continue
                try:
                    vk.verify(sig, message)
                    ok += 1
                except _crypto()["InvalidSignature"]:
                    pass
            if ok < p.t:
                raise self._abort(f"{ok} neighbours signed the survivors it was shown, "
                                   f"fewer than t = {p.t}")
        self_shares = {v: self._held[v][0] for v in mine & u3}
        key_shares = {v: self._held[v][1] for v in mine & dropped}
        return UnmaskResponse(self.index, self_shares, key_shares)


class Server:
    """The server's side of one SecAgg+ group. It holds only public keys, ciphertexts it cannot
    read, masked inputs, and (phase 4) one kind of share per participant; `refused` says why each
    participant was left out."""

    def __init__(self, params: Params, round_id: bytes, graph_seed: bytes, *,
                 verify_keys: Optional[Mapping[int, object]] = None):
        if not isinstance(params, Params):
            raise TypeError("params must be a fedagg.secure.Params")
        self.params, self.round_id = params, _check_round_id(round_id)
        self.graph = neighbours(params.n, params.k, graph_seed)
        self._verify = verify_keys
        self.roster: Dict[int, Advertisement] = {}
        self.u2: Set[int] = set()
        self.u3: Set[int] = set()
        self.refused: Dict[int, str] = {}
        self._sum: Optional[np.ndarray] = None
        self._signatures: Dict[int, bytes] = {}
        self._phase = 0

    def _step(self, phase: int, what: str) -> None:
        if self._phase != phase:
            raise RoundRefused(f"server: {what} out of order (at phase {self._phase})")
        self._phase = phase + 1

    def _refuse(self, i: int, why: str) -> None:
        self.refused.setdefault(int(i), why)

    def collect_advertisements(self, ads: Iterable[Advertisement]) -> Dict[int, Advertisement]:
        """The roster sent back to every participant (phase 0 -> 1)."""
        self._step(0, "collect_advertisements")
        seen: Dict[int, Advertisement] = {}
        for ad in ads:
            i = getattr(ad, "index", None)
            if not isinstance(i, int) or not 0 <= i < self.params.n:
                continue
            vk = None if self._verify is None else self._verify.get(i)
            why = "no identity key" if self._verify is not None and vk is None else _check_ad(ad, self.round_id, vk)
            if why is None and i in seen:
                why = "advertised twice"
            if why is not None:
                self._refuse(i, f"advertisement: {why}")
                seen.pop(i, None)
                continue
            if i not in self.refused:
                seen[i] = ad
        keys = [k for ad in seen.values() for k in (ad.c_pk, ad.s_pk)]
        if len(set(keys)) != len(keys):  # a copied key would let one party read another's shares
            dup = {k for k in keys if keys.count(k) > 1}
            for i in [i for i, ad in seen.items() if ad.c_pk in dup or ad.s_pk in dup]:
                self._refuse(i, "advertisement: a public key another participant also sent")
                del seen[i]
        self.roster = seen
        self._need(len(seen), "advertised keys")
        return dict(seen)

    def _need(self, count: int, what: str) -> None:
        if count < self.params.min_survivors:
            raise RoundRefused(f"only {count} participants {what}; the round needs {self.params.min_survivors}")

    def route_shares(self, messages: Mapping[int, Sequence[Ciphertext]]) -> Dict[int, List[Ciphertext]]:
        """Each participant's share ciphertexts (sender -> its list) -> each receiver's inbox."""
        self._step(1, "route_shares")
        inbox: Dict[int, List[Ciphertext]] = {}
        for i, cts in messages.items():
            if i not in self.roster:
                continue
            want = self.graph[i] & set(self.roster)
            got = {}
            ok = isinstance(cts, (list, tuple))
            for ct in cts if ok else ():
                if not isinstance(ct, Ciphertext) or ct.sender != i or ct.receiver not in want or ct.receiver in got:
                    ok = False
                    break
                got[ct.receiver] = ct
            # One for every neighbour in the roster, no fewer: a participant that left out some
            # would be masked against them without their holding its shares (nor it theirs), and
            # the sum would not unmask.
            if not ok or set(got) != want or len(got) < self.params.t:
                self._refuse(i, "share ciphertexts: malformed, misaddressed, or not one for every neighbour "
                                "in the roster")
                continue
            self.u2.add(i)
            for v, ct in got.items():
                inbox.setdefault(v, []).append(ct)
        self._need(len(self.u2), "sent their shares")
        return {v: [ct for ct in cts if ct.sender in self.u2] for v, cts in inbox.items() if v in self.u2}

    def add_masked(self, i: int, y: np.ndarray) -> Optional[str]:
        """One masked input (phase 2), added to the sum mod 2^bits as it arrives (a transport keeps one
        sum, not n inputs); returns why it was refused, or None: i is in U3."""
        if self._phase != 2:
            raise RoundRefused(f"server: a masked input out of order (at phase {self._phase})")
        if i not in self.u2:
            return f"{i} sent no shares (not in U2)"
        if i in self.u3:
            return f"{i} sent its masked input already"
        try:
            check_ring(y, self.params, f"the masked input of {i}")
        except (TypeError, ValueError) as e:
            self._refuse(i, str(e))
            return str(e)
        if self._sum is None:
            self._sum = np.zeros(self.params.d, dtype=np.uint32)
        np.add(self._sum, y, out=self._sum)  # uint32 wraps: the sum mod 2^32
        self.u3.add(i)
        return None

    def close_masked(self) -> FrozenSet[int]:
        """The end of phase 2: U3, or RoundRefused with too few masked inputs."""
        self._step(2, "close_masked")
        self._need(len(self.u3), "sent a masked input")
        return frozenset(self.u3)

    def collect_masked(self, inputs: Mapping[int, np.ndarray]) -> FrozenSet[int]:
        """All of phase 2 at once: add_masked for each input, then close_masked."""
        for i, y in inputs.items():
            self.add_masked(i, y)
        return self.close_masked()

    def collect_signatures(self, signatures: Mapping[int, bytes]) -> None:
        """Phase 3: the participants' signatures over U3 (identity keys only)."""
        self._step(3, "collect_signatures")
        self._signatures = {i: s for i, s in signatures.items() if i in self.u3 and isinstance(s, bytes)}

    def unmask_request(self) -> UnmaskRequest:
        if self._phase == 3:
            self._step(3, "unmask_request")
        if self._phase != 4:
            raise RoundRefused(f"server: unmask_request out of order (at phase {self._phase})")
        return UnmaskRequest(frozenset(self.u3), frozenset(self.u2 - self.u3), dict(self._signatures))

    def finish(self, responses: Iterable[UnmaskResponse]) -> np.ndarray:
        """The sum of U3's inputs mod 2^bits (uint32), or RoundRefused."""
        self._step(4, "finish")
        c = _crypto()
        p = self.params
        b_shares: Dict[int, Dict[int, int]] = {u: {} for u in self.u3}
        s_shares: Dict[int, Dict[int, int]] = {u: {} for u in self.u2 - self.u3}
        for r in responses:
            if not isinstance(r, UnmaskResponse) or r.index not in self.u3:
                continue
            try:
                for v, sh in r.self_shares.items():
                    if v in b_shares and v in self.graph[r.index]:
                        b_shares[v][r.index + 1] = shamir.from_bytes(sh)
                for v, sh in r.key_shares.items():
                    if v in s_shares and v in self.graph[r.index]:
                        s_shares[v][r.index + 1] = shamir.from_bytes(sh)
            except (ValueError, TypeError, AttributeError):
                self._refuse(r.index, "unmask response: malformed share")
        keys: List[bytes] = []
        signs: List[int] = []
        for u in sorted(self.u3):
            seed = self._rebuild(u, b_shares[u], lambda s, u=u: hashlib.sha256(s).digest() == self.roster[u].commitment,
                                 "self-mask seed")
            keys.append(self_key(seed, self.round_id, u))
            signs.append(-1)
        for u in sorted(self.u2 - self.u3):
            raw = self._rebuild(u, s_shares[u], lambda s, u=u: c["X25519PrivateKey"].from_private_bytes(s).public_key()
                                .public_bytes_raw() == self.roster[u].s_pk, "mask key")
            sk = c["X25519PrivateKey"].from_private_bytes(raw)
            for v in sorted(self.graph[u] & self.u3):
                # v added +-PRG(s_uv) (+ if v < u) for u, which sent it shares: take it back out
                shared = sk.exchange(c["X25519PublicKey"].from_public_bytes(self.roster[v].s_pk))
                keys.append(pair_key(shared, self.round_id, u, v))
                signs.append(-1 if v < u else 1)
        total = self._sum
        apply_masks(total, keys, signs, p.bits)
        return total

    def _rebuild(self, u: int, shares: Dict[int, int], valid, what: str) -> bytes:
        t = self.params.t
        if len(shares) < t:
            raise RoundRefused(f"{len(shares)} shares of participant {u}'s {what}, fewer than t = {t}: "
                               "the sum cannot be unmasked")
        pts = sorted(shares.items())
        # The first t shares, then random t-subsets: wrong shares (a Byzantine neighbour's) spoil
        # the subsets they are in, and a secret that passes its check is the right one. With e
        # wrong among m, a subset is clean with probability C(m - e, t) / C(m, t).
        rng = random.Random(u)
        for attempt in range(REBUILD_TRIES):
            sub = pts[:t] if attempt == 0 else rng.sample(pts, t)
            try:
                s = shamir.combine(sub)
            except ValueError:
                continue
            if valid(s):
                return s
            if len(pts) == t:
                break
        raise RoundRefused(f"participant {u}'s {what} does not match its commitment from any t of the "
                           f"{len(pts)} shares tried")
