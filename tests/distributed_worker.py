"""One rank of tests/test_distributed.py: every rule sharded over a gloo group, checked against
single-process fedagg.aggregate on the same rows (which every rank also holds, for the check).

Run as ``python distributed_worker.py OUT_JSON`` with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT
set. Writes {"checks": count, "failures": [...]} to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import numpy as np
import torch
import torch.distributed as dist

import fedagg
import fedagg.distributed as fd
from fedagg.privacy import CentralDP

BITWISE = ("mean", "median", "trimmed_mean")  # per coordinate: the same floats whatever the split
SELECTING = ("krum", "multi_krum", "bulyan")  # bitwise given the same selection


def uneven_widths(d: int, size: int, seed: int) -> list:
    """A split of d into `size` widths, some of them possibly 0 (the same on every rank)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, d + 1, size=size - 1))
    edges = np.concatenate([[0], cuts, [d]])
    return [int(b - a) for a, b in zip(edges[:-1], edges[1:])]


def cases():
    rng = np.random.default_rng(7)
    n = 11
    for rule in fedagg.RULES:
        f = 0 if rule == "mean" else (2 if rule == "bulyan" else 3)
        base = {"rule": rule, "f": f}
        yield dict(base)
        yield dict(base, clip_norm=3.0)
        yield dict(base, nnm=True, f=max(f, 2))
        yield dict(base, nonfinite="exclude", nan_rows=[1, 6], f=max(0, f - 1) if rule != "bulyan" else 1)
        if rule in ("mean", "multi_krum", "geometric_median", "centered_clipping"):
            yield dict(base, weights=rng.uniform(0.1, 1.0, n).round(3).tolist())
        yield dict(base, dp="gaussian")
        yield dict(base, dp="discrete")
        # A clipping norm no update (nor the aggregate) reaches: nothing is scaled, so the noise
        # itself is compared, bit for bit (the slice of the whole aggregate's stream at offset lo).
        yield dict(base, dp="gaussian-wide")
        yield dict(base, dp="discrete-wide")
    yield {"rule": "trimmed_mean", "f": 0, "beta": 0.2}
    yield {"rule": "centered_clipping", "f": 2, "iterations": 3, "tau": 2.0, "center": True}
    yield {"rule": "multi_krum", "f": 2, "m": 4}


def make_dp(kind):
    if kind is None:
        return None
    mode, _, wide = kind.partition("-")
    return CentralDP(clip_norm=1e6 if wide else 4.0, noise_multiplier=1.0,
                     expected_participants=11, mode=mode, seed=1234, accountant="rdp")


