"""fedagg.ledger: the Vyper registry on the embedded py-evm chain and on a real Hardhat node.

The Hardhat node (tests/hardhat, installed by `.ci/run` with npm) is started on
127.0.0.1 by the fixture and stopped afterwards. Without it the Hardhat cases
skip, unless FEDAGG_REQUIRE_HARDHAT=1 (set by CI) makes that a failure.
"""

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("web3")
pytest.importorskip("vyper")
pytest.importorskip("nacl")

from fedagg import ledger  # noqa: E402
from fedagg.ledger import LedgerError, crypto, merkle  # noqa: E402
from fedagg.ledger.audit import model_hash  # noqa: E402
from helpers import free_port  # noqa: E402

HARDHAT_DIR = Path(__file__).parent / "hardhat"
HARDHAT = HARDHAT_DIR / "node_modules" / ".bin" / "hardhat"
ETH = 10**18




@pytest.fixture(scope="session")
def hardhat_url():
    if not HARDHAT.exists() or shutil.which("node") is None:
        if os.environ.get("FEDAGG_REQUIRE_HARDHAT") == "1":
            pytest.fail(f"Hardhat is required but not installed at {HARDHAT} (npm ci --prefix tests/hardhat)")
        pytest.skip("Hardhat not installed (npm ci --prefix tests/hardhat)")
    port = free_port()
    proc = subprocess.Popen([str(HARDHAT), "node", "--hostname", "127.0.0.1", "--port", str(port)],
                            cwd=HARDHAT_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        ledger.connect(url, timeout=60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(params=["embedded", "node", "hardhat"])
def w3(request):
    """The chain in process, the same chain served over HTTP (fedagg.ledger.node), and Hardhat."""
    if request.param == "embedded":
        yield ledger.embedded()
    elif request.param == "node":
        from fedagg.ledger.node import EmbeddedNode

        with EmbeddedNode() as node:
            yield ledger.connect(node.url)
    else:
        yield ledger.connect(request.getfixturevalue("hardhat_url"))


@pytest.fixture
def chain(w3):
    owner, agg = w3.eth.accounts[:2]
    return ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH)


def test_registry_snapshot_is_batched(chain):
    w3 = chain.w3
    people = w3.eth.accounts[2:7]
    keys = {}
    for i, a in enumerate(people):
        keys[a], _ = crypto.keypair()
        chain.register(a, keys[a], stake=(i + 1) * ETH // 2)  # the first one is under the minimum
    snap = chain.snapshot()
    assert list(snap) == people
    assert all(snap[a].signing_key == keys[a] and snap[a].registered and not snap[a].slashed for a in people)
    assert snap[people[0]].stake == ETH // 2 and snap[people[4]].stake == 5 * ETH // 2
    chain.stake(people[0], ETH)
    assert chain.snapshot([people[0]])[people[0]].stake == 3 * ETH // 2
    with pytest.raises(LedgerError, match="already registered"):
        chain.register(people[1], keys[people[1]], ETH)
    with pytest.raises(LedgerError, match="not registered"):
        chain.stake(w3.eth.accounts[9], ETH)


def test_commitments_and_their_rules(chain):
    w3 = chain.w3
    agg = chain.aggregator
    good, poor, cheat, stranger = w3.eth.accounts[2:6]
    for a, stake in [(good, 2 * ETH), (poor, ETH // 10), (cheat, 2 * ETH)]:
        chain.register(a, crypto.keypair()[0], stake)
    with pytest.raises(LedgerError, match="round not open"):
        chain.commit(good, 0, b"\x01" * 32)
    with pytest.raises(LedgerError, match="only the aggregator"):
        chain._transact("open_round", good, chain.contract.functions.open_round(0, chain.block_number() + 5))
    chain.open_round(0, 100)
    h = crypto.update_hash(np.ones(10, np.float32))
    chain.commit(good, 0, crypto.commitment(0, good, h))
    with pytest.raises(LedgerError, match="already committed"):
        chain.commit(good, 0, crypto.commitment(0, good, h))
    with pytest.raises(LedgerError, match="stake below the minimum"):
        chain.commit(poor, 0, crypto.commitment(0, poor, h))
    with pytest.raises(LedgerError, match="not registered"):
        chain.commit(stranger, 0, crypto.commitment(0, stranger, h))
    chain.slash(agg, cheat)
    assert chain.snapshot([cheat])[cheat].slashed and chain.snapshot([cheat])[cheat].stake == 0
    with pytest.raises(LedgerError, match="slashed"):
        chain.commit(cheat, 0, crypto.commitment(0, cheat, h))
    with pytest.raises(LedgerError, match="only the owner or the aggregator"):
        chain.slash(good, cheat)
    chain.close_commits(0)
    late = w3.eth.accounts[6]
    chain.register(late, crypto.keypair()[0], 2 * ETH)
    chain.commit(late, 0, crypto.commitment(0, late, h))  # kept, marked late
    got = chain.commitments(0, [good, poor, cheat, stranger, late])  # one batched call
    assert got == {good: (crypto.commitment(0, good, h), False), late: (crypto.commitment(0, late, h), True)}


def committed_round(chain, rnd, accounts):
    """Open round `rnd`, have `accounts` (registered here if they are not) commit on time, close the
    window: a round the contract lets the aggregator record."""
    known = chain.snapshot(accounts)
    for a in accounts:
        if not known[chain.w3.to_checksum_address(a)].registered:
            chain.register(a, crypto.keypair()[0], 2 * ETH)
    chain.open_round(rnd, 100)
    for i, a in enumerate(accounts):
        chain.commit(a, rnd, crypto.commitment(rnd, a, crypto.update_hash(np.full(4, i, np.float32))))
    chain.close_commits(rnd)


def test_round_record_and_audit(chain):
    w3 = chain.w3
    accepted = list(w3.eth.accounts[2:9])
    model = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    committed_round(chain, 3, accepted)
    chain.record_round(3, model_hash(model), merkle.root(accepted), accepted, list(range(7)))
    with pytest.raises(LedgerError, match="already recorded"):
        chain.record_round(3, model_hash(model), merkle.root(accepted), accepted, list(range(7)))
    with pytest.raises(LedgerError, match="not recorded"):
        chain.round_record(4)
    outsider = w3.eth.accounts[1]
    rep = ledger.audit_round(chain, 3, model, accepted[:2] + [outsider])
    assert rep.model_ok and rep.merkle_ok and rep.scores[accepted[6]] == 6
    assert rep.included == {accepted[0]: True, accepted[1]: True, outsider: False}
    tampered = model.copy()
    tampered[0] += 1e-3
    assert not ledger.audit_round(chain, 3, tampered).model_ok
    assert set(chain.gas) >= {"deploy", "record_round"}


def test_forged_round_records_revert(chain):
    """The aggregator key alone cannot record a round that did not happen as the chain saw it."""
    w3 = chain.w3
    a, b, c, late = w3.eth.accounts[2:6]
    h = model_hash(np.zeros(3, np.float32))

    def record(rnd, who):
        chain.record_round(rnd, h, merkle.root(who), who, [1] * len(who))
    with pytest.raises(LedgerError, match="no commit phase"):
        record(0, [a])  # never opened
    committed_round(chain, 1, [a, b])
    chain.register(c, crypto.keypair()[0], 2 * ETH)
    chain.register(late, crypto.keypair()[0], 2 * ETH)
    chain.commit(late, 1, b"\x07" * 32)  # after the window closed: kept, marked late
    chain.open_round(2, 100)
    with pytest.raises(LedgerError, match="commit window still open"):
        record(2, [])
    for who, why in (([a, c], "did not commit"), ([a, late], "committed late"), ([a, b, a], "recorded twice")):
        with pytest.raises(LedgerError, match=why):
            record(1, who)
    with pytest.raises(LedgerError, match="only the aggregator"):
        chain._transact("record_round", a, chain.contract.functions.record_round(1, h, bytes(32), [], []))
    record(1, [b, a])  # the honest record still goes through
    assert chain.round_record(1).accepted == (b, a)


def test_signatures_bind_round_update_session_chain_and_registry():
    pub, sec = crypto.keypair()
    h = crypto.update_hash(np.arange(5, dtype=np.float32))
    here = crypto.domain(31337, "0x" + "ab" * 20)
    sig = crypto.sign(sec, 7, h, session=5, domain=here)
    assert crypto.verify(pub, 7, h, sig, session=5, domain=here)
    assert not crypto.verify(pub, 8, h, sig, session=5, domain=here)  # replayed into another round
    assert not crypto.verify(pub, 7, h, sig, session=6, domain=here)  # replayed into another server session
    assert not crypto.verify(pub, 7, h, sig, session=5, domain=crypto.domain(1, "0x" + "ab" * 20))  # another chain
    assert not crypto.verify(pub, 7, h, sig, session=5, domain=crypto.domain(31337, "0x" + "cd" * 20))  # registry
    assert not crypto.verify(pub, 7, crypto.update_hash(np.zeros(5, np.float32)), sig, session=5, domain=here)
    assert not crypto.verify(crypto.keypair()[0], 7, h, sig, session=5, domain=here)
    assert not crypto.verify(pub, 7, h, b"\x00" * 10, session=5, domain=here)
    with pytest.raises(ValueError, match="52 bytes"):
        crypto.sign(sec, 7, h, session=5, domain=b"short")
    a, b = "0x" + "11" * 20, "0x" + "22" * 20
    assert crypto.commitment(1, a, h) != crypto.commitment(2, a, h) != crypto.commitment(1, b, h)
    with pytest.raises(ValueError):
        crypto.commitment(1, "0x1234", h)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 13, 17])
def test_merkle_proofs(n):
    addrs = ["0x" + bytes([i + 1]) .hex() * 20 for i in range(n)]
    r = merkle.root(addrs)
    assert r == merkle.root(list(reversed(addrs)))  # order-free
    for a in addrs:
        p = merkle.proof(addrs, a)
        assert merkle.verify(r, a, p)
        assert not merkle.verify(r, "0x" + "ff" * 20, p)
        if p:
            assert not merkle.verify(r, a, [bytes(32)] + p[1:])
    assert merkle.root([]) == bytes(32)
    with pytest.raises(ValueError):
        merkle.proof(addrs, "0x" + "ee" * 20)


def test_audit_cli_on_a_hardhat_round(hardhat_url, tmp_path):
    import json
    import subprocess
    import sys

    w3 = ledger.connect(hardhat_url)
    owner, agg = w3.eth.accounts[:2]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH)
    accepted = list(w3.eth.accounts[2:6])
    model = np.arange(100, dtype=np.float32)
    committed_round(chain, 0, accepted)
    chain.record_round(0, model_hash(model), merkle.root(accepted), accepted, [1, 2, 3, 4])
    np.save(tmp_path / "model.npy", model)

    def audit(model_path, who):
        cmd = [sys.executable, "-m", "fedagg", "audit", "--rpc", hardhat_url, "--contract", chain.address,
               "--round", "0", "--model", str(model_path)] + sum((["--participant", p] for p in who), [])
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    ok = audit(tmp_path / "model.npy", accepted[:2])
    assert ok.returncode == 0, ok.stderr
    rep = json.loads(ok.stdout)
    assert rep["ok"] and rep["scores"][accepted[3]] == 4 and set(rep["proofs"]) == set(accepted[:2])
    np.save(tmp_path / "other.npy", model + 1)
    bad = audit(tmp_path / "other.npy", [w3.eth.accounts[9]])
    assert bad.returncode == 1
    rep = json.loads(bad.stdout)
    assert not rep["model_ok"] and rep["included"] == {w3.eth.accounts[9]: False}


def _mine_until(w3, block):
    """Advance the chain to `block` with 1-wei transfers (every backend mines one block per transaction)."""
    a, b = w3.eth.accounts[-2:]
    for _ in range(64):
        if w3.eth.block_number >= block:
            return
        w3.eth.wait_for_transaction_receipt(w3.eth.send_transaction({"from": a, "to": b, "value": 1}))
    raise AssertionError(f"block {block} not reached")


def test_stake_leaves_after_unbonding_and_a_slash_earned_before_still_lands(w3):
    owner, agg, alice, bob, sybil = w3.eth.accounts[:5]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH, registration_bond=ETH // 10,
                                    unbonding_blocks=5)
    key = crypto.keypair()[0]
    for value in (0, ETH // 100):  # sybils pay the bond
        with pytest.raises(LedgerError, match="registration bond"):
            chain.register(sybil, key, value)
    chain.register(alice, key, 3 * ETH)
    chain.register(bob, crypto.keypair()[0], 3 * ETH)
    for amount in (0, 4 * ETH):
        with pytest.raises(LedgerError, match="amount must be"):
            chain.unbond(alice, amount)
    at = chain.unbond(alice, 5 * ETH // 2)
    e = chain.snapshot([alice])[alice]
    assert (e.stake, e.unbonding, e.unbond_at) == (ETH // 2, 5 * ETH // 2, at) and at == chain.block_number() + 5  # the unbond's block + 5
    with pytest.raises(LedgerError, match="still unbonding"):
        chain.withdraw(alice)
    with pytest.raises(LedgerError, match="nothing unbonding"):
        chain.withdraw(bob)
    held = w3.eth.get_balance(chain.address)
    _mine_until(w3, at)
    mine = w3.eth.get_balance(alice)
    chain.withdraw(alice)  # pulled by its owner, once
    assert w3.eth.get_balance(chain.address) == held - 5 * ETH // 2
    assert w3.eth.get_balance(alice) > mine + 5 * ETH // 2 - ETH // 100  # minus the gas
    with pytest.raises(LedgerError, match="nothing unbonding"):
        chain.withdraw(alice)
    # unbonded stake stops counting at once: alice is below the minimum for the next commit
    chain.open_round(0, 100)
    with pytest.raises(LedgerError, match="stake below the minimum"):
        chain.commit(alice, 0, b"\x01" * 32)
    # bob asks everything back, then is slashed before his period ends: leaving first escapes nothing
    chain.unbond(bob, 3 * ETH)
    chain.slash(owner, bob)
    e = chain.snapshot([bob])[bob]
    assert e.slashed and e.stake == 0 and e.unbonding == 0
    _mine_until(w3, chain.block_number() + 6)
    with pytest.raises(LedgerError, match="nothing unbonding"):
        chain.withdraw(bob)
    assert chain.contract.functions.forfeited().call() == 3 * ETH
    assert w3.eth.get_balance(chain.address) == ETH // 2 + 3 * ETH  # alice's remaining stake and bob's forfeit
    with pytest.raises(LedgerError, match="slashed"):
        chain.unbond(bob, 1)


REENTRANT = """
# pragma version ~=0.4.3
interface Registry:
    def register(signing_key: bytes32): payable
    def unbond(amount: uint256): nonpayable
    def withdraw(): nonpayable

target: Registry
calls: public(uint256)

@deploy
def __init__(target: address):
    self.target = Registry(target)

@external
@payable
def join():
    extcall self.target.register(keccak256("attacker"), value=msg.value)

@external
def leave(amount: uint256):
    extcall self.target.unbond(amount)

@external
def steal():
    extcall self.target.withdraw()

@external
@payable
def __default__():
    self.calls += 1
    if self.calls < 3:
        extcall self.target.withdraw()
"""


def test_withdraw_cannot_be_reentered(w3):
    from vyper.compiler import compile_code

    owner, agg = w3.eth.accounts[:2]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH, unbonding_blocks=1)
    out = compile_code(REENTRANT, output_formats=["abi", "bytecode"])
    factory = w3.eth.contract(abi=out["abi"], bytecode=out["bytecode"])
    receipt = w3.eth.wait_for_transaction_receipt(factory.constructor(chain.address).transact({"from": owner}))
    thief = w3.eth.contract(address=receipt.contractAddress, abi=out["abi"])
    for fn, value in ((thief.functions.join(), 2 * ETH), (thief.functions.leave(2 * ETH), 0)):
        w3.eth.wait_for_transaction_receipt(fn.transact({"from": owner, "value": value}))
    _mine_until(w3, chain.block_number() + 2)
    held = w3.eth.get_balance(chain.address)
    try:  # the re-entering fallback cannot run on send's stipend: the whole withdrawal reverts
        status = w3.eth.wait_for_transaction_receipt(
            thief.functions.steal().transact({"from": owner, "gas": 500_000})).status
    except Exception:  # noqa: BLE001 - some backends raise on the revert instead of mining it
        status = 0
    assert status == 0
    assert w3.eth.get_balance(chain.address) == held  # nothing paid, once or twice
    assert chain.snapshot([thief.address])[thief.address].unbonding == 2 * ETH


def test_roles_rotate_in_two_steps_and_the_aggregator_behind_a_timelock(w3):
    owner, agg, heir, new_agg, stranger = w3.eth.accounts[:5]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH, role_timelock_blocks=4)
    c = chain.contract.functions
    # the owner: proposed, then accepted by the heir; nobody else can take it
    with pytest.raises(LedgerError, match="only the owner"):
        chain.propose_owner(stranger, stranger)
    chain.propose_owner(owner, heir)
    assert c.owner().call() == owner  # nothing changes until accepted
    with pytest.raises(LedgerError, match="only the proposed owner"):
        chain.accept_owner(stranger)
    chain.accept_owner(heir)
    assert c.owner().call() == heir and c.pending_owner().call() == "0x" + "00" * 20
    with pytest.raises(LedgerError, match="only the owner"):
        chain.propose_aggregator(owner, new_agg)  # the old owner lost its powers
    # the aggregator: proposed by the owner, active only after the timelock, seen coming on chain
    with pytest.raises(LedgerError, match="no aggregator proposed"):
        chain.activate_aggregator(stranger)
    at = chain.propose_aggregator(heir, new_agg)
    assert at == chain.block_number() + 4
    with pytest.raises(LedgerError, match="timelock not over"):
        chain.activate_aggregator(stranger)
    assert c.aggregator().call() == agg
    chain.open_round(0, 100)  # the old aggregator still runs rounds meanwhile
    _mine_until(w3, at)
    chain.activate_aggregator(stranger)  # anyone may trigger the hand-over once it is due
    assert c.aggregator().call() == new_agg and chain.aggregator == new_agg
    with pytest.raises(LedgerError, match="only the aggregator"):
        chain._transact("open_round", agg, c.open_round(1, chain.block_number() + 10))
    chain.open_round(1, 100)  # from the new aggregator


def test_a_registry_without_a_bond_or_an_unbonding_period_is_refused(w3):
    owner, agg = w3.eth.accounts[:2]
    with pytest.raises(LedgerError, match="fill the registry for free"):
        ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH, registration_bond=0)
    with pytest.raises(LedgerError, match="slashable"):
        ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH, unbonding_blocks=0)


