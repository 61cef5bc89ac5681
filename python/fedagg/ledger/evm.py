"""The ledger on an EVM chain, through web3.py: the embedded py-evm chain
(eth-tester, no service) or any JSON-RPC node (tested against Hardhat 2).

The same code runs on both; only the provider differs. Transactions are sent
from the node's unlocked accounts (eth-tester and Hardhat dev accounts).
Every revert, whatever the backend's exception type, becomes LedgerError
with the contract's reason.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

MAX_BATCH = 256
_SOURCE = Path(__file__).with_name("Registry.vy")


class LedgerError(RuntimeError):
    """A transaction reverted or the chain refused a call; the message says why."""


@dataclass(frozen=True)
class Entry:
    """A participant in the registry snapshot."""

    address: str
    signing_key: bytes
    stake: int  # bonded: what eligibility counts
    slashed: bool
    registered: bool
    unbonding: int = 0  # asked back, still slashable
    unbond_at: int = 0  # the block from which `unbonding` can be withdrawn


@dataclass(frozen=True)
class RoundRecord:
    """What the chain holds of a recorded round (Registry.vy's Record)."""

    round_key: int
    model_hash: bytes
    prev_model_hash: bytes
    merkle_root: bytes
    bundle_hash: bytes
    leaves_hash: bytes  # the contract's hash chain over the listed leaves (merkle.chain)
    listed: int  # every participant that committed in the round
    aggregated: int  # of them, in the aggregate or excluded by the rule


@dataclass(frozen=True)
class Policy:
    """The federation's policy on chain, changed only by a vote (propose, vote, execute)."""

    rule: str  # "" : the server's own choice
    f: int
    epsilon_micro: int  # DP budget per round x 1e6 (0: none)
    min_stake: int
    aggregator: str
    max_slash_bps: int


@functools.lru_cache(maxsize=1)
def compiled() -> Tuple[list, str]:
    """(abi, bytecode) of Registry.vy, compiled by the vyper package (no downloaded compiler)."""
    from vyper.compiler import compile_code

    out = compile_code(_SOURCE.read_text(), output_formats=["abi", "bytecode"])
    return out["abi"], out["bytecode"]


@functools.lru_cache(maxsize=1)
def runtime_code() -> bytes:
    """The code a genuine registry holds on chain (what `fedagg audit` compares the contract with)."""
    from vyper.compiler import compile_code

    return bytes.fromhex(compile_code(_SOURCE.read_text(), output_formats=["bytecode_runtime"])
                         ["bytecode_runtime"].removeprefix("0x"))


_REASONS = (re.compile(r"reverted with reason string '([^']*)'"), re.compile(r"execution reverted: ([^'\"]*)"),
            re.compile(r"reverted: ([^'\"]*)"))


def _reason(exc: BaseException) -> str:
    """The contract's revert reason, however the backend words it."""
    text = str(exc)
    for pattern in _REASONS:
        m = pattern.search(text)
        if m:
            return m.group(1).strip()
    return text


def _call(fn):
    """Run a chain interaction; any backend's revert becomes LedgerError."""
    try:
        return fn()
    except LedgerError:
        raise
    except Exception as e:  # noqa: BLE001 - backends raise many types: map them all
        name = type(e).__name__
        if any(k in name for k in ("Revert", "TransactionFailed", "ContractLogic", "RPCError", "ValueError")):
            raise LedgerError(_reason(e)) from e
        raise


def _locked(method):
    @functools.wraps(method)
    def run(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)
    return run


class EvmLedger:
    """The Registry contract at `address` on the chain of `w3`; `aggregator` sends the aggregator's txs."""

    def __init__(self, w3, address: str, aggregator: Optional[str] = None, *, abi: Optional[list] = None):
        """abi: the Registry's ABI when the caller has it (compiling the contract takes seconds)."""
        if abi is None:
            abi, _ = compiled()
        self.w3 = w3
        self.contract = w3.eth.contract(address=w3.to_checksum_address(address), abi=abi)
        self.address = self.contract.address
        # the account this object sends the aggregator's transactions from (the policy's, by default)
        self.aggregator = aggregator or self.contract.functions.policy().call()[4]
        self.gas: Dict[str, List[int]] = {}  # gas used per transaction kind
        # One request at a time: the embedded chain is shared by the server's and the
        # participants' threads in one process, and its provider is not thread-safe.
        self.lock = threading.RLock()
        self._domain: Optional[bytes] = None

    # ---------------------------------------------------------------- making one
    @classmethod
    def deploy(cls, w3, *, owner: str, aggregator: str, min_stake: int, registration_bond: Optional[int] = None,
               unbonding_blocks: int = 100, voting_blocks: int = 100, timelock_blocks: int = 100, rule: str = "",
               f: int = 0, max_slash_bps: int = 1000) -> "EvmLedger":
        """registration_bond: what registering costs at least (default: a tenth of min_stake, at least 1 wei);
        unbonding_blocks: how long asked-back stake stays slashable before it can be withdrawn;
        voting_blocks, timelock_blocks: how long a policy proposal takes votes, then waits before it
        can be executed; rule, f: the policy's aggregation rule ("" leaves it to the server);
        max_slash_bps: the most one slash takes of a participant's stake (basis points)."""
        abi, bytecode = compiled()
        bond = max(1, int(min_stake) // 10) if registration_bond is None else int(registration_bond)
        factory = w3.eth.contract(abi=abi, bytecode=bytecode)
        tx = _call(lambda: factory.constructor(int(min_stake), aggregator, bond, int(unbonding_blocks),
                                               int(voting_blocks), int(timelock_blocks), str(rule), int(f),
                                               int(max_slash_bps)).transact({"from": owner}))
        receipt = w3.eth.wait_for_transaction_receipt(tx)
        ledger = cls(w3, receipt.contractAddress, aggregator)
        ledger.gas.setdefault("deploy", []).append(receipt.gasUsed)
        return ledger

    # ---------------------------------------------------------------- transactions
    def _transact(self, kind: str, sender: str, fn, value: int = 0) -> Any:
        with self.lock:
            tx = _call(lambda: fn.transact({"from": sender, "value": int(value)}))
            receipt = self.w3.eth.wait_for_transaction_receipt(tx)
        if receipt.status != 1:
            raise LedgerError(f"{kind} failed")
        self.gas.setdefault(kind, []).append(receipt.gasUsed)
        return receipt

    def register(self, account: str, signing_key: bytes, stake: int = 0) -> None:
        self._transact("register", account, self.contract.functions.register(bytes(signing_key)), stake)

    def stake(self, account: str, amount: int) -> None:
        self._transact("stake", account, self.contract.functions.stake(), amount)

    def unbond(self, account: str, amount: int) -> int:
        """Ask `amount` of the stake back; returns the block from which it can be withdrawn."""
        self._transact("unbond", account, self.contract.functions.unbond(int(amount)))
        return self.snapshot([account])[self.w3.to_checksum_address(account)].unbond_at

    def withdraw(self, account: str) -> None:
        """Pull the unbonded stake once its period is over."""
        self._transact("withdraw", account, self.contract.functions.withdraw())

    # ---------------------------------------------------------------- roles and governance
    def propose_owner(self, owner: str, new_owner: str) -> None:
        self._transact("propose_owner", owner, self.contract.functions.propose_owner(
            self.w3.to_checksum_address(new_owner)))

    def accept_owner(self, new_owner: str) -> None:
        self._transact("accept_owner", new_owner, self.contract.functions.accept_owner())

    def propose(self, proposer: str, policy: Policy) -> int:
        """A staked participant proposes `policy` as a whole; returns the proposal's id."""
        receipt = self._transact("propose", proposer, self.contract.functions.propose(
            policy.rule, int(policy.f), int(policy.epsilon_micro), int(policy.min_stake),
            self.w3.to_checksum_address(policy.aggregator), int(policy.max_slash_bps)))
        return int(self.contract.events.Proposed().process_receipt(receipt)[0]["args"]["proposal"])

    def vote(self, voter: str, proposal: int) -> None:
        self._transact("vote", voter, self.contract.functions.vote(int(proposal)))

    def execute(self, sender: str, proposal: int) -> None:
        self._transact("execute", sender, self.contract.functions.execute(int(proposal)))

    def cancel(self, owner: str, proposal: int) -> None:
        self._transact("cancel", owner, self.contract.functions.cancel(int(proposal)))

    # ---------------------------------------------------------------- rounds (the aggregator)
    def open_round(self, key: int, window_blocks: int) -> int:
        """Open commitments for round `key` (crypto.round_key) until `window_blocks` blocks from now;
        returns the deadline."""
        deadline = self.block_number() + int(window_blocks)
        self._transact("open_round", self.aggregator, self.contract.functions.open_round(int(key), deadline))
        return deadline

    def close_commits(self, key: int) -> None:
        self._transact("close_commits", self.aggregator, self.contract.functions.close_commits(int(key)))

    def commit(self, account: str, key: int, commitment: bytes) -> None:
        self._transact("commit", account, self.contract.functions.commit(int(key), bytes(commitment)))

    def record_round(self, key: int, model_hash: bytes, prev_model_hash: bytes, merkle_root: bytes,
                     bundle_hash: bytes, listing: Sequence[Tuple[str, int]]) -> None:
        """List every participant that committed with its code (ascending addresses, MAX_BATCH per
        transaction: any number of participants), then record the round. A retry after a failure goes on
        from where the listing got (the rows the contract already holds are not sent again)."""
        rows = sorted(((self.w3.to_checksum_address(a), int(c)) for a, c in listing), key=lambda r: int(r[0], 16))
        with self.lock:
            _, last = self.contract.functions.listing(int(key)).call()
        rows = [r for r in rows if int(r[0], 16) > int(last, 16)]
        for start in range(0, len(rows), MAX_BATCH):
            part = rows[start:start + MAX_BATCH]
            self._transact("list_participants", self.aggregator, self.contract.functions.list_participants(
                int(key), [a for a, _ in part], [c for _, c in part]))
        self._transact("record_round", self.aggregator, self.contract.functions.record_round(
            int(key), bytes(model_hash), bytes(prev_model_hash), bytes(merkle_root), bytes(bundle_hash)))

    def slash(self, sender: str, participant: str, key: int, code: int, proof: Sequence[bytes]) -> None:
        """Slash `participant` with the evidence of round `key`: its leaf's code and Merkle proof."""
        self._transact("slash", sender, self.contract.functions.slash(
            self.w3.to_checksum_address(participant), int(key), int(code), [bytes(p) for p in proof]))

    # ---------------------------------------------------------------- views (batched)
    def signing_domain(self) -> bytes:
        """crypto.domain of this registry: the chain id and the contract address (asked once)."""
        if self._domain is None:
            from . import crypto

            with self.lock:
                self._domain = crypto.domain(int(self.w3.eth.chain_id), self.address)
        return self._domain

    @_locked
    def block_number(self) -> int:
        return int(self.w3.eth.block_number)

    @_locked
    def policy(self) -> Policy:
        rule, f, eps, min_stake, aggregator, cap = self.contract.functions.policy().call()
        return Policy(str(rule), int(f), int(eps), int(min_stake), str(aggregator), int(cap))

    def min_stake(self) -> int:
        return self.policy().min_stake

    @_locked
    def deadline(self, key: int) -> int:
        return int(self.contract.functions.deadline(int(key)).call())

    @_locked
    def commit_count(self, key: int) -> int:
        return int(self.contract.functions.commit_count(int(key)).call())

    @_locked
    def code(self) -> bytes:
        """The code at the registry's address (compare with runtime_code())."""
        return bytes(self.w3.eth.get_code(self.address))

    @_locked
    def registered(self) -> List[str]:
        """Every registered address, MAX_BATCH per call."""
        n = int(self.contract.functions.participant_count().call())
        out: List[str] = []
        for start in range(0, n, MAX_BATCH):
            out += list(self.contract.functions.registered_slice(start, MAX_BATCH).call())
        return out

    @_locked
    def snapshot(self, addresses: Optional[Sequence[str]] = None) -> Dict[str, Entry]:
        """The registry entries of `addresses` (default: everyone registered), by address."""
        addrs = self.registered() if addresses is None else [self.w3.to_checksum_address(a) for a in addresses]
        out: Dict[str, Entry] = {}
        for start in range(0, len(addrs), MAX_BATCH):
            part = addrs[start:start + MAX_BATCH]
            for a, (key, stake, slashed, registered, unbonding, unbond_at) in zip(
                    part, self.contract.functions.registry(part).call()):
                out[a] = Entry(a, bytes(key), int(stake), bool(slashed), bool(registered), int(unbonding),
                               int(unbond_at))
        return out

    @_locked
    def commitments(self, key: int, addresses: Sequence[str]) -> Dict[str, bytes]:
        """{address: commitment} of `addresses` in round `key`, missing ones left out; one call per
        256 addresses."""
        addrs = [self.w3.to_checksum_address(a) for a in addresses]
        out: Dict[str, bytes] = {}
        for start in range(0, len(addrs), MAX_BATCH):
            part = addrs[start:start + MAX_BATCH]
            for a, c in zip(part, self.contract.functions.commitments_of(int(key), part).call()):
                if bytes(c) != bytes(32):
                    out[a] = bytes(c)
        return out

    @_locked
    def round_record(self, key: int) -> RoundRecord:
        mh, prev, root, bundle, leaves, listed, aggregated = _call(
            lambda: self.contract.functions.round_record(int(key)).call())
        return RoundRecord(int(key), bytes(mh), bytes(prev), bytes(root), bytes(bundle), bytes(leaves), int(listed),
                           int(aggregated))


def embedded(accounts: int = 40):
    """A Web3 on a fresh in-process py-evm chain (eth-tester): no service, `accounts` funded dev accounts."""
    from eth_tester import EthereumTester, PyEVMBackend
    from web3 import EthereumTesterProvider, Web3

    backend = PyEVMBackend(genesis_state=PyEVMBackend.generate_genesis_state(num_accounts=int(accounts)))
    return Web3(EthereumTesterProvider(EthereumTester(backend)))


def connect(url: str, timeout: float = 10.0):
    """A Web3 on the JSON-RPC node at `url` (waits up to `timeout` for it to answer)."""
    from web3 import HTTPProvider, Web3

    w3 = Web3(HTTPProvider(url, request_kwargs={"timeout": timeout}))
    end = time.monotonic() + timeout
    while True:
        try:
            if w3.is_connected():
                return w3
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > end:
            raise LedgerError(f"no JSON-RPC node answers at {url}")
        time.sleep(0.2)
