"""fedagg.ledger: the Vyper registry on the embedded py-evm chain and on a real Hardhat node.

The Hardhat node (tests/hardhat, installed by `.ci/run` with npm) is started on
127.0.0.1 by the fixture and stopped afterwards. Without it the Hardhat cases
skip, unless FEDAGG_REQUIRE_HARDHAT=1 (set by CI) makes that a failure.
"""

import os
import shutil
import subprocess
import threading
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("web3")
pytest.importorskip("vyper")
pytest.importorskip("nacl")

from fedagg import ledger  # noqa: E402
from fedagg.ledger import LedgerError, crypto, merkle  # noqa: E402
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


K0, K1, K2 = (crypto.round_key(5, r) for r in range(3))  # rounds 0..2 of server session 5


def test_commitments_and_their_rules(chain):
    w3 = chain.w3
    good, poor, cheat, stranger, late = w3.eth.accounts[2:7]
    for a, stake in [(good, 2 * ETH), (poor, ETH // 10), (late, 2 * ETH)]:
        chain.register(a, crypto.keypair()[0], stake)
    with pytest.raises(LedgerError, match="round not open"):
        chain.commit(good, K0, b"\x01" * 32)
    with pytest.raises(LedgerError, match="only the aggregator"):
        chain._transact("open_round", good, chain.contract.functions.open_round(K0, chain.block_number() + 5))
    chain.open_round(K0, 100)
    h = crypto.update_hash(np.ones(10, np.float32))
    chain.commit(good, K0, crypto.commitment(K0, good, h))
    with pytest.raises(LedgerError, match="already committed"):
        chain.commit(good, K0, crypto.commitment(K0, good, h))
    with pytest.raises(LedgerError, match="stake below the minimum"):
        chain.commit(poor, K0, crypto.commitment(K0, poor, h))
    with pytest.raises(LedgerError, match="not registered"):
        chain.commit(stranger, K0, crypto.commitment(K0, stranger, h))
    with pytest.raises(LedgerError, match="empty commitment"):
        chain.commit(late, K0, bytes(32))
    chain.close_commits(K0)
    with pytest.raises(LedgerError, match="commit window closed"):  # the set of commitments is final
        chain.commit(late, K0, crypto.commitment(K0, late, h))
    assert chain.commitments(K0, [good, poor, cheat, stranger, late]) == {good: crypto.commitment(K0, good, h)}
    assert chain.commit_count(K0) == 1


def committed_round(chain, key, accounts):
    """Open round `key`, have `accounts` (registered here if they are not) commit on time, close the
    window: a round the contract lets the aggregator record. Returns {address: commitment}."""
    known = chain.snapshot(accounts)
    for a in accounts:
        if not known[chain.w3.to_checksum_address(a)].registered:
            chain.register(a, crypto.keypair()[0], 2 * ETH)
    chain.open_round(key, 100)
    out = {}
    for i, a in enumerate(accounts):
        out[a] = crypto.commitment(key, a, crypto.update_hash(np.full(4, i, np.float32)))
        chain.commit(a, key, out[a])
    chain.close_commits(key)
    return out


def record(chain, key, codes, commitments, model=b"\x01" * 32, prev=b"\x00" * 32, bundle=b"\x02" * 32):
    """Record round `key` listing `codes` ({address: code}); returns the leaves by address."""
    leaves = {a: merkle.leaf(a, commitments[a], c) for a, c in codes.items()}
    chain.record_round(key, model, prev, merkle.root(list(leaves.values())), bundle, list(codes.items()))
    return leaves


def test_a_round_record_lists_every_committed_participant(chain):
    w3 = chain.w3
    people = list(w3.eth.accounts[2:9])
    com = committed_round(chain, K1, people)
    codes = {a: i % 4 for i, a in enumerate(people)}
    leaves = record(chain, K1, codes, com)
    rec = chain.round_record(K1)
    assert (rec.listed, rec.aggregated) == (7, sum(1 for c in codes.values() if c <= merkle.EXCLUDED))
    assert rec.merkle_root == merkle.root(list(leaves.values()))
    # the contract's own hash chain over the leaves, in ascending address order
    assert rec.leaves_hash == merkle.chain([leaves[a] for a in sorted(people, key=lambda x: int(x, 16))])
    with pytest.raises(LedgerError, match="already recorded"):
        record(chain, K1, codes, com)
    with pytest.raises(LedgerError, match="commit window closed"):  # nor any commitment after it
        chain.commit(people[0], K1, b"\x05" * 32)
    with pytest.raises(LedgerError, match="not recorded"):
        chain.round_record(K2)
    assert set(chain.gas) >= {"deploy", "list_participants", "record_round"}


def test_forged_round_records_revert(chain):
    """The aggregator key alone cannot record a round that did not happen as the chain saw it."""
    w3 = chain.w3
    a, b, c, d = w3.eth.accounts[2:6]
    with pytest.raises(LedgerError, match="no commit phase"):
        record(chain, K0, {a: 0}, {a: b"\x07" * 32})  # never opened
    com = committed_round(chain, K1, [a, b])
    chain.register(c, crypto.keypair()[0], 2 * ETH)
    chain.open_round(K2, 100)
    with pytest.raises(LedgerError, match="commit window still open"):
        record(chain, K2, {}, {})
    forged = {c: b"\x07" * 32, **com}
    with pytest.raises(LedgerError, match="did not commit"):  # c never committed (a swapped-in update)
        record(chain, K1, {a: 0, c: 0}, forged)
    with pytest.raises(LedgerError, match="unknown code"):
        chain._transact("list", chain.aggregator, chain.contract.functions.list_participants(K1, [a], [4]))
    with pytest.raises(LedgerError, match="ascending order"):  # the same address twice, in one batch
        chain._transact("list", chain.aggregator, chain.contract.functions.list_participants(K1, [a, a], [0, 0]))
    with pytest.raises(LedgerError, match="only the aggregator"):
        chain._transact("list", a, chain.contract.functions.list_participants(K1, [], []))
    with pytest.raises(LedgerError, match="only the aggregator"):
        chain._transact("record", a, chain.contract.functions.record_round(K1, *[bytes(32)] * 4))
    lo, hi = sorted([a, b], key=lambda x: int(x, 16))
    chain._transact("list", chain.aggregator, chain.contract.functions.list_participants(K1, [hi], [0]))
    with pytest.raises(LedgerError, match="ascending order"):  # ... or across batches
        chain._transact("list", chain.aggregator, chain.contract.functions.list_participants(K1, [hi], [0]))
    with pytest.raises(LedgerError, match="a committed participant is not listed"):  # lo left out silently
        chain._transact("record", chain.aggregator, chain.contract.functions.record_round(K1, *[bytes(32)] * 4))
    d_com = committed_round(chain, crypto.round_key(6, 0), [d])  # another session: its own rounds
    com2 = committed_round(chain, crypto.round_key(5, 3), [a, b])
    record(chain, crypto.round_key(5, 3), {a: 0, b: 1}, com2, model=b"\x0a" * 32)
    # the next record of session 5 must start from the model the last one recorded
    com4 = committed_round(chain, crypto.round_key(5, 4), [a])
    with pytest.raises(LedgerError, match="does not start from the last recorded model"):
        record(chain, crypto.round_key(5, 4), {a: 0}, com4, prev=b"\x0b" * 32)
    record(chain, crypto.round_key(5, 4), {a: 0}, com4, prev=b"\x0a" * 32)
    record(chain, crypto.round_key(6, 0), {d: 0}, d_com, prev=b"\x0c" * 32)  # session 6 has its own chain


SYBILS = """
# pragma version ~=0.4.3
interface Registry:
    def register(signing_key: bytes32): payable
    def commit(round_key: uint256, commitment: bytes32): nonpayable

interface Member:
    def join(registry: address, key: bytes32): payable
    def commit_to(registry: address, round_key: uint256, commitment: bytes32): nonpayable

impl: address
members: public(DynArray[address, 8192])

@deploy
def __init__():
    self.impl = self

@external
@payable
def join(registry: address, key: bytes32):
    extcall Registry(registry).register(key, value=msg.value)

@external
def commit_to(registry: address, round_key: uint256, commitment: bytes32):
    extcall Registry(registry).commit(round_key, commitment)

@external
@payable
def spawn(registry: address, n: uint256, stake: uint256):
    for i: uint256 in range(n, bound=200):
        p: address = create_minimal_proxy_to(self.impl)
        extcall Member(p).join(registry, keccak256(convert(len(self.members) + 1, bytes32)), value=stake)
        self.members.append(p)

@external
def commit_all(registry: address, round_key: uint256, start: uint256, commitments: DynArray[bytes32, 200]):
    for i: uint256 in range(len(commitments), bound=200):
        extcall Member(self.members[start + i]).commit_to(registry, round_key, commitments[i])

@external
@view
def count() -> uint256:
    return len(self.members)
"""


class Crowd:
    """Many registry accounts at little cost: minimal proxies that one contract creates, registers
    (each paying its own stake) and has commit, 75 per transaction (what a sybil attacker does)."""

    BATCH = 75  # ~13M gas: under the block's 15M target, so the base fee does not climb

    def __init__(self, chain):
        from vyper.compiler import compile_code

        self.chain, self.w3 = chain, chain.w3
        self.funder = self.w3.eth.accounts[-1]
        out = compile_code(SYBILS, output_formats=["abi", "bytecode"])
        f = self.w3.eth.contract(abi=out["abi"], bytecode=out["bytecode"])
        r = self.w3.eth.wait_for_transaction_receipt(f.constructor().transact({"from": self.funder}))
        self.contract = self.w3.eth.contract(address=r.contractAddress, abi=out["abi"])

    def _send(self, fn, value=0):
        r = self.w3.eth.wait_for_transaction_receipt(fn.transact({"from": self.funder, "value": value,
                                                                  "gas": 15_000_000}))
        assert r.status == 1
        return r

    def spawn(self, n, stake):
        for start in range(0, n, self.BATCH):
            k = min(self.BATCH, n - start)
            self._send(self.contract.functions.spawn(self.chain.address, k, stake), k * stake)

    def members(self):
        n = self.contract.functions.count().call()
        return [self.contract.functions.members(i).call() for i in range(n)]

    def commit(self, key, commitments):
        for start in range(0, len(commitments), self.BATCH):
            self._send(self.contract.functions.commit_all(self.chain.address, key, start,
                                                         commitments[start:start + self.BATCH]))


@pytest.mark.parametrize("w3", ["embedded", "hardhat"], indirect=True)
def test_a_record_is_not_capped_at_256_participants(w3):
    """300 committed participants are listed in two batches; the record holds them all."""
    owner, agg = w3.eth.accounts[:2]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH)
    crowd = Crowd(chain)
    crowd.spawn(300, ETH)
    people = crowd.members()
    chain.open_round(K0, 100)
    com = {a: crypto.commitment(K0, a, bytes([i % 256]) * 32) for i, a in enumerate(people)}
    crowd.commit(K0, [com[a] for a in people])
    chain.close_commits(K0)
    leaves = record(chain, K0, {a: 0 for a in people}, com)
    rec = chain.round_record(K0)
    assert rec.listed == rec.aggregated == 300 and len(chain.gas["list_participants"]) == 2
    assert rec.merkle_root == merkle.root(list(leaves.values()))


@pytest.mark.parametrize("w3", ["embedded", "hardhat"], indirect=True)
def test_the_4097th_sybil_registers_and_every_one_paid_its_bond(w3):
    """The registry once held 4,096 entries, and zero-stake sybils could fill it for good. Now there is
    no cap, and each entry costs the registration bond: 4,097 sybils lock 4,097 bonds."""
    owner, agg, honest = w3.eth.accounts[:3]
    bond = ETH // 100
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH, registration_bond=bond)
    crowd = Crowd(chain)
    with pytest.raises(Exception):  # below the bond: the whole batch reverts
        crowd.spawn(1, bond - 1)
    crowd.spawn(4097, bond)
    assert chain.contract.functions.participant_count().call() == 4097
    assert w3.eth.get_balance(chain.address) == 4097 * bond
    chain.register(honest, crypto.keypair()[0], 2 * ETH)  # an honest participant still gets in
    assert chain.snapshot([honest])[honest].registered and len(chain.registered()) == 4098


