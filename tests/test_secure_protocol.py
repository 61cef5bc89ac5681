"""SecAgg+ rounds played in one process: exact sums with dropouts at every phase, and each threat
the protocol documents (docs/secure.md) ending as stated."""

import hashlib

import numpy as np
import pytest

pytest.importorskip("cryptography")
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402

from fedagg.secure import (Ciphertext, Params, Participant, RoundAborted, RoundRefused, Server,  # noqa: E402
                           UnmaskRequest, shamir)


def rid(tag: str) -> bytes:
    return hashlib.sha256(tag.encode()).digest()


def inputs(n, d, bits, seed):
    rng = np.random.default_rng(seed)
    return {i: rng.integers(0, 2**bits, d, dtype=np.uint64).astype(np.uint32) for i in range(n)}


def ring_sum(xs, ids, bits):
    acc = np.zeros_like(next(iter(xs.values())), dtype=np.uint64)
    for i in ids:
        acc = (acc + xs[i]) % (1 << bits)
    return acc.astype(np.uint32)


class Round:
    """A whole round: the server and n participants, with hooks to drop or tamper. A participant
    that aborts (RoundAborted) goes silent, as it would on a network: `aborted` says why."""

    def __init__(self, params, *, tag="round", identities=False, graph="graph"):
        self.p = params
        self.round_id, self.seed = rid(tag), rid(graph)
        keys = {i: Ed25519PrivateKey.generate() for i in range(params.n)} if identities else None
        vks = {i: k.public_key() for i, k in keys.items()} if identities else None
        self.server = Server(params, self.round_id, self.seed, verify_keys=vks)
        self.parts = {i: Participant(params, i, self.round_id, self.seed,
                                     signing_key=None if keys is None else keys[i], verify_keys=vks)
                      for i in range(params.n)}
        self.identities = identities
        self.aborted = {}

    def _each(self, ids, call):
        out = {}
        for i in sorted(ids):
            try:
                out[i] = call(i)
            except RoundAborted as e:
                self.aborted[i] = str(e)
        return out

    def run(self, xs, drop=(set(), set(), set(), set()), tamper=None):
        """drop[k]: participants that go silent before phase k's message."""
        tamper = tamper or {}
        alive = set(self.parts) - drop[0]
        roster = self.server.collect_advertisements(self._each(alive, lambda i: self.parts[i].advertise()).values())
        alive -= drop[1]
        shares = self._each(alive & set(roster), lambda i: self.parts[i].share_keys(roster))
        inbox = self.server.route_shares(tamper.get("shares", lambda s: s)(shares))
        inbox = tamper.get("inbox", lambda b: b)(inbox)
        alive -= drop[2]
        masked = self._each(alive & set(inbox), lambda i: self.parts[i].masked_input(xs[i], inbox.get(i, [])))
        u3 = self.server.collect_masked(tamper.get("masked", lambda m: m)(masked))
        alive -= drop[3]
        if self.identities:
            views = tamper.get("views", lambda i, u: u)
            sigs = self._each(alive & u3, lambda i: self.parts[i].consistency(views(i, u3)))
            self.server.collect_signatures(sigs)
        req = self.server.unmask_request()
        reqs = tamper.get("request", lambda i, r: r)
        responses = self._each(alive & u3, lambda i: self.parts[i].unmask(reqs(i, req)))
        return self.server.finish(responses.values()), u3


@pytest.mark.parametrize("n,k,t", [(2, 1, 1), (5, 4, 3), (16, 6, 4), (40, 12, 9)])
@pytest.mark.parametrize("bits", [32, 20])
def test_the_sum_is_the_exact_ring_sum(n, k, t, bits):
    p = Params(n=n, k=k, t=t, d=1003, bits=bits, min_survivors=max(2, t))
    xs = inputs(n, p.d, bits, n + bits)
    total, u3 = Round(p).run(xs)
    assert u3 == set(range(n))
    np.testing.assert_array_equal(total, ring_sum(xs, range(n), bits))


