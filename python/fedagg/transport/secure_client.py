"""A participant's side of a secure round (docs/protocol.md, "Secure rounds"): join, advertise keys,
send encrypted shares, upload the encoded and masked update, answer the unmask request.

Everything the server sends is parsed strictly (secure.wire) and checked by secure.Participant,
which refuses (RoundAborted) any request that could expose the update: asked for both shares of
one neighbour, too few neighbours, a roster with repeated keys, ciphertexts that do not
authenticate. Keys, seeds and noise are drawn fresh for every round.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, Optional

import numpy as np

from ..secure import PRG, Encoding, Params, Participant, RoundAborted, wire
from .client import TransportError
from .protocol import Codec, Dtype, Kind, ProtocolError, message, parse_json
from .secure_round import Step


def _group(obj: Any, d: int):
    """Params and Encoding from the server's group JSON, validated (a hostile server gets a clear error)."""
    try:
        e = obj["encoding"]
        params = Params(n=obj["n"], k=obj["k"], t=obj["t"], d=obj["d"], bits=obj["bits"],
                        min_survivors=obj["min_survivors"])
        enc = Encoding(clip=float(e["clip"]), sigma=float(e["sigma"]), gamma=float(e["gamma"]), n=e["n"], d=e["d"],
                       bits=e["bits"], beta=float(e["beta"]), seed=e["seed"])
        index, round_id, graph_seed = obj["index"], bytes.fromhex(obj["round_id"]), bytes.fromhex(obj["graph_seed"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise TransportError("protocol", f"the server's group is not valid: {e}") from None
    if enc.d != d or enc.padded != params.d or enc.bits != params.bits or enc.n != params.n:
        raise TransportError("protocol", f"the group's encoding (d {enc.d}, ring {enc.padded}, bits {enc.bits}, n "
                             f"{enc.n}) does not match the model's d {d} and the group ({params.d}, {params.bits}, "
                             f"{params.n})")
    if not isinstance(index, int) or not 0 <= index < params.n:
        raise TransportError("protocol", f"the group places this participant at index {index!r} of {params.n}")
    return params, enc, index, round_id, graph_seed


def _send(c, step: Step, payload: bytes, rnd: int) -> int:
    seq = c._next()
    c._send(message(Kind.SECAGG, payload, aux=int(step), round=rnd, seq=seq, session=c.state["session"]))
    return seq


def _ask(c, step: Step, payload: bytes, rnd: int, wait: float, seq: Optional[int] = None) -> memoryview:
    """Send SECAGG `step` (unless it went out as `seq`) and wait for its reply, at most `wait` s, sending
    it again every timeout (the server answers a repeated step again)."""
    deadline = time.monotonic() + wait
    while True:
        if seq is None:
            seq = _send(c, step, payload, rnd)
        resend = min(deadline, time.monotonic() + c.timeout)
        while True:
            got = c._recv(resend, until_round=rnd)
            if got is None:
                break
            head, body = got
            if head.kind == Kind.SECAGG_REPLY and head.aux == step and head.round == rnd:
                return body
            if head.kind == Kind.REJECTED and head.seq in (seq, 0):
                try:
                    r = parse_json(body)
                except ProtocolError:
                    continue
                if head.seq == 0 and r.get("reason") not in ("secure", "dropped"):
                    continue  # a refusal of something else
                raise TransportError(r.get("reason", "rejected"), f"{step.name}: {r.get('detail', '')}")
        if c.state.get("round", rnd) > rnd:
            raise TransportError("round", f"round {rnd} closed before this participant's {step.name} was answered")
        if time.monotonic() >= deadline:
            raise TransportError("timeout", f"no answer to SECAGG {step.name} in {wait:.0f} s")
        seq = None


def submit_secure(c, update: Any, round: Optional[int] = None, *,
                  ring: Optional[Callable[[Encoding, np.ndarray], np.ndarray]] = None) -> Dict[str, Any]:
    """Take part in the secure round `round` (default: the current one) with `update` (float32, d).

    Returns ACCEPTED's JSON with "bucket", "group" (its size) and "index" added; the group, the
    encoding and the epsilon of the bucket's sum are in ``c.last_secure``. `ring` replaces the
    honest encoding (tests play Byzantine participants with it).
    """
    st = c.status()
    arr = np.ascontiguousarray(np.asarray(update), dtype=np.float32).reshape(-1)
    if arr.size != st["d"]:
        raise ValueError(f"the update has {arr.size} values, the model {st['d']}")
    if not np.isfinite(arr).all():
        raise ValueError("the update holds NaN or Inf")
    rnd = st["round"] if round is None else int(round)
    if st["round"] != rnd:
        raise TransportError("late", f"the server is in round {st['round']}, this update is for {rnd}")
    if st.get("phase") != "join":
        raise TransportError("phase", f"the secure round {rnd} is in its {st.get('phase')} phase: it takes new "
                                      "participants in its join phase (wait for the next round)")
    sec = st["secure"]
    if sec.get("prg") != PRG:  # another PRG's masks would not cancel: the sum would be garbage
        raise TransportError("secure", f"the server's secure rounds use the mask PRG {sec.get('prg', 'chacha20')!r}; "
                                       f"this fedagg masks with {PRG!r} (run the same fedagg version as the server)")
    phase_wait = float(sec["phase_seconds"]) + c.timeout
    body = _ask(c, Step.JOIN, b"", rnd, float(sec["deadline"]) + phase_wait)
    try:
        group = parse_json(body)
    except ProtocolError as e:
        raise TransportError("protocol", f"the server's group: {e}") from None
    params, enc, index, round_id, graph_seed = _group(group, arr.size)
    try:
        me = Participant(params, index, round_id, graph_seed)
        if group.get("neighbours") != sorted(me.nbrs):
            raise TransportError("protocol", "the group's neighbours are not those of its graph seed")
        roster = wire.parse_roster(bytes(_ask(c, Step.ADVERTISE, wire.advertisement(me.advertise()), rnd,
                                              phase_wait)), params)
        shares = wire.ciphertexts(me.share_keys(roster))
        # the encoding (clip, rotation, rounding, noise) runs while the others send their shares
        seq = _send(c, Step.SHARES, shares, rnd)
        x = enc.encode(arr) if ring is None else ring(enc, arr)
        inbox = wire.parse_ciphertexts(bytes(_ask(c, Step.SHARES, shares, rnd, phase_wait, seq)), params)
        y = me.masked_input(x, inbox)
        accepted = c._send_update(y.view(np.uint8), Codec.RAW, Dtype.UINT32, rnd, 0.0, None)
        request = wire.parse_unmask_request(bytes(_ask(c, Step.UNMASK, b"", rnd, phase_wait)), params)
        response = me.unmask(request)
        _ask(c, Step.RESPONSE, wire.unmask_response(response), rnd, phase_wait)
    except RoundAborted as e:
        raise TransportError("aborted", str(e)) from None
    except ValueError as e:  # a server message that does not parse
        raise TransportError("protocol", str(e)) from None
    c.last_secure = {"round": rnd, "bucket": group["bucket"], "index": index, "group": params.n, "k": params.k,
                     "t": params.t, "clip": enc.clip, "sigma": enc.sigma, "gamma": enc.gamma,
                     "wrap_probability": enc.wrap_probability()}
    return dict(accepted, bucket=group["bucket"], group=params.n, index=index)