def test_signatures_bind_round_update_session_chain_and_registry():
    pub, sec = crypto.keypair()
    h = crypto.update_hash(np.arange(5, dtype=np.float32))
    here = crypto.domain(31337, "0x" + "ab" * 20)
    sig = crypto.sign(sec, 7, h, session=5, domain=here)
    assert crypto.round_key(5, 7) == 5 << 64 | 7 and crypto.round_key(5, 7) != crypto.round_key(6, 7)
    for bad in ((-1, 0), (1 << 64, 0), (0, 1 << 64)):
        with pytest.raises(ValueError, match="session and round"):
            crypto.round_key(*bad)
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
    leaves = [merkle.leaf("0x" + bytes([i + 1]).hex() * 20, bytes([i]) * 32, i % 4) for i in range(n)]
    r = merkle.root(leaves)
    assert r == merkle.root(list(reversed(leaves)))  # order-free
    for x in leaves:
        p = merkle.proof(leaves, x)
        assert merkle.verify(r, x, p)
        assert not merkle.verify(r, merkle.leaf("0x" + "ff" * 20, bytes(32), 0), p)
        if p:
            assert not merkle.verify(r, x, [bytes(32)] + p[1:])
    assert merkle.root([]) == bytes(32)
    with pytest.raises(ValueError):
        merkle.proof(leaves, bytes(32))
    with pytest.raises(ValueError, match="code in 0..3"):
        merkle.leaf("0x" + "11" * 20, bytes(32), 4)
    # the leaf binds the address, the commitment and the code
    a = "0x" + "11" * 20
    assert len({merkle.leaf(a, bytes(32), 0), merkle.leaf(a, bytes(32), 1), merkle.leaf(a, b"\x01" * 32, 0),
                merkle.leaf("0x" + "12" * 20, bytes(32), 0)}) == 4


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
                                    unbonding_blocks=5, max_slash_bps=5000)
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
    chain.open_round(K0, 100)
    with pytest.raises(LedgerError, match="stake below the minimum"):
        chain.commit(alice, K0, b"\x01" * 32)
    # bob contradicts his commitment in a round, asks everything back, then is slashed before his
    # period ends: leaving first escapes nothing (the slash takes the cap, 50%, of his unbonding stake)
    k = crypto.round_key(1, 1)
    com = committed_round(chain, k, [bob])
    leaves = record(chain, k, {bob: merkle.CONTRADICTED}, com)
    chain.unbond(bob, 3 * ETH)
    chain.slash(agg, bob, k, merkle.CONTRADICTED, merkle.proof(list(leaves.values()), leaves[bob]))
    e = chain.snapshot([bob])[bob]
    assert e.slashed and e.stake == 0 and e.unbonding == 3 * ETH // 2
    assert chain.contract.functions.forfeited().call() == 3 * ETH // 2
    _mine_until(w3, e.unbond_at)
    chain.withdraw(bob)  # what the slash left him
    assert w3.eth.get_balance(chain.address) == ETH // 2 + 3 * ETH // 2  # alice's remaining stake, bob's forfeit


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


