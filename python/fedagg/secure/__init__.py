"""Secure aggregation: the server learns the sum of a group's updates, never one update.

- ``protocol``: SecAgg+ (Bell et al. 2020) phase by phase, ``Participant`` and ``Server``, with
  dropouts at every phase; masks are AES-128-CTR keystreams expanded and added natively.
- ``shamir``: t-of-k sharing of 32-byte secrets over GF(2^521 - 1).
- ``graph``: the random k-regular neighbour graph.
- ``ddg``: ``Encoding``, updates into the ring and back with the distributed discrete Gaussian
  (Kairouz, Liu, Steinke 2021), its epsilon (dp-accounting) and wrap-around bound.
- ``buckets``: buckets drawn from a public seed, for a robust rule over secure bucket sums.
- ``wire``: the messages' bytes, parsed strictly (for a transport to carry).
"""

from . import buckets, ddg, graph, shamir, wire
from .ddg import Encoding
from .protocol import (PRG, Advertisement, Ciphertext, Params, Participant, RoundAborted, RoundRefused, Server,
                       UnmaskRequest, UnmaskResponse, apply_masks)

__all__ = ["PRG", "Advertisement", "Ciphertext", "Encoding", "Params", "Participant", "RoundAborted", "RoundRefused",
           "Server", "UnmaskRequest", "UnmaskResponse", "apply_masks", "buckets", "ddg", "graph", "shamir", "wire"]
