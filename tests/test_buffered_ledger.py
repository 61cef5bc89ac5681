"""A buffered (FedBuff) server with a ledger: each model version is a round on chain.

Version v's commit window (key = session << 64 | v) closes once K participants committed; each
commits the hash of (the version its update was computed on, the update), so the staleness the
update is weighed by is fixed on chain before anything is revealed. The version takes every
committed reveal. Checked here on the in-process chain: three versions with stale participants,
a participant that lies about its base (refused `commitment`, with evidence), one too stale
(refused `stale`); the models against a float64 recomputation of FedBuff's rule; the bundles
pass `fedagg audit`, which catches a base rewritten after the fact.
"""

import json
import math
import shutil
import threading
import time

import numpy as np
import pytest

pytest.importorskip("zmq")
pytest.importorskip("web3")
pytest.importorskip("vyper")
pytest.importorskip("nacl")

from fedagg import ledger  # noqa: E402
from fedagg.ledger import LedgerGate, LedgerParticipant, bundle, crypto, merkle  # noqa: E402
from fedagg.transport import Client, Server, ServerConfig, TransportError  # noqa: E402

ETH = 10**18
D = 64
K = 4


def delta(i: int) -> np.ndarray:
    return np.random.default_rng(100 + i).normal(size=D).astype(np.float32)