def test_a_slash_needs_evidence_and_takes_at_most_the_cap_once_per_round(w3):
    owner, agg, liar, dropped, good, refused, stranger = w3.eth.accounts[:7]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH, max_slash_bps=1000)
    k = crypto.round_key(3, 0)
    com = committed_round(chain, k, [liar, dropped, good, refused])
    codes = {liar: merkle.CONTRADICTED, dropped: merkle.EXCLUDED, good: merkle.AGGREGATED, refused: merkle.REFUSED}
    with pytest.raises(LedgerError, match="round not recorded"):  # no record, no evidence
        chain.slash(agg, liar, k, merkle.CONTRADICTED, [])
    leaves = record(chain, k, codes, com)
    everyone = list(leaves.values())

    def proof(a):
        return merkle.proof(everyone, leaves[a])
    with pytest.raises(LedgerError, match="only the aggregator"):
        chain.slash(owner, liar, k, merkle.CONTRADICTED, proof(liar))  # the owner cannot slash at all
    for who, code, why in ((good, merkle.AGGREGATED, "not slashable"), (refused, merkle.REFUSED, "not slashable"),
                           (good, merkle.CONTRADICTED, "not in the record"),  # a code it was not given
                           (liar, merkle.CONTRADICTED, "not in the record"),  # a proof of another leaf
                           (stranger, merkle.EXCLUDED, "no commitment")):
        with pytest.raises(LedgerError, match=why):
            chain.slash(agg, who, k, code, proof(good if who in (good, liar) else dropped))
    assert not any(e.slashed for e in chain.snapshot().values())
    chain.slash(agg, liar, k, merkle.CONTRADICTED, proof(liar))
    chain.slash(agg, dropped, k, merkle.EXCLUDED, proof(dropped))
    e = chain.snapshot([liar])[liar]
    assert e.slashed and e.stake == 2 * ETH - 2 * ETH // 10  # 10%: the cap
    with pytest.raises(LedgerError, match="already slashed for this round"):
        chain.slash(agg, liar, k, merkle.CONTRADICTED, proof(liar))
    assert chain.snapshot([liar])[liar].stake == 2 * ETH - 2 * ETH // 10
    assert chain.contract.functions.forfeited().call() == 2 * (2 * ETH // 10)
    k1 = crypto.round_key(3, 1)
    chain.open_round(k1, 100)
    with pytest.raises(LedgerError, match="slashed"):  # a slashed participant takes no further part
        chain.commit(liar, k1, b"\x01" * 32)


def test_the_owner_rotates_in_two_steps_and_can_only_veto(w3):
    owner, agg, heir, stranger, voter = w3.eth.accounts[:5]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH)
    c = chain.contract.functions
    with pytest.raises(LedgerError, match="only the owner"):
        chain.propose_owner(stranger, stranger)
    chain.propose_owner(owner, heir)
    assert c.owner().call() == owner  # nothing changes until accepted
    with pytest.raises(LedgerError, match="only the proposed owner"):
        chain.accept_owner(stranger)
    chain.accept_owner(heir)
    assert c.owner().call() == heir and c.pending_owner().call() == "0x" + "00" * 20
    chain.register(voter, crypto.keypair()[0], 2 * ETH)
    pid = chain.propose(voter, chain.policy())
    with pytest.raises(LedgerError, match="only the owner"):
        chain.cancel(owner, pid)  # the old owner lost its powers
    chain.cancel(heir, pid)
    with pytest.raises(LedgerError, match="proposal cancelled"):
        chain.vote(voter, pid)
    # the owner cannot change the policy itself: it is not a role of the contract
    assert not any(f["name"] in ("set_policy", "propose_aggregator", "slash_any") for f in chain.contract.abi
                   if f.get("type") == "function")


