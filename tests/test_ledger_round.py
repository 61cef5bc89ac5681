"""Rounds of ledger-validated participants over ZeroMQ on loopback, on the embedded chain and on Hardhat.

16 honest participants register, stake, commit their update's hash on chain,
then upload it with an Ed25519 signature; beside them, participants that are
unregistered, unstaked, slashed, sign wrongly, commit another update, try to
commit late, or replay an old signed update. Each is refused with its reason in
the round report, the rounds complete with the honest ones, the round bundles
pass `fedagg audit` (and fail it, naming the participant, once one bit of an
update is flipped), and the evidence in a bundle is enough to slash.
"""

import json
import shutil
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("zmq")
pytest.importorskip("web3")
pytest.importorskip("vyper")
pytest.importorskip("nacl")

from fedagg import ledger  # noqa: E402
from fedagg.ledger import LedgerError, LedgerGate, LedgerParticipant, bundle, crypto, merkle  # noqa: E402
from fedagg.transport import Client, Server, ServerConfig, TransportError  # noqa: E402
from test_ledger import ETH, committed_round, hardhat_url, record, w3  # noqa: E402,F401 - chain fixtures, helpers

D = 2000
HONEST = 16


def honest_update(i: int) -> np.ndarray:
    return np.full(D, 1.0 + 0.01 * i, dtype=np.float32)


def _url(w3):
    """The JSON-RPC URL of an HTTP chain (None for the in-process one)."""
    return getattr(w3.provider, "endpoint_uri", None)


def _audit_cli(url, contract, folder):
    out = subprocess.run([sys.executable, "-m", "fedagg", "audit", "--rpc", url, "--contract", contract, str(folder)],
                         capture_output=True, text=True, timeout=300)
    return out.returncode, json.loads(out.stdout) if out.stdout.strip() else out.stderr