def _wait_for_window(c: Client, version: int, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while True:
        st = c.status()
        if st["round"] == version and st.get("phase") == "commit":
            return
        assert st["round"] <= version, f"the server passed version {version} ({st['round']})"
        assert time.monotonic() < end, f"version {version}'s commit window never opened"
        time.sleep(0.05)


def test_buffered_versions_on_chain_fedbuff_rule_and_audit(tmp_path):
    w3 = ledger.embedded()
    owner, agg, *accounts = w3.eth.accounts
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH)
    people = [LedgerParticipant(chain, a) for a in accounts[:8]]
    for p in people:
        p.register(2 * ETH)
    bundles = tmp_path / "bundles"
    gate = LedgerGate(chain, commit_seconds=60.0, poll_seconds=0.05, bundle_dir=str(bundles))
    models = {}
    server = Server(np.zeros(D, np.float32),
                    ServerConfig(bind="tcp://127.0.0.1:0", rule="mean", mode="buffered", quorum=K, min_updates=2,
                                 max_staleness=1, deadline=4.0, rounds=3, ledger=gate),
                    on_round=lambda rec: models.setdefault(rec["round"], server.model.copy()))
    th = threading.Thread(target=server.serve, daemon=True)
    th.start()
    results = {}

    def participant(i: int, version: int, base: int, claim=None):
        """Commit in `version`'s window an update computed on `base` (claim: the base the upload says)."""
        p = people[i]
        try:
            with Client(server.endpoint, p.account, timeout=60) as c:
                _wait_for_window(c, version)
                session = c.state["session"]
                if claim is None:
                    results[i] = p.submit(c, delta(i), version, base=base, timeout=60)
                else:  # commits to (base, update), then uploads it as computed on `claim` (staler weighs less)
                    p.commit(version, delta(i), session=session, base=base)
                    p.wait_window_closed(version, session=session, timeout=60)
                    sig = p.sign(version, delta(i), session=session, base=claim)
                    results[i] = c.submit(delta(i), claim, signature=sig)
        except TransportError as e:
            results[i] = e.reason

    def too_stale(i: int, version: int, base: int):
        """Commits honestly, then uploads on the wire (fedagg's Client refuses to send it at all)."""
        import zmq
        from doc_participant import CHUNK, REJECTED, Peer

        p, ctx = people[i], zmq.Context()
        peer = Peer(ctx, server.endpoint, pid=p.account, secret="s" * 16)
        try:
            peer.hello()
            for _ in range(1200):
                st = peer.status().json()
                if st["round"] == version and st["phase"] == "commit":
                    break
                time.sleep(0.05)
            p.commit(version, delta(i), session=peer.session, base=base)
            p.wait_window_closed(version, session=peer.session, timeout=60)
            peer.send(CHUNK, delta(i).tobytes(), round=base, total=4 * D, session=peer.session)
            results[i] = peer.recv(REJECTED).json()["reason"]
        finally:
            peer.close()
            ctx.destroy(linger=0)

    def stage(specs):
        ts = [threading.Thread(target=too_stale, args=s[:3]) if s[-1] == "wire" else
              threading.Thread(target=participant, args=s) for s in specs]
        [t.start() for t in ts]
        [t.join(90) for t in ts]
        assert not any(t.is_alive() for t in ts)

    stage([(i, 0, 0) for i in range(4)])  # version 0: four fresh updates
    stage([(i, 1, 0) for i in range(4, 8)])  # version 1: four updates computed on version 0 (staleness 1)
    # version 2: 0 fresh, 1 on version 1, 3 on version 0 (2 versions old: too stale), 4 lies about its base
    stage([(0, 2, 2), (1, 2, 1), (3, 2, 0, "wire"), (4, 2, 1, 2)])
    th.join(60)
    assert not th.is_alive(), "the server did not finish its three versions"

    assert results[3] == "stale" and results[4] == "commitment"
    # ACCEPTED: the version whose buffer took it, and the version it was computed on
    assert all((results[i]["version"], results[i]["round"]) == vb
               for i, vb in ((0, (2, 2)), (1, (2, 1)), (2, (0, 0)), (5, (1, 0)), (6, (1, 0)), (7, (1, 0))))
    r0, r1, r2 = server.history
    acct = [p.account for p in people]
    assert set(r0["accepted"]) == set(acct[:4]) and r0["staleness"] == [0] * 4
    assert set(r1["accepted"]) == set(acct[4:]) and r1["staleness"] == [1] * 4 and r1["bases"] == [0] * 4
    assert r2["closed_by"] == "deadline" and set(r2["accepted"]) == {acct[0], acct[1]}
    assert {x["reason"] for x in r2["rejected"]} >= {"stale", "commitment"}

    # FedBuff's rule in float64: version v+1 = version v + sum(w(s_i) delta_i) / n, w(s) = 1 / sqrt(1 + s)
    ref = np.zeros(D)
    for rec in (r0, r1, r2):
        index = {a: i for i, a in enumerate(acct)}
        step = sum(delta(index[a]).astype(np.float64) / math.sqrt(1 + s) for a, s in zip(rec["accepted"],
                                                                                      rec["staleness"]))
        ref = ref + step / len(rec["accepted"])
        np.testing.assert_allclose(models[rec["round"]], ref, rtol=0, atol=1e-5)

    # the bundles: each version passes the audit from the chain alone, bases and weights included
    reports = ledger.audit_bundles(chain, bundles)
    assert [r.round for r in reports] == [0, 1, 2]
    assert all(r.ok and r.model_recomputed == "exact" and r.checks["staleness"] for r in reports), \
        [r.as_dict() for r in reports]
    assert reports[2].left_out[acct[3]]["reason"] == "stale"
    assert reports[2].left_out[acct[4]] == {"code": "contradicted its commitment", "reason": "commitment"}
    folders = sorted(p for p in bundles.iterdir() if not p.name.startswith("."))
    manifest, _ = bundle.load(folders[1])
    leaf = next(e for e in manifest["leaves"] if e["address"] == acct[5])
    assert leaf["base"] == 0 and leaf["scale"] == 1 / math.sqrt(2) and manifest["run"]["staleness"] == "sqrt"
    # the evidence against the participant that lied about its base slashes it
    m2, _ = bundle.load(folders[2])
    leaf_of = {e["address"]: merkle.leaf(e["address"], bytes.fromhex(e["commitment"]), e["code"])
               for e in m2["leaves"]}
    chain.slash(agg, acct[4], int(m2["round_key"], 16), merkle.CONTRADICTED,
                merkle.proof(list(leaf_of.values()), leaf_of[acct[4]]))
    assert chain.snapshot([acct[4]])[acct[4]].slashed

    # an aggregator that rewrites a base (to weigh an update as fresher) contradicts the commitment on chain
    bad = tmp_path / "tampered"
    shutil.copytree(folders[1], bad)
    edited = json.loads((bad / "manifest.json").read_text())
    for e in edited["leaves"]:
        if e["address"] == acct[5]:
            e.update(base=1, scale=1.0)
    (bad / "manifest.json").write_bytes(bundle.canonical(edited))
    rep = ledger.audit_round(chain, bad)
    assert not rep.ok and not rep.checks["reveals"] and not rep.checks["bundle_hash"]
    assert any(acct[5] in p and "do not match its commitment" in p for p in rep.problems), rep.problems
    # ... and a base outside the staleness window, or a weight that is not w(staleness), fails its own check
    for e in edited["leaves"]:
        if e["address"] == acct[5]:
            e.update(base=0, scale=1.0)
    (bad / "manifest.json").write_bytes(bundle.canonical(edited))
    rep = ledger.audit_round(chain, bad)
    assert not rep.checks["staleness"] and any(acct[5] in p and "weighed 1.0" in p for p in rep.problems)


def test_update_hash_binds_the_base_version():
    u = np.arange(8, dtype=np.float32)
    plain = crypto.update_hash(u)
    assert plain == crypto.update_hash(u, None)
    assert crypto.update_hash(u, 0) != plain and crypto.update_hash(u, 0) != crypto.update_hash(u, 1)
    h = crypto.hasher(7)
    h.update(u.tobytes())
    assert h.digest() == crypto.update_hash(u, 7)
    with pytest.raises(ValueError, match="model version"):
        crypto.update_hash(u, -1)