def test_the_policy_changes_only_by_a_stake_majority_after_a_timelock(w3):
    owner, agg, new_agg, big, small, outsider = w3.eth.accounts[:6]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH, voting_blocks=4,
                                    timelock_blocks=3)
    chain.register(big, crypto.keypair()[0], 6 * ETH)
    chain.register(small, crypto.keypair()[0], 5 * ETH)
    wanted = ledger.Policy(rule="median", f=2, epsilon_micro=3_000_000, min_stake=2 * ETH, aggregator=new_agg,
                           max_slash_bps=500)
    with pytest.raises(LedgerError, match="only a staked participant"):
        chain.propose(outsider, wanted)
    with pytest.raises(LedgerError, match="max_slash_bps"):
        chain.propose(big, ledger.Policy("median", 2, 0, ETH, new_agg, 10_001))
    pid = chain.propose(big, wanted)
    chain.vote(small, pid)  # 5 of 11 ETH: no majority
    with pytest.raises(LedgerError, match="already voted"):
        chain.vote(small, pid)
    with pytest.raises(LedgerError, match="only a staked participant"):
        chain.vote(outsider, pid)
    with pytest.raises(LedgerError, match="locked by a vote"):  # a vote cannot be sold and the stake moved
        chain.unbond(small, ETH)
    ends = chain.contract.functions.proposals(pid).call()[2]
    _mine_until(w3, ends + 4)
    with pytest.raises(LedgerError, match="voting is over"):
        chain.vote(big, pid)
    with pytest.raises(LedgerError, match="no majority"):
        chain.execute(outsider, pid)
    # a second proposal that the majority votes for: executable only after the vote and the timelock
    pid = chain.propose(big, wanted)
    chain.vote(big, pid)
    chain.vote(small, pid)
    with pytest.raises(LedgerError, match="vote or timelock not over"):
        chain.execute(outsider, pid)
    ends = chain.contract.functions.proposals(pid).call()[2]
    _mine_until(w3, ends + 2)  # a transaction now runs in block ends + 3: the last of the timelock
    with pytest.raises(LedgerError, match="vote or timelock not over"):
        chain.execute(outsider, pid)  # the timelock: everyone sees the change coming
    assert chain.policy().aggregator == agg
    _mine_until(w3, ends + 3)
    chain.open_round(K0, 100)  # the old aggregator still runs rounds meanwhile
    chain.execute(outsider, pid)  # anyone applies it once it is due
    with pytest.raises(LedgerError, match="already executed"):
        chain.execute(outsider, pid)
    assert chain.policy() == ledger.Policy("median", 2, 3_000_000, 2 * ETH, new_agg, 500)
    with pytest.raises(LedgerError, match="only the aggregator"):
        chain.open_round(K1, 100)  # this object still sends from the old aggregator
    chain.aggregator = new_agg
    chain.open_round(K1, 100)
    chain.unbond(small, ETH)  # the vote is over: the stake is free again


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
    gate.start_round(0, 1)
    assert not gate.all_committed()
    pa.commit(0, np.ones(4, np.float32), session=1)
    assert not gate.all_committed()
    pb.commit(0, np.zeros(4, np.float32), session=1)
    assert gate.all_committed()