def test_evm_ledger_implements_the_interface(chain):
    assert isinstance(chain, ledger.Ledger)


def test_embedded_node_refuses_bad_requests_and_keeps_serving():
    import http.client
    import json

    from fedagg.ledger.node import MAX_REQUEST, EmbeddedNode

    with pytest.raises(ValueError, match="loopback"):
        EmbeddedNode(accounts=1, host="0.0.0.0")

    def post(body: bytes, **headers):
        h = {"Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
        conn = http.client.HTTPConnection(node.url[len("http://"):], timeout=10)
        try:
            conn.putrequest("POST", "/", skip_host="Host" in h)
            for k, v in h.items():
                conn.putheader(k, v)
            conn.endheaders()
            if body and h["Content-Length"] == str(len(body)):
                conn.send(body)
            r = conn.getresponse()
            return r.status, json.loads(r.read())
        finally:
            conn.close()

    ok = b'{"jsonrpc": "2.0", "id": 2, "method": "eth_blockNumber", "params": []}'
    with EmbeddedNode(accounts=2) as node:
        assert post(ok)[1]["result"] == "0x0"
        assert post(ok, Origin="http://evil.example")[0] == 403  # a web page in a browser
        assert post(ok, Host="evil.example")[0] == 403  # DNS rebinding
        assert post(ok, **{"Content-Type": "text/plain"})[0] == 415  # a form post without preflight
        assert post(ok, **{"Content-Length": "abc"})[0] == 411
        assert post(b"", **{"Content-Length": str(MAX_REQUEST + 1)})[0] == 413  # refused before reading
        assert post(b"{not json")[0] == 400
        assert post(b"[" * 100_000 + b"]" * 100_000)[0] == 400  # nesting: refused before the parser
        assert post(b"[]")[0] == 400
        status, body = post(b'[{"id": 1}, ' + ok + b']')
        assert status == 200 and body[0]["error"]["code"] == -32600 and body[1]["result"] == "0x0"
        status, body = post(b'{"jsonrpc": "2.0", "id": 3, "method": "eth_noSuchMethod", "params": []}')
        assert "error" in body and body["id"] == 3
        assert post(b'{"jsonrpc": "2.0", "id": 4, "method": "eth_blockNumber", "params": 5}')[1]["error"]
        assert ledger.connect(node.url).eth.block_number == 0  # still serving


def test_gate_sees_when_every_admitted_participant_has_committed():
    w3 = ledger.embedded()
    owner, agg, a, b, poor = w3.eth.accounts[:5]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH)
    pa, pb = ledger.LedgerParticipant(chain, a), ledger.LedgerParticipant(chain, b)
    pa.register(2 * ETH)
    pb.register(2 * ETH)
    chain.register(poor, crypto.keypair()[0], ETH // 10)  # under the minimum: not waited for
    gate = ledger.LedgerGate(chain, commit_seconds=60)
    with pytest.raises(ValueError, match="poll_seconds"):
        ledger.LedgerGate(chain, poll_seconds=0)
    gate.start_round(0)
    assert not gate.all_committed()
    pa.commit(0, np.ones(4, np.float32), session=1)
    assert not gate.all_committed()
    pb.commit(0, np.zeros(4, np.float32), session=1)
    assert gate.all_committed()


def test_a_signed_upload_of_one_server_session_is_refused_by_another():
    """Two server sessions on one registry both start at round 0: the signature binds the session,
    so an upload signed for the first is refused by the second (it was accepted before)."""
    w3 = ledger.embedded()
    owner, agg, a = w3.eth.accounts[:3]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH)
    pa = ledger.LedgerParticipant(chain, a)
    pa.register(2 * ETH)
    x = np.arange(6, dtype=np.float32)
    gate = ledger.LedgerGate(chain, commit_seconds=60)
    gate.start_round(0)
    sig = pa.commit(0, x, session=111)
    gate.close_commits()
    digest = crypto.update_hash(x)
    assert gate.check(a, digest, sig, session=111) is None
    assert gate.check(a, digest, sig, session=222) == "signature"
    assert gate.check(a, digest, pa.sign(0, x, session=222), session=222) is None


