"""The bytes of the SecAgg+ messages: a whole round carried as bytes gives the exact sum, and
every truncated, padded, out-of-range, repeated or random message is refused with ValueError."""

import numpy as np
import pytest

pytest.importorskip("cryptography")
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from fedagg.secure import Params, Participant, Server, UnmaskResponse, wire  # noqa: E402
from test_secure_protocol import inputs, rid, ring_sum  # noqa: E402


def bytes_round(p, xs, drop=frozenset(), identities=False):
    """A round where every message crosses as bytes and is parsed on the other side."""
    keys = {i: Ed25519PrivateKey.generate() for i in range(p.n)} if identities else None
    vks = {i: k.public_key() for i, k in keys.items()} if identities else None
    server = Server(p, rid("wire"), rid("g"), verify_keys=vks)
    parts = {i: Participant(p, i, rid("wire"), rid("g"), signing_key=keys and keys[i], verify_keys=vks)
             for i in range(p.n)}
    ads = [wire.parse_advertisement(wire.advertisement(q.advertise()), p) for q in parts.values()]
    roster_bytes = wire.roster(server.collect_advertisements(ads))
    shares = {i: wire.ciphertexts(q.share_keys(wire.parse_roster(roster_bytes, p))) for i, q in parts.items()}
    inbox = server.route_shares({i: wire.parse_ciphertexts(b, p) for i, b in shares.items()})
    inbox_bytes = {i: wire.ciphertexts(cts) for i, cts in inbox.items()}
    masked = {i: q.masked_input(xs[i], wire.parse_ciphertexts(inbox_bytes[i], p))
              for i, q in parts.items() if i not in drop}
    u3 = server.collect_masked(masked)
    if identities:
        u3_bytes = wire.survivors(u3)
        sigs = {i: parts[i].consistency(wire.parse_survivors(u3_bytes, p)) for i in sorted(u3)}
        server.collect_signatures(sigs)
    req_bytes = wire.unmask_request(server.unmask_request())
    resp = []
    for i in sorted(u3):
        answer = parts[i].unmask(wire.parse_unmask_request(req_bytes, p))
        resp.append(wire.parse_unmask_response(wire.unmask_response(answer), p))
    return server.finish(resp), u3, (roster_bytes, shares, inbox_bytes, req_bytes)


@pytest.mark.parametrize("identities", [False, True])
def test_a_round_carried_as_bytes_gives_the_exact_sum(identities):
    p = Params(n=10, k=6, t=4, d=300, min_survivors=5)
    xs = inputs(10, p.d, 32, 1)
    total, u3, _ = bytes_round(p, xs, drop={3}, identities=identities)
    assert u3 == set(range(10)) - {3}
    np.testing.assert_array_equal(total, ring_sum(xs, u3, 32))


def _messages():
    p = Params(n=6, k=4, t=3, d=16, min_survivors=3)
    _, _, (roster_bytes, shares, inbox_bytes, req_bytes) = bytes_round(p, inputs(6, 16, 32, 2), identities=True)
    q = Participant(p, 0, rid("x"), rid("g"))
    ad = wire.advertisement(q.advertise())
    resp = wire.unmask_response(UnmaskResponse(2, {1: bytes(66), 3: bytes(66)}, {4: bytes(66)}))
    return p, {"advertisement": (ad, wire.parse_advertisement), "roster": (roster_bytes, wire.parse_roster),
               "ciphertexts": (shares[0], wire.parse_ciphertexts), "inbox": (inbox_bytes[1], wire.parse_ciphertexts),
               "survivors": (wire.survivors({0, 2, 5}), wire.parse_survivors),
               "unmask request": (req_bytes, wire.parse_unmask_request),
               "unmask response": (resp, wire.parse_unmask_response)}


@pytest.mark.parametrize("name", ["advertisement", "roster", "ciphertexts", "inbox", "survivors", "unmask request",
                                  "unmask response"])
def test_truncated_or_padded_messages_are_refused(name):
    p, msgs = _messages()
    data, parse = msgs[name]
    parse(data, p)  # the real one parses
    for cut in range(len(data)):
        with pytest.raises(ValueError):
            parse(data[:cut], p)
    with pytest.raises(ValueError, match="after the message"):
        parse(data + b"\0", p)


@pytest.mark.parametrize("name", ["advertisement", "roster", "ciphertexts", "survivors", "unmask request",
                                  "unmask response"])
def test_random_bytes_parse_or_are_refused_with_value_error(name):
    # any other exception escaping (IndexError, struct.error, KeyError ...) fails the test
    p, msgs = _messages()
    data, parse = msgs[name]
    rng = np.random.default_rng(len(name))
    refused = 0
    for trial in range(1500):  # bounded
        noisy = bytearray(data)
        for _ in range(int(rng.integers(1, 4))):
            noisy[int(rng.integers(len(noisy)))] = int(rng.integers(256))
        for blob in (bytes(noisy), rng.bytes(int(rng.integers(0, 2 * len(data))))):
            try:
                parse(blob, p)
            except ValueError:
                refused += 1
    assert refused > 1500  # every random blob of the wrong length at least


def test_counts_indices_and_repeats_are_checked():
    p = Params(n=6, k=4, t=3, d=16)
    u32 = lambda i: i.to_bytes(4, "big")  # noqa: E731
    with pytest.raises(ValueError, match="more than the n = 6"):
        wire.parse_survivors(u32(7) + b"".join(u32(i) for i in range(7)), p)
    with pytest.raises(ValueError, match="not a participant"):
        wire.parse_survivors(u32(1) + u32(6), p)
    with pytest.raises(ValueError, match="strictly increasing"):
        wire.parse_survivors(u32(2) + u32(1) + u32(1), p)
    with pytest.raises(ValueError, match="both shares"):
        share = bytes(66)
        wire.parse_unmask_response(u32(0) + u32(1) + u32(2) + share + u32(1) + u32(2) + share, p)
    with pytest.raises(ValueError, match="signature of 3 bytes"):
        wire.parse_advertisement(u32(0) + bytes(96) + (3).to_bytes(2, "big") + b"abc", p)
    with pytest.raises(ValueError, match="expected bytes"):
        wire.parse_roster("text", p)
    up, down = wire.sizes(Params.for_group(64, 1000))
    assert up < 10_000 and down < 30_000  # the key phases are KB; the masked vector is 4 bytes a coordinate