def test_a_hundred_participants_with_dropouts_at_every_phase():
    p = Params.for_group(100, d=2000, max_dropout=0.3)
    assert 2 * p.t > p.k and p.min_survivors == 70
    xs = inputs(100, p.d, 32, 7)
    rng = np.random.default_rng(0)
    order = [int(i) for i in rng.permutation(100)]
    drop = (set(order[:5]), set(order[5:10]), set(order[10:16]), set(order[16:22]))
    r = Round(p, tag="hundred")
    total, u3 = r.run(xs, drop)
    # who is summed: those whose masked input arrived (dropped before phase 2 are out; dropped
    # after it are in: their input is in the sum and their self-mask is rebuilt from shares)
    assert u3 == set(range(100)) - drop[0] - drop[1] - drop[2]
    np.testing.assert_array_equal(total, ring_sum(xs, u3, 32))


@pytest.mark.parametrize("phase", [0, 1, 2, 3])
def test_dropouts_in_each_phase(phase):
    p = Params(n=12, k=8, t=5, d=300, min_survivors=6)  # 3 silent neighbours leave t
    xs = inputs(12, p.d, 32, phase)
    drop = [set(), set(), set(), set()]
    drop[phase] = {1, 5, 8}
    r = Round(p, tag=f"phase {phase}")
    total, u3 = r.run(xs, tuple(drop))
    # out: the silent ones before phase 3, and any left with fewer than t live neighbours
    assert all("fewer than t" in why for why in r.aborted.values())
    assert u3 == set(range(12)) - (drop[0] | drop[1] | drop[2]) - set(r.aborted)
    np.testing.assert_array_equal(total, ring_sum(xs, u3, 32))


def test_too_few_survivors_is_refused_never_decoded():
    p = Params(n=10, k=4, t=3, d=100, min_survivors=8)
    xs = inputs(10, p.d, 32, 1)
    with pytest.raises(RoundRefused, match="only 7 participants sent a masked input"):
        Round(p).run(xs, (set(), set(), {0, 1, 2}, set()))


def test_too_few_share_holders_alive_is_refused():
    # everyone survives phase 2, then too many of 0's neighbours go silent to rebuild its seed
    p = Params(n=10, k=4, t=3, d=100, min_survivors=3)
    r = Round(p)
    nb = sorted(r.server.graph[0])
    with pytest.raises(RoundRefused, match="fewer than t = 3"):
        r.run(inputs(10, p.d, 32, 2), (set(), set(), set(), set(nb[:2])))


def test_a_server_asking_both_shares_of_one_participant_is_refused():
    p = Params(n=8, k=4, t=3, d=64, min_survivors=4)
    r = Round(p)

    def both(i, req):  # claims participant 3 both survived and dropped
        return UnmaskRequest(req.survivors, req.dropped | {3}, req.signatures)

    with pytest.raises(RoundRefused, match="fewer than t"):
        r.run(inputs(8, p.d, 32, 3), tamper={"request": both})
    assert len(r.aborted) == 8 and all("asked for both shares of [3]" in why for why in r.aborted.values())


def test_a_server_lying_about_who_dropped_is_caught_by_the_signatures():
    # With identity keys: the server tells 3's neighbours that 3 dropped (to get its mask key)
    # while 3 sent its input. Those neighbours signed the survivors they were shown, which
    # include 3, so the altered request fails their own check.
    p = Params(n=8, k=4, t=3, d=64, min_survivors=4)
    r = Round(p, identities=True)

    def lie(i, req):
        if i in r.server.graph[3]:
            return UnmaskRequest(req.survivors - {3}, req.dropped | {3}, req.signatures)
        return req

    with pytest.raises(RoundRefused, match="fewer than t"):
        r.run(inputs(8, p.d, 32, 4), tamper={"request": lie})
    assert set(r.aborted) == r.server.graph[3]
    assert all("survivors differ" in why for why in r.aborted.values())


