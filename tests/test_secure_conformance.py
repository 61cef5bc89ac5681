"""Conformance test of fedagg's secure rounds, written from docs/protocol.md ("Secure rounds") and
docs/secure.md alone.

The participant below (``DocParticipant``) imports nothing from fedagg: framing, CRC32C, X25519 /
HKDF / ChaCha20-Poly1305, Shamir over GF(2^521 - 1), the rotation, the randomized rounding and the
AES-128-CTR masks are written here from the two documents. The server under test runs in a thread of
this process (public API), next to honest ``fedagg.Client`` participants. Every wait is bounded.
"""

import functools
import hashlib
import json
import math
import secrets
import struct
import threading
import time

import numpy as np
import zmq
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import fedagg
from fedagg.transport import SecureConfig, Server, ServerConfig

# Framing (docs/protocol.md, "Header")
HEADER = struct.Struct("<4sBBBBIIQQQQIIQ")
FIELDS = ("magic", "version", "kind", "dtype", "codec", "length", "aux", "round", "seq",
          "offset", "total", "checksum", "reserved", "session")
HELLO, GET_MODEL, CHUNK, COMMIT, SECAGG = 1, 2, 3, 4, 7
STATE, MODEL, CREDIT, ACCEPTED, REJECTED, ROUND, SECAGG_REPLY = 10, 11, 12, 13, 14, 15, 16
JOIN, ADVERTISE, SHARES, UNMASK, RESPONSE = 1, 2, 3, 4, 5
P = 2 ** 521 - 1  # the Shamir field
D = 1300  # pads to 1536 = 1024 + 512 (docs/secure.md, "The rotation, exactly")
PADDED = 1536
WAIT = 30.0

