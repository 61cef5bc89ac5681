"""The ledger side of the protocol, with a participant written from docs/protocol.md ("Ledger-validated
uploads") and docs/ledger.md alone.

The participant uses the conformance test's wire helpers (themselves written from the document),
web3 with a hand-written ABI of the three contract functions the documents name, eth_utils'
keccak256 and PyNaCl's Ed25519: no fedagg code. The server (fedagg, in this process) runs one
round with a ledger on the embedded chain.
"""

import hashlib
import json
import threading
import time

import numpy as np
import pytest

pytest.importorskip("web3")
pytest.importorskip("vyper")
nacl_signing = pytest.importorskip("nacl.signing")

from eth_utils import keccak  # noqa: E402
from test_protocol_conformance import (ACCEPTED, COMMIT, REJECTED, Peer, ctx, raw,  # noqa: E402,F401 - ctx: fixture
                                       upload)

D = 1024  # 4 KiB: one chunk
ETH = 10**18

# "the contract functions the documents name": register(signing key) with the stake as value,
# commit(key, commitment), deadline(key)
ABI = [
    {"type": "function", "name": "register", "stateMutability": "payable",
     "inputs": [{"name": "signing_key", "type": "bytes32"}], "outputs": []},
    {"type": "function", "name": "commit", "stateMutability": "nonpayable",
     "inputs": [{"name": "round_key", "type": "uint256"}, {"name": "commitment", "type": "bytes32"}], "outputs": []},
    {"type": "function", "name": "deadline", "stateMutability": "view",
     "inputs": [{"name": "arg0", "type": "uint256"}], "outputs": [{"name": "", "type": "uint256"}]},
]


def _message(chain_id, registry, session, rnd, digest):
    """The signed message, as docs/protocol.md writes it."""
    return (b"fedagg-update" + chain_id.to_bytes(32, "big") + bytes.fromhex(registry[2:]) +
            session.to_bytes(8, "big") + rnd.to_bytes(32, "big") + digest)


def test_a_participant_written_from_the_documents_takes_part_in_a_ledger_round(ctx, tmp_path):  # noqa: F811
    from fedagg import ledger
    from fedagg.transport import Server, ServerConfig

    w3 = ledger.embedded()
    owner, agg, me, liar = w3.eth.accounts[:4]
    chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=ETH)
    gate = ledger.LedgerGate(chain, commit_seconds=30.0, bundle_dir=str(tmp_path))
    server = Server(np.zeros(D, np.float32), ServerConfig(bind="tcp://127.0.0.1:0", quorum=1, min_updates=1,
                                                          rounds=1, deadline=60.0, ledger=gate, chunk_bytes=4096,
                                                          credits=3))

    # --- the participant, from the documents; registered before round 0 snapshots the registry
    registry = w3.eth.contract(address=chain.address, abi=ABI)
    keys = {a: nacl_signing.SigningKey.generate() for a in (me, liar)}
    for a in (me, liar):
        w3.eth.wait_for_transaction_receipt(registry.functions.register(bytes(keys[a].verify_key)).transact(
            {"from": a, "value": 2 * ETH}))
    th = threading.Thread(target=server.serve, daemon=True)
    th.start()
    peers = {}
    for a in (me, liar):
        peers[a] = Peer(ctx, server.endpoint, pid=a)
        peers[a].hello()
        assert peers[a].state["phase"] == "commit"
    update = np.linspace(-1, 1, D, dtype=np.float32)
    data = raw(update)
    digest = hashlib.sha256(data).digest()
    session, rnd = peers[me].session, peers[me].state["round"]
    key = session << 64 | rnd
    for a, committed in ((me, digest), (liar, hashlib.sha256(b"another update").digest())):
        commitment = keccak(key.to_bytes(32, "big") + bytes.fromhex(a[2:]) + committed)
        w3.eth.wait_for_transaction_receipt(registry.functions.commit(key, commitment).transact({"from": a}))

    # reveal only once the chain shows the window closed (the server closes it once all committed)
    end = time.monotonic() + 60
    while True:
        deadline = registry.functions.deadline(key).call()
        if deadline != 0 and w3.eth.block_number > deadline:
            break
        assert time.monotonic() < end, "the commit window did not close on chain"
        time.sleep(0.1)
    for _ in range(100):
        if peers[me].status().json()["phase"] == "upload":
            break
        time.sleep(0.1)
    chain_id = w3.eth.chain_id

    def reveal(a, signed_session):
        p = peers[a]
        sig = keys[a].sign(_message(chain_id, chain.address, signed_session, rnd, digest)).signature
        assert upload(p, data, rnd) == ("held", len(data))
        p.send(COMMIT, json.dumps({"signature": sig.hex()}).encode(), round=rnd, session=p.session, total=len(data))
        return p.recv((ACCEPTED, REJECTED))

    m = reveal(liar, session)  # signed well, but not what it committed
    assert m.kind == REJECTED and m.json()["reason"] == "commitment"
    m = reveal(me, session + 1)  # signed for another session
    assert m.kind == REJECTED and m.json()["reason"] == "signature"
    m = reveal(me, session)
    assert m.kind == ACCEPTED, m
    th.join(60)
    assert not th.is_alive()
    np.testing.assert_array_equal(server.model, update)
    rep = ledger.audit_round(chain, gate.last_bundle)
    assert rep.ok and rep.left_out == {liar: {"code": "contradicted its commitment", "reason": "commitment"}}
    for p in peers.values():
        p.close()