def test_a_different_story_for_each_participant_is_caught_by_the_signatures():
    # The attack the consistency phase exists for: each neighbour w of 3 is told that 3 and w
    # survived but 3's other neighbours dropped, so w would reveal 3's seed share and the mask
    # keys of 3's partners; together they unmask 3's input. Each view is unique, so no w sees
    # t neighbours' signatures over its own view.
    p = Params(n=10, k=4, t=3, d=64, min_survivors=4)
    r = Round(p, identities=True)
    nb3 = r.server.graph[3]

    def view(i, u3):
        return u3 - (nb3 - {i}) if i in nb3 else u3

    def request(i, req):
        if i in nb3:
            mine = view(i, req.survivors)
            return UnmaskRequest(mine, req.dropped | (req.survivors - mine), req.signatures)
        return req

    with pytest.raises(RoundRefused):
        r.run(inputs(10, p.d, 32, 5), tamper={"views": view, "request": request})
    assert nb3 <= set(r.aborted)  # every holder of 3's secrets refused
    assert all("signed the survivors it was shown, fewer than t" in r.aborted[w] for w in nb3)


def test_the_same_story_for_everyone_passes_with_signatures():
    p = Params(n=10, k=6, t=4, d=64, min_survivors=4)
    xs = inputs(10, p.d, 32, 13)
    total, u3 = Round(p, identities=True).run(xs, (set(), set(), {7}, {2}))
    np.testing.assert_array_equal(total, ring_sum(xs, set(range(10)) - {7}, 32))


def test_a_forged_advertisement_is_refused_with_identity_keys():
    p = Params(n=6, k=4, t=3, d=16, min_survivors=4)
    r = Round(p, identities=True)
    ads = [q.advertise() for q in r.parts.values()]
    forged = ads[2].__class__(2, bytes(range(32)), bytes(range(1, 33)), bytes(32), ads[2].signature)
    roster = r.server.collect_advertisements(ads[:2] + [forged] + ads[3:])
    assert 2 not in roster and "bad signature" in r.server.refused[2]
    w = min(r.server.graph[2])  # a neighbour of 2 checks 2's advertisement itself
    with pytest.raises(RoundAborted, match="bad signature"):
        r.parts[w].share_keys({**roster, 2: forged})


@pytest.mark.parametrize("how", ["flip", "swap_ends", "other_round", "duplicate", "withheld"])
def test_forged_replayed_or_withheld_share_ciphertexts_abort(how):
    p = Params(n=8, k=4, t=3, d=64, min_survivors=4)
    r = Round(p, tag="this round")
    other = Round(p, tag="another round")  # the same graph, another round id
    # a ciphertext of the other round, between the same two indices
    other_roster = other.server.collect_advertisements([q.advertise() for q in other.parts.values()])
    other_cts = {i: q.share_keys(other_roster) for i, q in other.parts.items()}

    def tamper(inbox):
        victim = 0
        cts = list(inbox[victim])
        c = cts[0]
        if how == "flip":
            body = bytearray(c.body)
            body[5] ^= 1
            cts[0] = Ciphertext(c.sender, c.receiver, c.nonce, bytes(body))
        elif how == "swap_ends":  # a ciphertext re-labelled as coming from another neighbour
            cts[0] = Ciphertext(cts[1].sender, c.receiver, c.nonce, c.body)
            cts[1] = Ciphertext(c.sender, c.receiver, cts[1].nonce, cts[1].body)
        elif how == "other_round":
            cts[0] = next(o for o in other_cts[c.sender] if o.receiver == victim)
        elif how == "duplicate":
            cts.append(c)
        elif how == "withheld":  # all but t - 1: the participant would be masked by too few keys
            cts = cts[: p.t - 1]
        inbox[victim] = cts
        return inbox

    xs = inputs(8, p.d, 32, 6)
    total, u3 = r.run(xs, tamper={"inbox": tamper})
    # the victim refuses to mask with what it got; for the others it is a dropout after phase 1
    why = {"duplicate": "two share ciphertexts", "withheld": "fewer than t"}.get(how, "does not authenticate")
    assert set(r.aborted) == {0} and why in r.aborted[0]
    assert u3 == set(range(8)) - {0}
    np.testing.assert_array_equal(total, ring_sum(xs, u3, 32))


