"""The per-round bundle: what the aggregator publishes off chain so anyone can check a round.

One folder per recorded round, ``<session as 16 hex>-<round as 8 digits>``:

    manifest.json     canonical JSON (sorted keys, no spaces); its keccak256 is the bundle
                      hash recorded on chain, so the manifest cannot be swapped afterwards
    model.npy         the round's model (float32); its keccak256 is the model hash on chain
    prev_model.npy    the model the round started from (the session's previous model hash)
    updates/<address>.bin   the bytes each aggregated participant uploaded (when kept)

The manifest holds the round (chain id, contract, session, round, key), the rule and its
parameters as the server ran them, the chain's policy for the round, one leaf per participant
that committed (address, commitment, code, the SHA-256 it revealed, weight, encoding), the
order the updates were aggregated in, the refusal reason of everyone else, and the evidence
behind a CONTRADICTED code (the revealed hash and its Ed25519 signature).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Tuple

import numpy as np

FORMAT = "fedagg-bundle/1"


def canonical(manifest: Dict[str, Any]) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def bundle_hash(manifest: Dict[str, Any]) -> bytes:
    from eth_utils import keccak

    return keccak(canonical(manifest))


def folder_name(session: int, rnd: int) -> str:
    return f"{int(session):016x}-{int(rnd):08d}"


def write(root: Path, manifest: Dict[str, Any], model: np.ndarray, prev_model: np.ndarray,
          pending_updates: Path = None) -> Path:
    """Write the round's folder under `root` (updates moved in from `pending_updates`); returns it.
    Written to a temporary folder and renamed, so a folder that exists is complete."""
    root = Path(root)
    final = root / folder_name(manifest["session"], manifest["round"])
    tmp = root / f".{final.name}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "manifest.json").write_bytes(canonical(manifest))
    np.save(tmp / "model.npy", np.ascontiguousarray(model, dtype="<f4"))
    np.save(tmp / "prev_model.npy", np.ascontiguousarray(prev_model, dtype="<f4"))
    if pending_updates is not None and Path(pending_updates).is_dir():
        os.replace(pending_updates, tmp / "updates")
    os.replace(tmp, final)
    return final


def load(folder: Path) -> Tuple[Dict[str, Any], bytes]:
    """(manifest, its raw bytes) of a bundle folder; ValueError when it is not one."""
    raw = (Path(folder) / "manifest.json").read_bytes()
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"{folder}/manifest.json is not JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ValueError(f"{folder}/manifest.json is not a {FORMAT} manifest")
    return manifest, raw