def check(case, rows, widths, rank, group, failures):
    case = dict(case)
    rule, f = case.pop("rule"), case.pop("f")
    nan_rows = case.pop("nan_rows", [])
    dp_kind = case.pop("dp", None)
    center = case.pop("center", None)
    X = rows.copy()
    for i in nan_rows:
        X[i, (3 * i) % X.shape[1]] = np.nan
    if center:
        case["center"] = np.linspace(-1, 1, X.shape[1]).astype(np.float32)
    lo = sum(widths[:rank])
    hi = lo + widths[rank]
    full, info_full = fedagg.aggregate(X, rule, f, dp=make_dp(dp_kind), return_info=True, **case)
    sharded = dict(case)
    if center:
        sharded["center"] = case["center"][lo:hi]
    out, info = fd.aggregate(np.ascontiguousarray(X[:, lo:hi]), rule, f, dp=make_dp(dp_kind),
                             return_info=True, **sharded)
    label = f"{rule} f={f} {case.keys() - {'center'}} dp={dp_kind} nan={nan_rows} widths={widths}"
    want = full[lo:hi]
    if out.shape != want.shape:
        failures.append(f"{label}: shape {out.shape} != {want.shape}")
        return
    same_selection = (info.selected is None) == (info_full.selected is None) and (
        info.selected is None or np.array_equal(info.selected, info_full.selected))
    if not same_selection:
        failures.append(f"{label}: selected {info.selected} != {info_full.selected}")
    if not np.array_equal(info.excluded, info_full.excluded):
        failures.append(f"{label}: excluded {info.excluded} != {info_full.excluded}")
    if info.clipped != info_full.clipped:
        failures.append(f"{label}: clipped {info.clipped} != {info_full.clipped}")
    # Clipping (clip_norm, and dp's) scales by norms summed over coordinates in another order.
    exact = (rule in BITWISE or rule in SELECTING) and not case.get("nnm") and not case.get("clip_norm") \
        and (not dp_kind or dp_kind.endswith("-wide"))
    if exact:
        if not np.array_equal(out, want, equal_nan=True):
            bad = np.flatnonzero(out != want)
            failures.append(f"{label}: not bitwise at {bad[:5]} ({out[bad[:3]]} vs {want[bad[:3]]})")
    else:
        # float64 sums of distances / norms in another order: float32 rounding of the result
        scale = max(1.0, float(np.max(np.abs(full))))
        err = float(np.max(np.abs(out.astype(np.float64) - want))) if out.size else 0.0
        tol = 2e-5 * scale if rule in ("geometric_median", "centered_clipping") or case.get("nnm") else 1e-6 * scale
        if dp_kind and dp_kind.startswith("discrete"):  # randomized rounding to the grid may flip by one step
            tol += 1.01 * info_full.privacy.grid_step
        if not err <= tol:
            failures.append(f"{label}: max error {err:.3g} > {tol:.3g}")
    if dp_kind and info.privacy.noise_stddev != info_full.privacy.noise_stddev:
        failures.append(f"{label}: noise std {info.privacy.noise_stddev} != {info_full.privacy.noise_stddev}")
    # The info is the same on every rank.
    mine = (info.rule, info.n, info.f, None if info.selected is None else info.selected.tolist(),
            info.excluded.tolist(), info.clipped, info.iterations,
            None if info.scores is None else np.nan_to_num(info.scores).tobytes(),
            None if info.weights is None else info.weights.tobytes())
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    if any(o != everyone[0] for o in everyone):
        failures.append(f"{label}: AggregationInfo differs between ranks")


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    failures, checks = [], 0
    try:
        for d, seed in ((37, 1), (2, 2), (1, 3), (64, 4)):
            rows = (np.random.default_rng(seed).normal(size=(11, d)) * 2).astype(np.float32)
            for split in ("even", "uneven"):
                if split == "even":
                    widths = [fd.shard_range(d, r, size)[1] - fd.shard_range(d, r, size)[0] for r in range(size)]
                else:
                    widths = uneven_widths(d, size, seed)
                for case in cases():
                    check(case, rows, widths, rank, None, failures)
                    checks += 1
        # A rank given other options than rank 0 is refused on every rank, not left waiting.
        rows = np.ones((5, 3), dtype=np.float32)
        if size > 1:
            try:
                fd.aggregate(rows, "median", 1 if rank == 0 else 2)
                failures.append("mismatched f was not refused")
            except ValueError as e:
                if "another rule" not in str(e):
                    failures.append(f"mismatched f: unexpected message {e}")
            checks += 1
        try:
            fd.aggregate(rows if rank else rows.astype(np.int32), "median")
            failures.append("integer shard was not refused")
        except TypeError:
            if rank != 0:
                failures.append("rank != 0 raised TypeError for rank 0's bad input")
        except RuntimeError as e:
            if rank == 0 or "rank 0" not in str(e):
                failures.append(f"bad input elsewhere: unexpected {e}")
        checks += 1
        # torch input in, torch output out
        t = torch.ones((4, 5), dtype=torch.float64)
        lo, hi = fd.shard_range(5, rank, size)
        res = fd.aggregate(t[:, lo:hi].contiguous(), "mean")
        if not (isinstance(res, torch.Tensor) and res.dtype == torch.float64 and res.shape == (hi - lo,)):
            failures.append(f"torch in: got {type(res)} {getattr(res, 'dtype', None)} {getattr(res, 'shape', None)}")
        checks += 1
    except Exception:
        failures.append(traceback.format_exc())
    with open(out_path, "w") as fh:
        json.dump({"checks": checks, "failures": failures}, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    main(sys.argv[1])