@pytest.mark.parametrize("bad", ["size", "ring", "dtype"])
def test_a_bad_masked_input_is_left_out_and_the_rest_summed(bad):
    p = Params(n=8, k=4, t=3, d=64, bits=16, min_survivors=4)
    xs = inputs(8, p.d, 16, 8)

    def tamper(masked):
        y = masked[2]
        masked[2] = {"size": y[:-1], "ring": y | np.uint32(1 << 20), "dtype": y.astype(np.int64)}[bad]
        return masked

    r = Round(p)
    total, u3 = r.run(xs, tamper={"masked": tamper})
    assert 2 not in u3 and "masked input of 2" in r.server.refused[2]
    np.testing.assert_array_equal(total, ring_sum(xs, set(range(8)) - {2}, 16))


def lie_in_phase_4(r, liars, delta=1):
    """The liars answer phase 4 with every seed share they give moved by delta (another polynomial)."""
    for i in liars:
        honest = r.parts[i].unmask

        def bad(req, honest=honest):
            res = honest(req)
            sh = {v: shamir.to_bytes((shamir.from_bytes(s) + delta) % shamir.P) for v, s in res.self_shares.items()}
            return type(res)(res.index, sh, res.key_shares)

        r.parts[i].unmask = bad


@pytest.mark.parametrize("liar", range(8))
def test_a_wrong_share_from_any_neighbour_is_outvoted(liar):
    # every position of the wrong share among the ones the server gets (k = 8, t = 5: 3 spare):
    # the server tries other t-subsets and keeps the secret that matches the commitment
    p = Params(n=9, k=8, t=5, d=32, min_survivors=5)
    xs = inputs(9, p.d, 32, 20 + liar)
    r = Round(p, tag=f"liar {liar}")
    lie_in_phase_4(r, [liar], delta=2**300 if liar % 2 else 1)
    total, u3 = r.run(xs)
    np.testing.assert_array_equal(total, ring_sum(xs, range(9), 32))


def test_three_wrong_shares_are_outvoted_with_spares():
    p = Params(n=15, k=14, t=8, d=32, min_survivors=8)
    xs = inputs(15, p.d, 32, 30)
    r = Round(p, tag="three liars")
    lie_in_phase_4(r, [0, 6, 13])
    total, u3 = r.run(xs)
    np.testing.assert_array_equal(total, ring_sum(xs, range(15), 32))


def test_shares_for_only_some_neighbours_are_refused():
    # a Byzantine participant that sends t of its k ciphertexts would be masked against neighbours
    # that do not hold its shares: the server takes it out at phase 1, and the rest sums exactly
    p = Params(n=8, k=6, t=4, d=32, min_survivors=4)
    xs = inputs(8, p.d, 32, 40)
    r = Round(p, tag="partial shares")

    def partial(shares):
        shares[5] = shares[5][: p.t]
        return shares

    total, u3 = r.run(xs, tamper={"shares": partial})
    assert 5 not in r.server.u2 and "not one for every neighbour" in r.server.refused[5]
    assert u3 == set(range(8)) - {5}
    np.testing.assert_array_equal(total, ring_sum(xs, u3, 32))


def test_wrong_shares_beyond_the_slack_refuse_the_round():
    p = Params(n=5, k=4, t=3, d=64, min_survivors=3)
    xs = inputs(5, p.d, 32, 12)
    r = Round(p, tag="too many wrong shares")
    lie_in_phase_4(r, [1, 2])
    with pytest.raises(RoundRefused, match="does not match its commitment"):
        r.run(xs)


def test_hostile_containers_are_refused_not_crashing_the_server():
    p = Params(n=6, k=4, t=3, d=16, min_survivors=3)
    r = Round(p)
    roster = r.server.collect_advertisements([q.advertise() for q in r.parts.values()])
    shares = {i: q.share_keys(roster) for i, q in r.parts.items()}
    shares[0] = "not a list"
    shares[1] = [None, 5]
    r.server.route_shares(shares)
    assert {0, 1} <= set(r.server.refused) and r.server.u2 == set(range(2, 6))