_CRC = tuple(functools.reduce(lambda c, _: (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1, range(8), i)
             for i in range(256))  # CRC32C, reflected polynomial 0x82F63B78


def crc32c(data):
    c = 0xFFFFFFFF
    for b in bytes(data):
        c = _CRC[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


class Msg:
    def __init__(self, h, payload):
        self.h, self.payload, self.kind = h, payload, h["kind"]

    def json(self):
        return json.loads(self.payload.decode())

    def __repr__(self):
        return f"<kind {self.kind} aux {self.h['aux']} seq {self.h['seq']} {self.payload[:160]!r}>"


# Cryptography (docs/secure.md, "One round of one group")
def be32(i):
    return struct.pack(">I", i)


def hkdf(key, info):
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(key)


def prg(key, d):
    """AES-128-CTR keystream under key[:16] from the counter block key[16:], as little-endian uint32 words."""
    enc = Cipher(algorithms.AES(key[:16]), modes.CTR(key[16:])).encryptor()
    return np.frombuffer(enc.update(bytes(4 * d)), dtype="<u4").astype(np.uint64)


def shamir_split(secret, t, xs):
    """Shares (66 bytes big-endian) of a 32-byte secret at the points xs; t of them rebuild it."""
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(P) for _ in range(t - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):
            y = (y * x + c) % P
        out[x] = y.to_bytes(66, "big")
    return out


def raw_pub(key):
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# The encoding (docs/secure.md, "From float updates to the ring", "The rotation, exactly")
def segments(padded):
    out, left = [], padded
    while left:
        out.append(min(1 << (left.bit_length() - 1), 1 << 20))
        left -= out[-1]
    return out


def signs(seed_i, b):
    u64, m32 = np.uint64, np.uint64(0xFFFFFFFF)
    s = u64(seed_i ^ 0xA5A5A5A5A5A5A5A5)
    h = ((np.arange(b, dtype=u64) * u64(0x9E3779B97F4A7C15) + s) & m32) ^ (s >> u64(32))
    for shift, mul in ((16, 0x85EBCA6B), (13, 0xC2B2AE35)):
        h = ((h ^ (h >> u64(shift))) * u64(mul)) & m32
    h ^= h >> u64(16)
    return np.where((h >> u64(8)) < u64(2 ** 23), -1.0, 1.0)


def hadamard(x):
    """Unnormalized Walsh-Hadamard transform, Sylvester order (strides 1, 2, 4, ...)."""
    x, h = x.copy(), 1
    while h < len(x):
        v = x.reshape(-1, 2, h)
        a, b = v[:, 0, :].copy(), v[:, 1, :].copy()
        v[:, 0, :], v[:, 1, :] = a + b, a - b
        h *= 2
    return x


def rotate(x, seed, padded):
    y = np.zeros(padded)
    y[:len(x)] = x
    start = 0
    for i, b in enumerate(segments(padded)):
        seg = signs((seed * 1000003 + i) % 2 ** 64, b) * y[start:start + b]
        y[start:start + b] = hadamard(seg) / math.sqrt(b)
        start += b
    return y


def encode(update, enc, padded, rng):
    """Clip, rotate, divide by gamma, round at random under the norm bound, reduce mod 2^bits."""
    assert enc["sigma"] == 0, "this participant has no discrete Gaussian sampler (the tests use sigma 0)"
    x = np.asarray(update, np.float64)
    norm = float(np.linalg.norm(x))
    if norm > enc["clip"]:
        x = x * (enc["clip"] / norm)
    y = rotate(x, int(enc["seed"]), padded) / enc["gamma"]
    c, dd, beta = enc["clip"] / enc["gamma"], float(padded), float(enc["beta"])
    bound = c + math.sqrt(dd)
    if beta > 0:
        bound = min(bound, math.sqrt(c * c + dd / 4 + math.sqrt(2 * math.log(1 / beta)) * (c + math.sqrt(dd) / 2)))
    low = np.floor(y)
    for _ in range(1000):
        r = low + (rng.random(padded) < (y - low))
        if float(np.dot(r, r)) <= bound * bound:
            return (r.astype(np.int64) % (1 << enc["bits"])).astype(np.uint64)
    raise AssertionError("conditional rounding did not succeed")


# Wire formats (docs/secure.md, "Wire format")
def parse_roster(data):
    (count,), off, out = struct.unpack_from(">I", data), 4, {}
    for _ in range(count):
        idx = struct.unpack_from(">I", data, off)[0]
        out[idx] = (data[off + 4:off + 36], data[off + 36:off + 68], data[off + 68:off + 100])
        off += 102 + struct.unpack_from(">H", data, off + 100)[0]
    assert off == len(data) and list(out) == sorted(out), "roster: extra bytes or not in index order"
    return out


def parse_cts(data):
    count = struct.unpack_from(">I", data)[0]
    assert len(data) == 4 + count * 168, (len(data), count)
    return [(*struct.unpack_from(">II", data, 4 + i * 168), data[12 + i * 168:24 + i * 168],
             data[24 + i * 168:172 + i * 168]) for i in range(count)]


def parse_unmask_request(data):
    """(survivors, dropped); the signature list (count, then signer u32 + 64 bytes each) is skipped."""
    lists, off = [], 0
    for _ in range(2):
        count = struct.unpack_from(">I", data, off)[0]
        lists.append(list(struct.unpack_from(f">{count}I", data, off + 4)))
        off += 4 + 4 * count
    assert off + 4 + struct.unpack_from(">I", data, off)[0] * 68 == len(data)
    return lists


def pack_shares(shares):
    return be32(len(shares)) + b"".join(be32(o) + shares[o] for o in sorted(shares))


# The participant
class DocParticipant:
    def __init__(self, ctx, endpoint, pid):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.pid, self.seq, self.session, self.backlog = pid, time.time_ns(), 0, []

    def send(self, kind, payload=b"", *, round=0, offset=0, total=0, aux=0, dtype=0):
        self.seq += 1
        payload = bytes(payload)
        self.sock.send_multipart([HEADER.pack(b"FAGW", 2, kind, dtype, 0, len(payload), aux, round, self.seq,
                                              offset, total, crc32c(payload), 0, self.session), payload])
        return self.seq

    def recv(self, match, timeout=WAIT):
        for i, m in enumerate(self.backlog):
            if match(m):
                return self.backlog.pop(i)
        deadline = time.monotonic() + timeout
        for _ in range(100000):
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                break
            frames = self.sock.recv_multipart()
            assert len(frames) == 2 and len(frames[0]) == 64, frames
            h = dict(zip(FIELDS, HEADER.unpack(frames[0])))
            assert h["magic"] == b"FAGW" and h["version"] == 2 and h["reserved"] == 0, h
            assert h["length"] == len(frames[1]) and h["checksum"] == crc32c(frames[1]), h
            assert h["session"] == self.session or h["kind"] == STATE, h
            m = Msg(h, frames[1])
            if match(m):
                return m
            self.backlog.append(m)
        raise AssertionError(f"nothing matched within {timeout} s; backlog {self.backlog[-6:]}")

    def step(self, step, payload=b""):
        """SECAGG step: the SECAGG_REPLY with that aux, or the REJECTED of this step."""
        seq = self.send(SECAGG, payload, round=self.round, aux=step)
        m = self.recv(lambda m: (m.kind == SECAGG_REPLY and m.h["aux"] == step)
                      or (m.kind == REJECTED and m.h["seq"] in (seq, 0)))
        assert m.h["round"] == self.round, m
        return m

    def join(self):
        self.send(HELLO, json.dumps({"id": self.pid, "secret": secrets.token_hex(16)}).encode())
        m = self.recv(lambda m: m.kind in (STATE, REJECTED))
        assert m.kind == STATE, m
        self.session, self.state = m.h["session"], m.json()
        assert self.state["secure"] is not None and self.state["phase"] == "join", self.state
        self.round = self.state["round"]
        m = self.step(JOIN)
        assert m.kind == SECAGG_REPLY, m
        self.group = g = m.json()
        assert g["d"] == PADDED and 4 * g["d"] == self.state["secure"]["ring_bytes"], (g, self.state)
        assert self.state["secure"]["prg"] == "aes128-ctr", self.state  # the PRG docs/secure.md defines
        self.me, self.rid = g["index"], bytes.fromhex(g["round_id"])
        self.c_sk, self.s_sk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        self.b = secrets.token_bytes(32)
        return g

    def advertise(self, index=None):
        ad = (be32(self.me if index is None else index) + raw_pub(self.c_sk) + raw_pub(self.s_sk)
              + hashlib.sha256(self.b).digest() + struct.pack(">H", 0))
        m = self.step(ADVERTISE, ad)
        if m.kind == SECAGG_REPLY:
            self.roster = parse_roster(m.payload)
            assert self.roster[self.me] == (raw_pub(self.c_sk), raw_pub(self.s_sk), hashlib.sha256(self.b).digest())
        return m

    def share_aead(self, u, v, their_c_pk):
        shared = self.c_sk.exchange(X25519PublicKey.from_public_bytes(their_c_pk))
        return ChaCha20Poly1305(hkdf(shared, b"fedagg secagg share" + self.rid + be32(u) + be32(v)))

    def share(self):
        g, me = self.group, self.me
        nbrs = [v for v in g["neighbours"] if v in self.roster]
        assert len(nbrs) >= g["t"], (nbrs, g)
        xs = [v + 1 for v in nbrs]
        b_sh, s_sh = shamir_split(self.b, g["t"], xs), shamir_split(self.s_sk.private_bytes_raw(), g["t"], xs)
        cts = be32(len(nbrs))
        for v in nbrs:  # plaintext: the share of b, then the share of s_sk
            nonce, aad = secrets.token_bytes(12), self.rid + be32(me) + be32(v)
            body = self.share_aead(me, v, self.roster[v][0]).encrypt(nonce, b_sh[v + 1] + s_sh[v + 1], aad)
            cts += be32(me) + be32(v) + nonce + body
        assert len(cts) == 4 + 168 * len(nbrs)
        m = self.step(SHARES, cts)
        assert m.kind == SECAGG_REPLY, m
        self.held = {}  # sender -> (share of its b, share of its s_sk)
        for sender, receiver, nonce, body in parse_cts(m.payload):
            assert receiver == me and sender in g["neighbours"] and sender not in self.held
            pt = self.share_aead(sender, me, self.roster[sender][0]).decrypt(
                nonce, body, self.rid + be32(sender) + be32(me))
            self.held[sender] = (pt[:66], pt[66:])
        assert len(self.held) >= g["t"]

    def masked(self, update, rng):
        g, me = self.group, self.me
        y = encode(update, g["encoding"], g["d"], rng)
        y = y + prg(hkdf(self.b, b"fedagg secagg self mask" + self.rid + be32(me)), g["d"])
        for v in sorted(self.held):
            s_uv = self.s_sk.exchange(X25519PublicKey.from_public_bytes(self.roster[v][1]))
            mask = prg(hkdf(s_uv, b"fedagg secagg pair mask" + self.rid + be32(min(me, v)) + be32(max(me, v))), g["d"])
            y = y + mask if me < v else y + (2 ** 32 - mask)
        return (y % (1 << g["bits"])).astype("<u4").tobytes()

    def upload(self, data):
        """CHUNKs (dtype 2) within the credits, then COMMIT: ACCEPTED or the first REJECTED."""
        cb, credits = self.state["chunk_bytes"], self.state["credits"]
        sent = off = 0
        for _ in range(4 * (len(data) // cb + 2)):
            while sent < credits and off < len(data):
                self.send(CHUNK, data[off:off + cb], round=self.round, offset=off, total=len(data), dtype=2)
                off, sent = off + min(cb, len(data) - off), sent + 1
            if not sent:
                break
            m = self.recv(lambda m: m.kind in (CREDIT, REJECTED))
            if m.kind == REJECTED:
                return m
            sent -= 1
        self.send(COMMIT, round=self.round, total=len(data))
        return self.recv(lambda m: m.kind in (ACCEPTED, REJECTED))

    def unmask(self):
        m = self.step(UNMASK)
        assert m.kind == SECAGG_REPLY, m
        survivors, dropped = parse_unmask_request(m.payload)
        assert self.me in survivors and len(survivors) >= self.group["min_survivors"]
        assert not set(survivors) & set(dropped), "asked for both shares of one participant"
        seeds = {v: sh[0] for v, sh in self.held.items() if v in survivors}
        keys = {v: sh[1] for v, sh in self.held.items() if v in dropped}
        m = self.step(RESPONSE, be32(self.me) + pack_shares(seeds) + pack_shares(keys))
        assert m.kind == SECAGG_REPLY and m.payload == b"", m
        return survivors, dropped

    def final_model(self):
        """Wait for ROUND, then download the model by GET_MODEL windows of one chunk."""
        m = self.recv(lambda m: m.kind == ROUND)
        buf = b""
        for off in range(0, 4 * D, self.state["chunk_bytes"]):
            seq = self.send(GET_MODEL, round=m.h["round"], offset=off, aux=1)
            got = self.recv(lambda m: m.kind == MODEL or (m.kind == REJECTED and m.h["seq"] == seq))
            assert got.kind == MODEL and got.h["offset"] == off and got.h["total"] == 4 * D, got
            buf += got.payload
        return m.json(), np.frombuffer(buf, "<f4")


# The server under test, fedagg's own participants, and the expected model
def updates(seed, n=4, norm=5.0):
    """Seeded float32 updates of norm 2.5 to 5, well below clip (100): nothing is clipped."""
    rng = np.random.default_rng(seed)
    us = [rng.standard_normal(D) for _ in range(n)]
    return [(u * (norm * rng.uniform(0.5, 1.0) / np.linalg.norm(u))).astype(np.float32) for u in us]


def run_round(script, seed, **secure):
    """One secure round of a bucket of 4 (model 0, server_lr 1): three fedagg Clients and the doc participant,
    driven by script(p, group, its update). Returns the group, the new model, the round record, the updates."""
    cfg = {"bucket_size": 4, "clip": 100.0, "sigma": 0.0, "phase_seconds": 10.0, **secure}
    records, errors, ups = [], [], updates(seed)
    # The documents do not say so, but the server refuses min_updates below bucket_size.
    server = Server(np.zeros(D, np.float32), ServerConfig(
        bind="tcp://127.0.0.1:0", rule="mean", quorum=4, min_updates=4, rounds=1, deadline=30.0,
        chunk_bytes=4096, linger=20.0, secure=SecureConfig(**cfg)), on_round=records.append)
    serving = threading.Thread(target=server.serve, daemon=True)
    serving.start()

    def client(pid, update):
        try:
            with fedagg.Client(server.endpoint, pid, timeout=20) as c:
                rnd, _ = c.model()
                c.submit(update, rnd)
        except Exception as e:  # reported below
            errors.append((pid, e))

    threads = [threading.Thread(target=client, args=(f"ref-{i}", ups[i]), daemon=True) for i in range(3)]
    ctx = zmq.Context()
    p = DocParticipant(ctx, server.endpoint, "doc")
    try:
        for t in threads:
            t.start()
        g = p.join()
        assert g["n"] == 4 and len(g["neighbours"]) == g["k"] and g["encoding"]["gamma"] > 0, g
        assert g["k"] / 2 < g["t"] <= g["k"] and len(bytes.fromhex(g["round_id"])) == 32, g
        script(p, g, ups[3])
        body, model = p.final_model()
    finally:
        for t in threads:
            t.join(WAIT)
        server.stop()
        serving.join(WAIT)
        p.sock.close(0)
        ctx.destroy(linger=0)
    assert not serving.is_alive() and not any(t.is_alive() for t in threads)
    assert not errors, errors
    assert len(records) == 1, records
    assert body["previous"]["model_updated"] is True and body["previous"]["closed_by"] == "secure", body
    assert records[0]["closed_by"] == "secure" and records[0]["model_updated"] is True, records[0]
    return g, model, records[0], ups


def check_model(model, ups, gamma):
    """Each participant rounds each rotated coordinate of update / gamma by less than 1 (sigma is 0),
    so its error, times gamma, has L2 norm < gamma sqrt(PADDED); the rotation is orthogonal and the
    mean of the bucket averages these errors, so the decoded mean is within gamma sqrt(PADDED) of the
    exact mean in L2, plus the model's float32 rounding (2^-24 relative per coordinate)."""
    exact = np.mean(np.stack(ups).astype(np.float64), axis=0)
    err = np.linalg.norm(model.astype(np.float64) - exact)
    bound = gamma * math.sqrt(PADDED) + 2.0 ** -23 * np.linalg.norm(exact)
    assert err <= bound, (err, bound)
    assert np.max(np.abs(exact)) > 1000 * bound  # not vacuous: a wrong mask or share would be far off


# Tests
def test_crc32c_and_rotation():
    assert crc32c(b"123456789") == 0xE3069283 and crc32c(b"") == 0
    assert segments(PADDED) == [1024, 512]
    x = np.random.default_rng(0).standard_normal(PADDED)  # orthogonal: the norm is kept
    assert abs(np.linalg.norm(rotate(x, 7, PADDED)) - np.linalg.norm(x)) < 1e-9


def test_doc_participant_in_a_bucket_with_fedagg_clients():
    def script(p, g, update):
        assert p.advertise().kind == SECAGG_REPLY and sorted(p.roster) == [0, 1, 2, 3]
        p.share()
        acc = p.upload(p.masked(update, np.random.default_rng(5)))
        assert acc.kind == ACCEPTED and acc.json() == {"round": p.round, "id": "doc"}, acc
        survivors, dropped = p.unmask()
        assert sorted(survivors) == [0, 1, 2, 3] and dropped == []

    g, model, rec, ups = run_round(script, seed=1)
    check_model(model, ups, g["encoding"]["gamma"])
    assert sorted(rec["accepted"]) == ["doc", "ref-0", "ref-1", "ref-2"], rec


def test_doc_participant_drops_after_its_masked_input():
    """Silent after its masked input's ACCEPTED (no UNMASK, no RESPONSE): its self-mask seed is rebuilt
    from its neighbours' seed shares and its input stays in the bucket's sum."""
    def script(p, g, update):
        assert p.advertise().kind == SECAGG_REPLY
        p.share()
        assert p.upload(p.masked(update, np.random.default_rng(6))).kind == ACCEPTED

    t0 = time.monotonic()
    g, model, rec, ups = run_round(script, seed=2, phase_seconds=2.0)
    assert time.monotonic() - t0 < WAIT
    check_model(model, ups, g["encoding"]["gamma"])
    assert sorted(rec["accepted"]) == ["doc", "ref-0", "ref-1", "ref-2"], rec


def test_malformed_advertisement_and_masked_input_are_refused():
    """ADVERTISE with another participant's index: `malformed`; a masked input of another size or
    dtype: `secure`. The round goes on: the doc participant, in U2 but not U3, is unmasked away
    (its pair masks removed through its neighbours' key shares) and the model is the others' mean."""
    def refused(m, reason, seq):
        assert m.kind == REJECTED and m.json()["reason"] == reason, m
        assert m.h["seq"] == m.json()["seq"] == seq, (m, seq)

    def script(p, g, update):
        seq = p.seq + 1
        refused(p.advertise(index=(p.me + 1) % g["n"]), "malformed", seq)
        assert p.advertise().kind == SECAGG_REPLY and sorted(p.roster) == [0, 1, 2, 3]
        p.share()
        data = p.masked(update, np.random.default_rng(7))
        for total, dtype in ((4 * D, 2), (len(data) + 4, 2), (len(data), 1)):  # size, size, dtype
            seq = p.send(CHUNK, data[:4096], round=p.round, offset=0, total=total, dtype=dtype)
            refused(p.recv(lambda m: m.kind == CREDIT or (m.kind == REJECTED and m.h["seq"] == seq)), "secure", seq)

    # max_dropout 0.3: min_survivors 3, so the bucket may lose the doc participant
    g, model, rec, ups = run_round(script, seed=3, phase_seconds=2.0, max_dropout=0.3)
    assert g["min_survivors"] <= 3, g
    check_model(model, ups[:3], g["encoding"]["gamma"])
    assert sorted(rec["accepted"]) == ["ref-0", "ref-1", "ref-2"], rec
    assert rec["rejected_counts"].get("malformed", 0) >= 1 and rec["rejected_counts"].get("secure", 0) >= 3, rec