def test_ledger_validated_rounds(w3, tmp_path):  # noqa: F811
    accounts = list(w3.eth.accounts)
    owner, agg = accounts[:2]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH)
    people = {}
    names = [f"h{i}" for i in range(HONEST)] + ["unstaked", "slashed", "badsig", "mismatch", "late", "replayer"]
    for name, acct in zip(names, accounts[2:]):
        lp = LedgerParticipant(chain, acct)
        lp.register(ETH // 10 if name == "unstaked" else 2 * ETH)
        people[name] = lp
    # "slashed" contradicted its commitment in an earlier round (of another session), and was slashed for it
    early = crypto.round_key(1, 0)
    com = committed_round(chain, early, [people["slashed"].account])
    leaves = record(chain, early, {people["slashed"].account: merkle.CONTRADICTED}, com)
    chain.slash(agg, people["slashed"].account, early, merkle.CONTRADICTED, [])  # a one-leaf tree: no siblings
    stranger = accounts[2 + len(names)]  # never registered
    assert list(leaves) == [people["slashed"].account]

    # Rounds close at the deadline (quorum 100 is never met). The window must hold 16 honest commit
    # transactions through the HTTP node, one request at a time: 3 s did not, once, under CI's load,
    # nor did 8 s on a machine busy with other work; it closes as soon as all have committed.
    bundles = tmp_path / "bundles"
    gate = LedgerGate(chain, commit_seconds=20.0, bundle_dir=str(bundles))
    models = {}
    server = Server(np.zeros(D, np.float32),
                    ServerConfig(bind="tcp://127.0.0.1:0", rule="trimmed_mean", f=2, quorum=100,
                                 min_updates=HONEST, deadline=35.0, rounds=2, ledger=gate),
                    on_round=lambda rec: models.setdefault(rec["round"], server.model.copy()))
    ep = server.endpoint
    th = threading.Thread(target=server.serve, daemon=True)
    th.start()
    results = {}

    def honest(name, i, rounds=2):
        lp = people[name]
        with Client(ep, lp.account, timeout=30) as c:
            last = -1
            for _ in range(rounds):
                if last >= 0:
                    c.wait_round(last, 30)
                rnd = c.status()["round"]
                u = honest_update(i)
                if i % 2:  # the participant's whole side: commit, see the window close on chain, reveal
                    results[(name, rnd)] = lp.submit(c, u, rnd, timeout=30)
                else:
                    sig = lp.commit(rnd, u, session=c.state["session"])
                    results[(name, rnd)] = c.submit(u, rnd, signature=sig)
                last = rnd

    def adversary(name):
        lp = people[name]
        try:
            with Client(ep, lp.account, timeout=30) as c:
                rnd = c.status()["round"]
                u = honest_update(99)
                if name == "badsig":
                    lp.commit(rnd, u, session=c.state["session"])
                    sig = crypto.sign(crypto.keypair()[1], rnd, crypto.update_hash(u), session=c.state["session"],
                                      domain=chain.signing_domain())  # not its registered key
                elif name == "mismatch":
                    sig = lp.commit(rnd, honest_update(98), session=c.state["session"])  # commits to another update
                    sig = lp.sign(rnd, u, session=c.state["session"])
                elif name == "late":
                    c.wait_phase("upload")  # the commit window is closed now
                    try:
                        lp.commit(rnd, u, session=c.state["session"])
                    except LedgerError as e:
                        results[("late-commit", 0)] = str(e)
                    sig = lp.sign(rnd, u, session=c.state["session"])
                else:
                    sig = lp.sign(rnd, u, session=c.state["session"])
                results[(name, rnd)] = c.submit(u, rnd, signature=sig)
        except TransportError as e:
            results[(name, 0)] = e.reason

    def unregistered(name, address):
        try:
            Client(ep, address, timeout=30).close()
        except TransportError as e:
            results[(name, 0)] = e.reason

    def replayer():
        lp = people["replayer"]
        with Client(ep, lp.account, timeout=30) as c:
            u = honest_update(7)
            sig0 = lp.commit(0, u, session=c.state["session"])
            results[("replayer", 0)] = c.submit(u, 0, signature=sig0)
            c.wait_round(0, 30)
            lp.commit(1, u, session=c.state["session"])  # commits honestly for round 1 ...
            try:
                c.submit(u, 1, signature=sig0)  # ... but replays round 0's signed upload
            except TransportError as e:
                results[("replayer", 1)] = e.reason

    threads = [threading.Thread(target=honest, args=(f"h{i}", i)) for i in range(HONEST)]
    threads += [threading.Thread(target=adversary, args=(n,)) for n in ("unstaked", "slashed", "badsig", "mismatch",
                                                                        "late")]
    threads += [threading.Thread(target=unregistered, args=("stranger", stranger)), threading.Thread(target=replayer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    th.join(60)
    assert not th.is_alive(), "the rounds did not finish"

    assert results[("unstaked", 0)] == "unstaked" and results[("slashed", 0)] == "slashed"
    assert results[("stranger", 0)] == "unregistered"
    assert results[("badsig", 0)] == "signature" and results[("mismatch", 0)] == "commitment"
    assert results[("late-commit", 0)] == "commit window closed" and results[("late", 0)] == "uncommitted"
    assert results[("replayer", 1)] == "replayed"
    r0, r1 = server.history
    honest_ids = {people[f"h{i}"].account for i in range(HONEST)}
    assert set(r0["accepted"]) == honest_ids | {people["replayer"].account}
    assert set(r1["accepted"]) == honest_ids
    reasons0 = {x["reason"] for x in r0["rejected"]}
    assert {"unstaked", "slashed", "unregistered", "signature", "commitment", "uncommitted"} <= reasons0
    assert "replayed" in {x["reason"] for x in r1["rejected"]}
    # the honest result: trimmed mean of the honest updates, moved twice
    assert np.allclose(models[1], 2 * np.mean([honest_update(i)[0] for i in range(HONEST)]), atol=0.02)
    cost = r0["ledger"]
    assert cost["calls"] >= 3 and cost["gas"]["record_round"] > 0 and cost["seconds"] < r0["seconds"]

    # the audit: every round passes from the chain plus its bundle, and names who was left out and why
    folders = sorted(p for p in bundles.iterdir() if not p.name.startswith("."))
    assert [bundle.load(f)[0]["round"] for f in folders] == [0, 1]
    reports = ledger.audit_bundles(chain, bundles)
    assert all(r.ok for r in reports), [r.as_dict() for r in reports]
    assert all(r.model_recomputed == "exact" for r in reports)
    left0 = reports[0].left_out
    assert left0[people["mismatch"].account] == {"code": "contradicted its commitment", "reason": "commitment"}
    assert left0[people["badsig"].account]["reason"] == "signature"
    assert reports[1].left_out[people["replayer"].account]["reason"] == "replayed"
    assert people["late"].account not in left0  # it never got a commitment on chain: nothing to list
    manifest, _ = bundle.load(folders[0])
    assert manifest["model_hash"] == ledger.audit.model_hash(models[0]).hex()

    # the evidence in round 0's bundle slashes the participant that contradicted its commitment
    key = int(manifest["round_key"], 16)
    leaf_of = {e["address"]: merkle.leaf(e["address"], bytes.fromhex(e["commitment"]), e["code"])
               for e in manifest["leaves"]}
    liar = people["mismatch"].account
    chain.slash(agg, liar, key, merkle.CONTRADICTED, merkle.proof(list(leaf_of.values()), leaf_of[liar]))
    assert chain.snapshot([liar])[liar].slashed

    # one bit of one aggregated update flipped in a copy of the bundle: the audit fails, naming its owner
    victim = people["h3"].account
    bad = tmp_path / "tampered"
    shutil.copytree(bundles, bad)
    tampered = next(p for p in sorted(bad.iterdir()) if not p.name.startswith("."))
    path = tampered / "updates" / f"{victim}.bin"
    data = bytearray(path.read_bytes())
    data[100] ^= 0x01
    path.write_bytes(bytes(data))
    rep = ledger.audit_round(chain, tampered)
    assert not rep.ok and not rep.checks["reveals"]
    assert any(victim in p and "do not match its commitment" in p for p in rep.problems), rep.problems
    # a manifest edited after the fact (a refusal reason rewritten), or another model: caught by their hashes
    manifest_path = tampered / "manifest.json"
    edited = json.loads(manifest_path.read_text())
    edited["refusals"][people["badsig"].account]["reason"] = "never revealed"
    manifest_path.write_bytes(bundle.canonical(edited))
    np.save(tampered / "model.npy", models[0] + 1)
    rep = ledger.audit_round(chain, tampered)
    assert not rep.checks["bundle_hash"] and not rep.checks["model_hash"]
    # the same bundle audited against a contract that is not the Registry: refused
    from vyper.compiler import compile_code

    out = compile_code("# pragma version ~=0.4.3\nx: public(uint256)\n", output_formats=["abi", "bytecode"])
    r = w3.eth.wait_for_transaction_receipt(w3.eth.contract(abi=out["abi"], bytecode=out["bytecode"])
                                            .constructor().transact({"from": owner}))
    rep = ledger.audit_round(ledger.EvmLedger(w3, r.contractAddress, aggregator=agg), folders[0])
    assert not rep.ok and not rep.checks["contract_code"] and not rep.checks["round"]
    url = _url(w3)
    if url is not None:  # the command line, on the node and on Hardhat
        code, out = _audit_cli(url, chain.address, bundles)
        assert code == 0 and out["ok"] and len(out["rounds"]) == 2, out
        code, out = _audit_cli(url, chain.address, tampered)
        assert code == 1 and any(victim in p for p in out["rounds"][0]["problems"]), out


def test_admission_both_curve_and_ledger_with_stake_weights(tmp_path):
    from zmq.auth import create_certificates, load_certificate

    w3 = ledger.embedded()
    owner, agg, a, b = w3.eth.accounts[:4]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH)
    pa, pb = LedgerParticipant(chain, a), LedgerParticipant(chain, b)
    pa.register(ETH)
    pb.register(3 * ETH)
    spub, ssec = load_certificate(create_certificates(str(tmp_path), "server")[1])
    keys = {n: load_certificate(create_certificates(str(tmp_path), n)[1]) for n in ("a", "b")}
    gate = LedgerGate(chain, commit_seconds=1.0, stake_weighted=True, bundle_dir=str(tmp_path / "bundles"))
    with pytest.raises(ValueError, match="needs CURVE"):
        ServerConfig(bind="tcp://127.0.0.1:0", ledger=gate, admission="both").check()
    server = Server(np.zeros(10, np.float32),
                    ServerConfig(bind="tcp://127.0.0.1:0", quorum=2, rounds=1, ledger=gate, admission="both",
                                 curve_secret_key=ssec, curve_public_key=spub,
                                 allowed_keys=[keys["a"][0], keys["b"][0]]))
    th = threading.Thread(target=server.serve, daemon=True)
    th.start()
    results = {}

    def go(name, lp, value):
        pub, sec = keys[name]
        with Client(server.endpoint, server_key=spub, public_key=pub, secret_key=sec, address=lp.account,
                    timeout=20) as c:
            u = np.full(10, value, np.float32)
            results[name] = c.submit(u, 0, signature=lp.commit(0, u, session=c.state["session"]))

    ts = [threading.Thread(target=go, args=("a", pa, 1.0)), threading.Thread(target=go, args=("b", pb, 5.0))]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    th.join(30)
    assert set(results) == {"a", "b"}
    # stake-weighted mean: (1 x 1 + 3 x 5) / 4 = 4
    np.testing.assert_allclose(server.model, np.full(10, 4.0), rtol=1e-6)
    rec = server.history[0]
    assert sorted(rec["ledger"]["addresses"]) == sorted([a, b])
    rep = ledger.audit_round(chain, gate.last_bundle)
    assert rep.ok and rep.model_recomputed == "exact", rep.as_dict()  # stake weights recomputed too


def test_the_server_runs_the_rule_the_chain_voted_for(tmp_path):
    """The policy is read from the chain each round: a vote that sets trimmed_mean (f = 1) overrides
    the server's configured mean; a vote that names another aggregator stops this server's rounds."""
    from test_ledger import _mine_until

    w3 = ledger.embedded()
    owner, agg, other, *accounts = w3.eth.accounts
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH, voting_blocks=3,
                                    timelock_blocks=1)
    people = [LedgerParticipant(chain, a) for a in accounts[:4]]
    for p in people:
        p.register(2 * ETH)

    def enact(policy):
        pid = chain.propose(people[0].account, policy)
        for p in people[:3]:  # 6 of 8 ETH
            p.chain.vote(p.account, pid)
        _mine_until(w3, chain.contract.functions.proposals(pid).call()[2] + 1)  # the vote and the timelock
        chain.execute(owner, pid)

    enact(ledger.Policy("trimmed_mean", 1, 0, ETH, agg, 1000))

    def one_round():
        gate = LedgerGate(chain, commit_seconds=5.0, bundle_dir=str(tmp_path))
        server = Server(np.zeros(8, np.float32), ServerConfig(bind="tcp://127.0.0.1:0", rule="mean", quorum=4,
                                                             rounds=1, deadline=60.0, ledger=gate))
        th = threading.Thread(target=server.serve, daemon=True)
        th.start()

        def go(p, value):
            with Client(server.endpoint, p.account, timeout=60) as c:
                p.submit(c, np.full(8, value, np.float32), 0, timeout=60)

        ts = [threading.Thread(target=go, args=(p, v)) for p, v in zip(people, (1.0, 2.0, 3.0, 100.0))]
        [t.start() for t in ts]
        [t.join(90) for t in ts]
        th.join(30)
        return server, ledger.audit_round(chain, gate.last_bundle)

    server, rep = one_round()
    assert server.history[0]["rule"] == "trimmed_mean" and server.history[0]["f"] == 1
    np.testing.assert_allclose(server.model, np.full(8, 2.5))  # the mean would have given 26.5
    assert rep.ok and rep.checks["policy"], rep.as_dict()
    # a policy this server cannot run: it keeps its mean, and the audit says the round broke the policy
    enact(ledger.Policy("no_such_rule", 0, 0, ETH, agg, 1000))
    server, rep = one_round()
    assert server.history[0]["rule"] == "mean" and not rep.ok and not rep.checks["policy"]

    enact(ledger.Policy("trimmed_mean", 1, 0, ETH, other, 1000))
    with pytest.raises(LedgerError, match="not this server's account"):
        LedgerGate(chain).start_round(1, 5)


def test_a_restarted_ledger_server_drops_the_updates_of_the_old_session(tmp_path, caplog):
    """Updates accepted before a restart were committed under the old session's round key, where the
    new session has no commitment: the restarted server does not carry them into its round."""
    w3 = ledger.embedded()
    owner, agg, a = w3.eth.accounts[:3]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH)
    pa = LedgerParticipant(chain, a)
    pa.register(2 * ETH)
    cfg = dict(bind="tcp://127.0.0.1:0", rule="median", quorum=2, rounds=1, deadline=60.0,
               state_dir=str(tmp_path / "state"))
    server = Server(np.zeros(16, np.float32), ServerConfig(ledger=LedgerGate(chain, commit_seconds=1.0), **cfg))
    th = threading.Thread(target=server.serve, daemon=True)
    th.start()
    with Client(server.endpoint, a, timeout=30) as c:
        assert pa.submit(c, np.ones(16, np.float32), 0, timeout=30)["round"] == 0
    server.stop()
    th.join(30)
    assert not th.is_alive() and len(server.accepted) == 1
    again = Server(np.zeros(16, np.float32), ServerConfig(ledger=LedgerGate(chain, commit_seconds=1.0), **cfg))
    try:
        assert again.round == 0 and again.accepted == {} and again.collector.count == 0
        assert "dropped" in caplog.text and again.session != server.session
    finally:
        again.close()