def test_the_servers_view_does_not_reveal_one_input():
    # Everything the server holds after phase 2, plus t - 1 shares of participant 0's seed (what
    # it gets if fewer than t neighbours answer): no t - 1 subset rebuilds the seed (checked
    # against the commitment), and the masked input alone is uncorrelated with the input.
    p = Params(n=10, k=6, t=4, d=20_000, min_survivors=4)
    r = Round(p)
    xs = inputs(10, p.d, 32, 10)
    xs[0] = np.arange(p.d, dtype=np.uint32)  # a very structured input
    roster = r.server.collect_advertisements([q.advertise() for q in r.parts.values()])
    shares = {i: q.share_keys(roster) for i, q in r.parts.items()}
    inbox = r.server.route_shares(shares)
    masked = {i: q.masked_input(xs[i], inbox[i]) for i, q in r.parts.items()}
    r.server.collect_masked(masked)
    y0 = masked[0].astype(np.float64)
    assert abs(np.corrcoef(y0, xs[0].astype(np.float64))[0, 1]) < 0.05
    # the server's ciphertexts are unreadable to it; t - 1 shares (taken from the holders
    # directly, standing for a partial phase 4) do not give the seed
    holders = sorted(i for i in r.parts if 0 in r.parts[i]._held)
    pts = [(h + 1, shamir.from_bytes(r.parts[h]._held[0][0])) for h in holders[: p.t - 1]]
    commitment = roster[0].commitment
    for extra_guess in range(3):  # any interpolation through t - 1 shares + a guessed point
        try:
            s = shamir.combine(pts + [(1000 + extra_guess, extra_guess)])
        except ValueError:
            continue
        assert hashlib.sha256(s).digest() != commitment
    # with t shares it would (the check is not vacuous)
    pts_t = [(h + 1, shamir.from_bytes(r.parts[h]._held[0][0])) for h in holders[: p.t]]
    assert hashlib.sha256(shamir.combine(pts_t)).digest() == commitment


def test_participants_refuse_out_of_order_calls_and_bad_parameters():
    p = Params(n=4, k=3, t=2, d=8)
    q = Participant(p, 0, rid("x"), rid("g"))
    with pytest.raises(RoundAborted, match="out of order"):
        q.masked_input(np.zeros(8, np.uint32), [])
    q.advertise()
    with pytest.raises(RoundAborted, match="out of order"):
        q.advertise()
    with pytest.raises(ValueError, match="round_id"):
        Participant(p, 0, b"short", rid("g"))
    with pytest.raises(ValueError, match="index"):
        Participant(p, 4, rid("x"), rid("g"))
    with pytest.raises(ValueError, match="k / 2 < t"):
        Params(n=10, k=4, t=2, d=8)
    with pytest.raises(ValueError, match="bits"):
        Params(n=10, k=4, t=3, d=8, bits=33)
    with pytest.raises(ValueError, match="min_survivors"):
        Params(n=10, k=4, t=3, d=8, min_survivors=11)
    with pytest.raises(ValueError, match="d must be"):
        Params(n=10, k=4, t=3, d=0)
    with pytest.raises(TypeError, match="integer"):
        Params(n=10, k=4, t=3.0, d=8)


def test_inputs_outside_the_ring_are_refused_by_the_participant():
    p = Params(n=4, k=3, t=2, d=8, bits=8)
    r = Round(p)
    xs = inputs(4, 8, 8, 11)
    xs[1] = xs[1] + np.uint32(256)
    with pytest.raises(ValueError, match="outside the ring"):
        r.run(xs)


def test_keys_are_fresh_per_round():
    p = Params(n=4, k=3, t=2, d=8)
    a = Participant(p, 0, rid("a"), rid("g")).advertise()
    b = Participant(p, 0, rid("a"), rid("g")).advertise()
    assert a.c_pk != b.c_pk and a.s_pk != b.s_pk and a.commitment != b.commitment


@pytest.mark.parametrize("n", [2, 3, 5, 12, 13, 16, 64, 100, 1000])
def test_for_group_gives_valid_parameters(n):
    p = Params.for_group(n, d=10, max_dropout=0.2)
    assert 2 * p.t > p.k and p.t <= p.k and p.min_survivors >= max(2, p.t)
    assert p.k == n - 1 or (p.k % 2 == 0 and p.k < n - 1)
    assert p.min_survivors >= 0.8 * n - 1e-9
    with pytest.raises(ValueError, match="max_dropout"):
        Params.for_group(n, d=10, max_dropout=0.5)