def test_buffered_ledger_config_checks_the_rule_on_the_smallest_version():
    """Without a ledger a buffer is always K updates; with one a version may close at the deadline
    with min_updates, so the rule must run on that many."""
    kw = dict(mode="buffered", quorum=8, min_updates=2, rule="trimmed_mean", f=1)
    ServerConfig(**kw).check()
    with pytest.raises(ValueError, match="cannot run on 2"):
        ServerConfig(**kw, admission="ledger", ledger=object()).check()
    ServerConfig(**{**kw, "min_updates": 3}, admission="ledger", ledger=object()).check()


def test_buffered_ledger_refuses_replayed_and_borrowed_signatures():
    """An attacker's replays in a buffered ledger run: participant 0's signed upload accepted in
    version 0, sent again in version 1 (where it committed nothing) is refused `duplicate` (the
    server remembers the base each participant uploaded on while that base can be uploaded on, so
    a replay never reaches the chain's checks; past the window it is `stale`); participant 2's
    signed update sent by participant 5 as its own (it committed that hash, so only the signature
    is borrowed) is refused `signature`; neither enters version 1, which takes the two honest
    updates. A version's window closes at K = 3 commitments, so every committer is in before it
    closes, and the version's uploads wait for the replay's answer, so the replay is refused while
    version 1 is open (not after the server has stopped)."""
    w3 = ledger.embedded()
    owner, agg, *accounts = w3.eth.accounts
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH)
    people = [LedgerParticipant(chain, a) for a in accounts[:6]]
    for p in people:
        p.register(2 * ETH)
    server = Server(np.zeros(D, np.float32),
                    ServerConfig(bind="tcp://127.0.0.1:0", rule="mean", mode="buffered", quorum=3, min_updates=1,
                                 max_staleness=1, deadline=4.0, rounds=2,
                                 ledger=LedgerGate(chain, commit_seconds=60.0, poll_seconds=0.05)))
    th = threading.Thread(target=server.serve, daemon=True)
    th.start()
    got, sigs = {}, {}
    replayed = threading.Event()

    def honest(i: int, version: int):
        p = people[i]
        with Client(server.endpoint, p.account, timeout=60) as c:
            _wait_for_window(c, version)
            session = c.state["session"]
            sigs[i] = p.commit(version, delta(i), session=session, base=version)
            p.wait_window_closed(version, session=session, timeout=60)
            assert version == 0 or replayed.wait(60)
            got[i] = c.submit(delta(i), version, signature=sigs[i])

    def attack(name: str, i: int, update_of: int, version: int, commit: bool):
        """Participant i sends delta(update_of) with the signature sigs[update_of] in `version`."""
        p = people[i]
        try:
            with Client(server.endpoint, p.account, timeout=60) as c:
                _wait_for_window(c, version)
                session = c.state["session"]
                if commit:  # the hash committed: only the signature is borrowed
                    p.commit(version, delta(update_of), session=session, base=0)
                p.wait_window_closed(version, session=session, timeout=60)
                if commit:
                    assert replayed.wait(60)
                got[name] = c.submit(delta(update_of), 0, signature=sigs[update_of])
        except TransportError as e:
            got[name] = e.reason
        finally:
            if not commit:
                replayed.set()

    def run(targets):
        ts = [threading.Thread(target=fn, args=a) for fn, a in targets]
        [t.start() for t in ts]
        [t.join(90) for t in ts]
        assert not any(t.is_alive() for t in ts)

    run([(honest, (0, 0)), (honest, (1, 0)), (honest, (2, 0))])
    run([(honest, (3, 1)), (honest, (4, 1)), (attack, ("replay", 0, 0, 1, False)),
         (attack, ("borrowed", 5, 2, 1, True))])
    th.join(60)
    assert not th.is_alive()
    assert got["replay"] == "duplicate", got
    assert got["borrowed"] == "signature", got
    acct = [p.account for p in people]
    r0, r1 = server.history
    assert set(r0["accepted"]) == {acct[0], acct[1], acct[2]} and set(r1["accepted"]) == {acct[3], acct[4]}
    refused = {x["id"]: x["reason"] for x in r1["rejected"]}
    # the version's record (and bundle) lists the refusal of the one that committed in it
    assert refused == {acct[5]: "signature"}, r1["rejected"]
    np.testing.assert_allclose(server.model, (delta(0) + delta(1) + delta(2)) / 3 + (delta(3) + delta(4)) / 2, atol=1e-6)
