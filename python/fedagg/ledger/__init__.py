"""Blockchain-validated participants: an on-chain registry with stake, update
commitments, signed updates and audited round records (contract: Registry.vy).

>>> from fedagg import ledger                                          # doctest: +SKIP
>>> w3 = ledger.embedded()                 # in-process py-evm chain; or ledger.connect("http://127.0.0.1:8545")
>>> owner, agg, alice = w3.eth.accounts[:3]
>>> chain = ledger.EvmLedger.deploy(w3, owner=owner, aggregator=agg, min_stake=10**18)
"""

from . import bundle, crypto, merkle
from .audit import AuditReport, audit_bundles, audit_round
from .base import Ledger
from .evm import EvmLedger, Entry, LedgerError, Policy, RoundRecord, compiled, connect, embedded
from .gate import LedgerGate, LedgerParticipant

__all__ = ["AuditReport", "Entry", "EvmLedger", "Ledger", "LedgerError", "LedgerGate", "LedgerParticipant", "Policy",
           "RoundRecord", "audit_bundles", "audit_round", "bundle", "compiled", "connect", "crypto", "embedded",
           "merkle"]