def test_two_server_sessions_on_one_registry_cannot_replay_each_other(w3):
    """Two server sessions on one registry both start at round 0. Their rounds have different keys on
    chain, so a commitment of one is none in the other, and the signature binds the session: an
    upload signed and committed for the first is refused by the second (it was accepted before)."""
    owner, agg, a = w3.eth.accounts[:3]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH)
    pa = ledger.LedgerParticipant(chain, a)
    pa.register(2 * ETH)
    x = np.arange(6, dtype=np.float32)
    first, second = ledger.LedgerGate(chain, commit_seconds=60), ledger.LedgerGate(chain, commit_seconds=60)
    first.start_round(0, 111)
    second.start_round(0, 222)  # opens its own round 0: it does not find the first one's open
    assert first.key != second.key and chain.deadline(second.key) != 0
    sig = pa.commit(0, x, session=111)
    first.close_commits()
    second.close_commits()
    digest = crypto.update_hash(x)
    assert first.check(a, digest, sig, session=111) is None
    assert second.check(a, digest, sig, session=222) == "signature"  # the replay
    assert second.check(a, digest, pa.sign(0, x, session=222), session=222) == "uncommitted"  # re-signed: no commitment


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
        g.start_round(0, 7)
        p.commit(0, x, session=7)
        g.close_commits()
    sig = people[0].sign(0, x, session=7)
    digest = crypto.update_hash(x)
    assert gates[0].check(a, digest, sig, session=7) is None
    assert gates[1].check(a, digest, sig, session=7) == "signature"
    assert gates[1].check(a, digest, people[1].sign(0, x, session=7), session=7) is None