def test_an_upload_signed_for_one_registry_is_refused_by_a_server_of_another():
    """Same chain, same key registered in two registries, same session and round: the signature
    binds the registry's address (and the chain id), so it does not carry over."""
    w3 = ledger.embedded()
    owner, agg, a = w3.eth.accounts[:3]
    chains = [ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH) for _ in range(2)]
    pub, sec = crypto.keypair()
    people = [ledger.LedgerParticipant(c, a, secret=sec) for c in chains]
    for p in people:
        p.register(2 * ETH)
    x = np.arange(6, dtype=np.float32)
    gates = [ledger.LedgerGate(c, commit_seconds=60) for c in chains]
    for g, p in zip(gates, people):
        g.start_round(0)
        p.chain.commit(a, 0, crypto.commitment(0, a, crypto.update_hash(x)))
        g.close_commits()
    sig = people[0].sign(0, x, session=7)
    digest = crypto.update_hash(x)
    assert gates[0].check(a, digest, sig, session=7) is None
    assert gates[1].check(a, digest, sig, session=7) == "signature"
    assert gates[1].check(a, digest, people[1].sign(0, x, session=7), session=7) is None


def test_a_compressed_update_is_hashed_as_the_bytes_that_travel():
    import hashlib

    from fedagg import compress
    from fedagg.transport.protocol import pack_frames

    p = compress.Uniform(8).encode(np.linspace(-1, 1, 1000, dtype=np.float32), seed=1)
    assert crypto.update_hash(p) == hashlib.sha256(pack_frames(p.to_frames())).digest()
    assert crypto.update_hash(p) != crypto.update_hash(compress.Uniform(8).encode(np.zeros(1000, np.float32), seed=1))