def test_a_participant_reveals_only_once_the_chain_shows_the_window_closed():
    """A server that says "upload" while the window is still open on chain gets nothing."""
    w3 = ledger.embedded()
    owner, agg, a = w3.eth.accounts[:3]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH)
    pa = ledger.LedgerParticipant(chain, a)
    pa.register(2 * ETH)
    gate = ledger.LedgerGate(chain)
    gate.start_round(0, 9)

    class LyingServer:  # a Client whose server claims the upload phase at once
        state, sent = {"session": 9}, []

        def submit(self, update, rnd, signature=None):
            self.sent.append(rnd)
            return {"round": rnd}

    fake = LyingServer()
    with pytest.raises(LedgerError, match="still open on chain"):
        pa.submit(fake, np.ones(3, np.float32), 0, timeout=0.5, poll=0.05)
    assert fake.sent == [] and chain.commitments(gate.key, [a])  # committed, not revealed
    assert not pa.window_closed(0, session=9)
    gate.close_commits()
    assert pa.window_closed(0, session=9)
    # the next round: the participant waits, and reveals once the aggregator closed the window on chain
    gate.start_round(1, 9)
    closer = threading.Timer(0.5, gate.close_commits)
    closer.start()
    try:
        assert pa.submit(fake, np.ones(3, np.float32), 1, timeout=30, poll=0.05) == {"round": 1}
    finally:
        closer.join()
    assert fake.sent == [1] and gate.commitments == chain.commitments(gate.key, [a])


def test_a_compressed_update_is_hashed_as_the_bytes_that_travel():
    import hashlib

    from fedagg import compress
    from fedagg.transport.protocol import pack_frames

    p = compress.Uniform(8).encode(np.linspace(-1, 1, 1000, dtype=np.float32), seed=1)
    assert crypto.update_hash(p) == hashlib.sha256(pack_frames(p.to_frames())).digest()
    assert crypto.update_hash(p) != crypto.update_hash(compress.Uniform(8).encode(np.zeros(1000, np.float32), seed=1))
