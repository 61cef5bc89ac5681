"""fedagg.integrations.nvflare: the FedaggAggregator in NVFlare's simulator and through its API.

The simulator test runs a real NVFlare job (FedJob -> simulator, 4 client processes, one of
them Byzantine) and checks the saved global model bit for bit against fedagg.aggregate run
plainly on the same client updates. The other tests drive the ModelAggregator API directly
and compare with plain float64 NumPy references written here.
"""

import doctest
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

pytest.importorskip("nvflare")

from nvflare.apis.fl_constant import FLMetaKey  # noqa: E402
from nvflare.apis.fl_context import FLContext  # noqa: E402
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType  # noqa: E402
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator  # noqa: E402
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper  # noqa: E402
from nvflare.app_common.utils.fl_model_utils import FLModelUtils  # noqa: E402

import fedagg  # noqa: E402
import fedagg.integrations.nvflare as fnv  # noqa: E402
from fedagg import privacy  # noqa: E402
from fedagg.integrations.nvflare import FedaggAggregator, num_steps_weight  # noqa: E402

STEPS = FLMetaKey.NUM_STEPS_CURRENT_ROUND


# ------------------------------------------------------------------ float64 references
def f64(x):
    return np.asarray(x, dtype=np.float64)


def ref_mean(X, w=None):
    X = f64(X)
    w = np.ones(len(X)) if w is None else f64(w)
    out = np.zeros(X.shape[1])
    for wi, x in zip(w, X):
        out += wi * x
    return out / w.sum()


def ref_trimmed_mean(X, f):
    X = f64(X)
    n = len(X)
    return np.array([sum(sorted(X[:, j])[f:n - f]) / (n - 2 * f) for j in range(X.shape[1])])


def ref_krum_index(X, f):
    X = f64(X)
    n = len(X)
    scores = []
    for i in range(n):
        d = sorted(float(np.dot(X[i] - X[k], X[i] - X[k])) for k in range(n) if k != i)
        scores.append(sum(d[:n - f - 2]))
    return int(np.argmin(scores))


# ------------------------------------------------------------------ helpers
SHAPES = {"conv.weight": ((4, 3, 3), np.float32), "fc.bias": ((5,), np.float64),
          "scale": ((), np.float32), "emb": ((2, 6), np.float16)}


def make_params(seed, shift=0.0, shapes=SHAPES):
    rng = np.random.default_rng(seed)
    return {k: np.asarray(rng.normal(size=s) + shift).astype(dt) for k, (s, dt) in shapes.items()}


def flm(params, name=None, steps=None, params_type=ParamsType.DIFF, metrics=None, meta=None):
    meta = dict(meta or {})
    if name is not None:
        meta["client_name"] = name
    if steps is not None:
        meta[STEPS] = steps
    return FLModel(params_type=params_type, params=params, metrics=metrics, meta=meta)


def flat32(params, keys):
    """The float32 values fedagg aggregates (float64 inputs are rounded once), as float64."""
    return np.concatenate([np.asarray(params[k], dtype=np.float32).reshape(-1) for k in keys]).astype(np.float64)


def unflat(vec, like):
    out, off = {}, 0
    for k, v in like.items():
        size = int(np.prod(v.shape))
        out[k] = vec[off:off + size].reshape(v.shape)
        off += size
    return out


def assert_params_equal(result, vec, like):
    """result == the float32 vector `vec` split like `like` and cast to each key's dtype, bit for bit."""
    for k, v in unflat(np.asarray(vec, dtype=np.float32), like).items():
        np.testing.assert_array_equal(result[k], v.astype(like[k].dtype), err_msg=k)


def assert_like(result, like):
    """Same keys (in order), shapes, kinds and dtypes."""
    assert list(result) == list(like)
    for k in like:
        assert type(result[k]) is type(like[k]), k
        assert result[k].dtype == like[k].dtype, k
        assert tuple(result[k].shape) == tuple(like[k].shape), k


def run(agg, models):
    for m in models:
        assert agg.accept_model(m) is True
    return agg.aggregate_model()


def clients(n, seed=0, byzantine=(), shapes=SHAPES):
    out = {}
    for i in range(n):
        name = f"site-{i + 1}"
        out[name] = make_params(seed * 100 + i, shift=(50.0 if name in byzantine else 0.0), shapes=shapes)
    return out


def tol(dtype):
    return {np.float16: 1e-3, np.float32: 1e-6, np.float64: 1e-6}[np.dtype(dtype).type]


def check_against(result, ref_vec, like):
    ref = unflat(ref_vec, like)
    for k in like:
        np.testing.assert_allclose(f64(result[k]), ref[k], rtol=tol(like[k].dtype), atol=tol(like[k].dtype))


# ------------------------------------------------------------------ API: rules vs float64 references
def test_is_a_model_aggregator_and_doctest():
    assert issubclass(FedaggAggregator, ModelAggregator)
    assert FedaggAggregator()  # truthy when empty: FedAvg checks `if self.aggregator:`
    result = doctest.testmod(fnv, verbose=False, report=True)
    assert result.attempted > 0 and result.failed == 0


def test_mean_unweighted_matches_float64_reference():
    data = clients(5)
    keys = list(SHAPES)
    out = run(FedaggAggregator(rule="mean", weighted=False), [flm(p, n, steps=10 * (i + 1))
                                                             for i, (n, p) in enumerate(data.items())])
    assert out.params_type == ParamsType.DIFF
    assert_like(out.params, data["site-1"])
    check_against(out.params, ref_mean([flat32(p, keys) for p in data.values()]), data["site-1"])
    meta = out.meta["fedagg"]
    assert meta["rule"] == "mean" and meta["n"] == 5 and meta["clients"] == list(data)
    np.testing.assert_allclose(meta["weights"], [0.2] * 5)


def test_mean_weighted_by_num_steps_like_nvflare():
    data = clients(4)
    keys = list(SHAPES)
    steps = [1, 10, 30, None]  # None: no step count -> 1.0, as NVFlare's FedAvg
    factors = {"site-2": 0.5, "site-3": 2.0}
    models = [flm(p, n, steps=s) for (n, p), s in zip(data.items(), steps)]
    out = run(FedaggAggregator(rule="mean", aggregation_weights=factors), models)
    w = [1.0, 5.0, 60.0, 1.0]
    check_against(out.params, ref_mean([flat32(p, keys) for p in data.values()], w), data["site-1"])
    np.testing.assert_allclose(out.meta["fedagg"]["weights"], np.array(w) / sum(w))

    # NVFlare's own weighted aggregation (its helper, as FedAvg uses it) gives the same model.
    helper = WeightedAggregationHelper()
    for (n, p), wi in zip(data.items(), w):
        helper.add({k: v.astype(np.float32).astype(np.float64) for k, v in p.items()}, wi, n, 0)
    theirs = helper.get_result()
    for k in keys:
        np.testing.assert_allclose(f64(out.params[k]), theirs[k], rtol=tol(SHAPES[k][1]), atol=tol(SHAPES[k][1]))


@pytest.mark.parametrize("value, expected", [(None, 1.0), (7, 7.0), ("3", 3.0), (0, 1.0), (-2, 1.0),
                                             (float("nan"), 1.0), (float("inf"), 1.0), (True, 1.0),
                                             ("many", 1.0), (2.5, 2.5)])
def test_num_steps_weight_reads_the_meta_as_fedavg(value, expected):
    from nvflare.app_common.workflows.base_fedavg import _get_num_steps_weight

    meta = {} if value is None else {STEPS: value}
    assert num_steps_weight(meta) == expected == _get_num_steps_weight(FLModel(params={}, meta=meta))


@pytest.mark.parametrize("f", [1, 2])
def test_trimmed_mean_matches_float64_reference(f):
    data = clients(6, seed=3, byzantine=("site-2",))
    keys = list(SHAPES)
    out = run(FedaggAggregator(rule="trimmed_mean", f=f), [flm(p, n, steps=99) for n, p in data.items()])
    check_against(out.params, ref_trimmed_mean([flat32(p, keys) for p in data.values()], f), data["site-1"])
    assert out.meta["fedagg"]["weights"] is None  # the robust rules are not weighted by default
    assert out.meta["fedagg"]["details"] == {"trimmed_per_side": f}


def test_krum_selects_the_reference_client_exactly():
    data = clients(7, seed=5, byzantine=("site-3", "site-6"))
    keys = list(SHAPES)
    X = [flat32(p, keys) for p in data.values()]
    out = run(FedaggAggregator(rule="krum", f=2), [flm(p, n, params_type=ParamsType.FULL) for n, p in data.items()])
    best = ref_krum_index(X, 2)
    chosen = list(data)[best]
    assert out.meta["fedagg"]["selected"] == [chosen]
    assert out.params_type == ParamsType.FULL
    for k, v in data[chosen].items():  # the chosen client's values, through float32 and back
        np.testing.assert_array_equal(out.params[k], v.astype(np.float32).astype(v.dtype))


def test_multi_krum_and_geometric_median_weighted():
    data = clients(7, seed=8, byzantine=("site-1",))
    keys = list(SHAPES)
    steps = [3, 1, 2, 5, 1, 4, 2]
    models = [flm(p, n, steps=s) for (n, p), s in zip(data.items(), steps)]
    X = np.stack([flat32(p, keys) for p in data.values()]).astype(np.float32)
    for rule, f in [("multi_krum", 2), ("geometric_median", 1)]:
        out = run(FedaggAggregator(rule=rule, f=f, weighted=True), models)
        plain = fedagg.aggregate(X, rule, f, weights=np.array(steps, dtype=np.float64))
        assert_params_equal(out.params, plain, data["site-1"])


# ------------------------------------------------------------------ API: types, dtypes, order
def test_torch_tensors_keep_kind_dtype_and_device():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    names = [f"site-{i}" for i in range(5)]
    base = [rng.normal(size=(3, 4)) for _ in names]
    models = [flm({"w": torch.tensor(b, dtype=torch.float32), "h": torch.tensor(b[0], dtype=torch.bfloat16),
                   "d": torch.tensor(b, dtype=torch.float64).T}, n)  # .T: non-contiguous
              for n, b in zip(names, base)]
    out = run(FedaggAggregator(rule="median", f=1), models)
    assert {k: (type(v), v.dtype, v.device.type) for k, v in out.params.items()} == {
        "w": (torch.Tensor, torch.float32, "cpu"), "h": (torch.Tensor, torch.bfloat16, "cpu"),
        "d": (torch.Tensor, torch.float64, "cpu")}
    assert out.params["d"].shape == (4, 3)
    w = np.stack([f64(np.float32(b)) for b in base])
    np.testing.assert_array_equal(out.params["w"].numpy(), np.median(w, axis=0).astype(np.float32))
    d = np.stack([f64(np.float32(b.T)) for b in base])
    np.testing.assert_allclose(out.params["d"].numpy(), np.median(d, axis=0), rtol=1e-6)
    h = np.stack([torch.tensor(b[0], dtype=torch.bfloat16).float().numpy() for b in base])
    np.testing.assert_allclose(out.params["h"].float().numpy(), np.median(h, axis=0), rtol=1e-2)


@pytest.mark.parametrize("rule, f, weighted", [("mean", 0, True), ("trimmed_mean", 1, False), ("krum", 1, False),
                                               ("geometric_median", 1, True), ("bulyan", 1, False),
                                               ("centered_clipping", 1, False)])
def test_arrival_order_does_not_change_a_bit(rule, f, weighted):
    data = clients(7, seed=11, byzantine=("site-5",))
    models = [flm(p, n, steps=i + 1) for i, (n, p) in enumerate(data.items())]
    results = []
    for perm in ([0, 1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1, 0], [3, 0, 6, 2, 5, 1, 4]):
        out = run(FedaggAggregator(rule=rule, f=f, weighted=weighted), [models[i] for i in perm])
        results.append(out)
        assert out.meta["fedagg"]["clients"] == sorted(data)
    keys = list(SHAPES)
    for other in results[1:]:
        np.testing.assert_array_equal(flat32(other.params, keys), flat32(results[0].params, keys))
    # ... and it is fedagg.aggregate of the updates in client-name order.
    X = np.stack([flat32(data[n], keys) for n in sorted(data)]).astype(np.float32)
    w = np.array([list(data).index(n) + 1.0 for n in sorted(data)]) if weighted else None
    assert_params_equal(results[0].params, fedagg.aggregate(X, rule, f, weights=w), data["site-1"])


def test_concurrent_accepts_give_the_sequential_result():
    data = clients(8, seed=2)
    models = [flm(p, n) for n, p in data.items()]
    seq = run(FedaggAggregator(rule="trimmed_mean", f=2), models)
    agg = FedaggAggregator(rule="trimmed_mean", f=2, expected_clients=2)  # grows while threads write
    errors = []

    def worker(m):
        try:
            agg.accept_model(m)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(m,)) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
        assert not t.is_alive()
    assert not errors and agg.num_accepted == 8
    out = agg.aggregate_model()
    for k in SHAPES:
        np.testing.assert_array_equal(out.params[k], seq.params[k])


def test_unnamed_models_aggregate_in_arrival_order():
    data = clients(3, seed=4)
    out = run(FedaggAggregator(rule="mean"), [flm(p) for p in data.values()])
    assert out.meta["fedagg"]["clients"] == ["#0", "#1", "#2"]
    keys = list(SHAPES)
    check_against(out.params, ref_mean([flat32(p, keys) for p in data.values()]), data["site-1"])


def test_site_name_from_the_shareable_path_and_scatter_and_gather_accept():
    data = clients(3, seed=6)
    agg = FedaggAggregator(rule="median", f=1, nonfinite="exclude")
    ctx = FLContext()
    for n, p in data.items():
        sh = FLModelUtils.to_shareable(flm(p, params_type=ParamsType.DIFF))
        sh.set_header(FLMetaKey.SITE_NAME, n)
        assert agg.accept(sh, ctx) is True
    bad = {k: np.full_like(v, np.nan) for k, v in data["site-1"].items()}
    sh = FLModelUtils.to_shareable(flm(bad, params_type=ParamsType.DIFF))
    sh.set_header(FLMetaKey.SITE_NAME, "site-9")
    assert agg.accept(sh, ctx) is False
    out = agg.aggregate(ctx)
    model = FLModelUtils.from_shareable(out)
    assert model.meta["fedagg"]["clients"] == list(data)
    assert model.meta["fedagg"]["excluded"] == ["site-9"]


# ------------------------------------------------------------------ API: validation
def test_validation_errors_leave_the_round_unchanged():
    data = clients(3, seed=7)
    good = data["site-1"]
    agg = FedaggAggregator(rule="mean")
    agg.accept_model(flm(good, "site-1"))

    def rejects(exc, match, params, name="site-x", **kw):
        with pytest.raises(exc, match=match):
            agg.accept_model(flm(params, name, **kw))
        assert agg.num_accepted == 1

    missing = {k: v for k, v in good.items() if k != "scale"}
    rejects(ValueError, r"missing \['scale'\], unexpected \[\]", missing)
    rejects(ValueError, r"unexpected \['extra'\]", {**good, "extra": np.zeros(2, np.float32)})
    rejects(ValueError, r"params\['fc.bias'\] has shape \(6,\), this round has \(5,\)",
            {**good, "fc.bias": np.zeros(6)})
    rejects(TypeError, r"params\['fc.bias'\] is numpy float32, this round has numpy float64",
            {**good, "fc.bias": np.zeros(5, np.float32)})
    rejects(TypeError, r"params\['scale'\]: list is not a NumPy array", {**good, "scale": [1.0]})
    rejects(TypeError, r"int64 is not float", {**good, "scale": np.array(3)})
    rejects(ValueError, r"params_type FULL, this round has DIFF", good, params_type=ParamsType.FULL)
    rejects(ValueError, r"client 'site-1' already contributed", good, name="site-1")
    nan = {**good, "emb": good["emb"].copy()}
    nan["emb"][1, 2] = np.nan
    rejects(ValueError, r"client 'site-x': params\['emb'\] contains NaN or Inf", nan)
    huge = {**good, "fc.bias": np.full(5, 1e300)}  # finite in float64, Inf in the float32 buffer
    rejects(ValueError, r"params\['fc.bias'\] contains NaN or Inf", huge)
    with pytest.raises(TypeError, match="expected an FLModel"):
        agg.accept_model({"w": np.zeros(3)})
    with pytest.raises(TypeError, match="params must be a dict"):
        agg.accept_model(FLModel(params=[np.zeros(3)]))
    with pytest.raises(ValueError, match="has no params"):
        agg.accept_model(FLModel(params_type=ParamsType.DIFF, params={}))
    assert agg.num_accepted == 1
    # The rejected models left no trace: the round aggregates exactly the accepted ones.
    agg.accept_model(flm(data["site-2"], "site-2"))
    out = agg.aggregate_model()
    keys = list(SHAPES)
    check_against(out.params, ref_mean([flat32(good, keys), flat32(data["site-2"], keys)]), good)
    assert out.meta["fedagg"]["clients"] == ["site-1", "site-2"]


def test_first_model_checks():
    agg = FedaggAggregator()
    with pytest.raises(TypeError, match=r"params\['step'\]: dtype int64 is not float.*exclude_vars"):
        agg.accept_model(flm({"w": np.ones(3, np.float32), "step": np.array([3])}, "a"))
    with pytest.raises(ValueError, match="no values to aggregate"):
        agg.accept_model(flm({"w": np.ones(0, np.float32)}, "a"))
    with pytest.raises(ValueError, match="no client model was accepted"):
        agg.aggregate_model()
    # exclude_vars leaves integer buffers (and anything else matched) out, as NVFlare's aggregators do.
    agg = FedaggAggregator(rule="mean", exclude_vars=r"num_batches|step")
    out = run(agg, [flm({"w": np.full(3, float(i), np.float32), "step": np.array([i]),
                         "bn.num_batches_tracked": np.array(i)}, f"c{i}") for i in range(3)])
    assert list(out.params) == ["w"]
    np.testing.assert_array_equal(out.params["w"], np.full(3, 1.0, np.float32))


def test_nonfinite_exclude_drops_and_reports():
    data = clients(5, seed=9)
    keys = list(SHAPES)
    agg = FedaggAggregator(rule="trimmed_mean", f=1, nonfinite="exclude")
    bad = {**data["site-1"], "conv.weight": np.full((4, 3, 3), np.inf, np.float32)}
    assert agg.accept_model(flm(bad, "site-1")) is False  # the first model: the layout starts over
    assert agg.num_accepted == 0
    for n in ["site-2", "site-3", "site-4", "site-5"]:
        assert agg.accept_model(flm(data[n], n)) is True
    with pytest.raises(ValueError, match="already contributed"):
        agg.accept_model(flm(data["site-1"], "site-1"))
    out = agg.aggregate_model()
    meta = out.meta["fedagg"]
    assert meta["excluded"] == ["site-1"] and meta["clients"] == ["site-2", "site-3", "site-4", "site-5"]
    check_against(out.params, ref_trimmed_mean([flat32(data[n], keys) for n in meta["clients"]], 1), data["site-2"])


def test_rule_precondition_names_the_round():
    agg = FedaggAggregator(rule="krum", f=1, nonfinite="exclude")
    for i in range(4):
        agg.accept_model(flm({"w": np.full(3, float(i), np.float32)}, f"c{i}"))
    agg.accept_model(flm({"w": np.full(3, np.nan, np.float32)}, "c9"))
    with pytest.raises(ValueError, match=r"krum over 4 accepted client model\(s\) \(1 excluded.*n > 2f \+ 2"):
        agg.aggregate_model()
    assert agg.num_accepted == 4  # a failed aggregation keeps the round


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(rule="nope"), ValueError, "unknown rule"),
    (dict(rule=3), TypeError, "rule must be a string"),
    (dict(rule="median", weighted=True), ValueError, "does not take per-update weights"),
    (dict(rule="mean", aggregation_weights={"a": 2.0}, weighted=False), ValueError, "weighted=True"),
    (dict(rule="mean", aggregation_weights={"a": -1.0}), ValueError, ">= 0"),
    (dict(rule="mean", nonfinite="drop"), ValueError, "nonfinite"),
    (dict(rule="trimmed_mean", params={"m": 2}), TypeError, "m is a parameter of multi_krum"),
    (dict(rule="centered_clipping", params={"center": [0.0]}), ValueError, "previous round"),
    (dict(rule="mean", clip_norm=-1.0), ValueError, "clip_norm"),
    (dict(rule="median", dp=dict(clip_norm=1.0, noise_multiplier=1.0), clip_norm=1.0), ValueError, "dp sets"),
    (dict(rule="mean", dp=dict(clip_norm=1.0, noise_multiplier=1.0)), ValueError, "expected_participants"),
    (dict(rule="mean", dp=dict(clip_norm=1.0, noise_multiplier=1.0, expected_participants=3), weighted=True),
     ValueError, "weighted=False"),
    (dict(rule="mean", dp="yes"), TypeError, "CentralDP"),
    (dict(rule="mean", expected_clients=0), ValueError, "expected_clients"),
    (dict(rule="krum", f=-1), ValueError, "f must be >= 0"),
    (dict(rule="mean", f=2), ValueError, "does not use f"),
])
def test_constructor_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FedaggAggregator(**kwargs)


# ------------------------------------------------------------------ API: rounds, state, DP, metrics
def test_rounds_reuse_the_buffer_and_results_do_not_alias_it():
    agg = FedaggAggregator(rule="mean", expected_clients=3)
    r1 = run(agg, [flm({"w": np.full(4, float(i), np.float32)}, f"c{i}") for i in range(3)])
    storage = agg._storage
    assert storage.size == 3 * 4
    r1_copy = r1.params["w"].copy()
    r2 = run(agg, [flm({"w": np.full(4, 10.0 + i, np.float32)}, f"c{i}") for i in range(3)])
    assert agg._storage is storage  # the same memory, no reallocation
    np.testing.assert_array_equal(r1.params["w"], r1_copy)
    np.testing.assert_array_equal(r2.params["w"], np.full(4, 11.0, np.float32))
    # aggregate_model cleared the round; reset_stats clears one in progress; a new layout is allowed.
    with pytest.raises(ValueError, match="no client model"):
        agg.aggregate_model()
    agg.accept_model(flm({"w": np.zeros(4, np.float32)}, "c0"))
    agg.reset_stats()
    assert agg.num_accepted == 0
    r3 = run(agg, [flm({"v": np.full(6, float(i), np.float64)}, f"c{i}") for i in range(5)])
    assert r3.params["v"].dtype == np.float64 and r3.params["v"].tolist() == [2.0] * 6


def test_metrics_are_averaged_with_fedavg_weights():
    models = [flm({"w": np.ones(2, np.float32)}, f"c{i}", steps=s, metrics={"acc": a, "note": "x", "ok": b})
              for i, (s, a, b) in enumerate([(1, 0.5, True), (3, 0.9, False)])]
    out = run(FedaggAggregator(rule="median"), models)
    assert out.metrics == pytest.approx({"acc": (0.5 + 3 * 0.9) / 4, "ok": 0.25})


def test_centered_clipping_starts_from_the_previous_result():
    data = [clients(5, seed=s, shapes={"w": ((20,), np.float32)}) for s in (1, 2)]
    agg = FedaggAggregator(rule="centered_clipping", f=1, params={"tau": 0.5, "iterations": 2})
    r1 = run(agg, [flm(p, n) for n, p in data[0].items()])
    r2 = run(agg, [flm(p, n) for n, p in data[1].items()])
    X1 = np.stack([data[0][n]["w"] for n in sorted(data[0])])
    X2 = np.stack([data[1][n]["w"] for n in sorted(data[1])])
    p1 = fedagg.aggregate(X1, "centered_clipping", 1, tau=0.5, iterations=2)
    np.testing.assert_array_equal(r1.params["w"], p1)
    np.testing.assert_array_equal(r2.params["w"], fedagg.aggregate(X2, "centered_clipping", 1, tau=0.5,
                                                                   iterations=2, center=p1))


def test_central_dp_as_object_or_dict():
    data = clients(4, seed=12)
    keys = list(SHAPES)
    X = np.stack([flat32(data[n], keys) for n in sorted(data)]).astype(np.float32)
    args = dict(clip_norm=2.0, noise_multiplier=0.8, expected_participants=4, seed=1234)
    for dp in (privacy.CentralDP(**args), dict(args)):
        agg = FedaggAggregator(rule="trimmed_mean", f=1, dp=dp)
        with pytest.raises(ValueError, match="need params_type DIFF"):
            agg.accept_model(flm(data["site-1"], "site-1", params_type=ParamsType.FULL))
        outs = [run(agg, [flm(p, n) for n, p in data.items()]) for _ in range(2)]
        plain_dp = privacy.CentralDP(**args)
        for rnd, out in enumerate(outs):
            plain = fedagg.aggregate(X, "trimmed_mean", 1, dp=plain_dp)
            assert_params_equal(out.params, plain, data["site-1"])
            rec = out.meta["fedagg"]["privacy"]
            assert rec["round"] == rnd and rec["clip_norm"] == 2.0 and rec["sensitivity"] == 4.0
            assert math.isfinite(rec["epsilon"]) and rec["epsilon"] > 0
        assert outs[1].meta["fedagg"]["privacy"]["epsilon"] > outs[0].meta["fedagg"]["privacy"]["epsilon"]
        json.dumps(outs[1].meta)  # plain Python values: the meta travels through FOBS and logs


def test_dp_mean_uses_the_fixed_denominator():
    data = clients(3, seed=13)
    keys = list(SHAPES)
    # No clipping (the norms are ~8) and noise of std 1e-6 * 100 / 6: the fixed denominator shows.
    args = dict(clip_norm=100.0, noise_multiplier=1e-6, expected_participants=6, seed=5, accountant="rdp")
    out = run(FedaggAggregator(rule="mean", dp=args), [flm(p, n, steps=50) for n, p in data.items()])
    ref = unflat(ref_mean([flat32(data[n], keys) for n in sorted(data)]) * 3 / 6, data["site-1"])  # sum / m
    for k in keys:
        np.testing.assert_allclose(f64(out.params[k]), ref[k], rtol=1e-3, atol=1e-3)
    assert out.meta["fedagg"]["weights"] is None or len(set(out.meta["fedagg"]["weights"])) == 1  # unweighted


# ------------------------------------------------------------------ NVFlare job config and simulator
def test_job_export_round_trips_the_arguments(tmp_path):
    from nvflare.app_common.workflows.fedavg import FedAvg
    from nvflare.job_config.api import FedJob

    agg = FedaggAggregator(rule="trimmed_mean", f=1, nonfinite="exclude", exclude_vars="step",
                           dp=dict(clip_norm=1.0, noise_multiplier=1.0), params={"beta": None},
                           expected_clients=4)
    job = FedJob(name="cfg", min_clients=4)
    job.set_app_packages(["fedagg"])
    job.to_server(FedAvg(num_clients=4, num_rounds=1, model={"w": [0.0, 0.0]}, aggregator=agg, persistor_id=""))
    job.export_job(str(tmp_path))
    with open(tmp_path / "cfg" / "app_server" / "config" / "config_fed_server.json") as fh:
        cfg = json.load(fh)["workflows"][0]["args"]["aggregator"]
    assert cfg["path"] == "fedagg.integrations.nvflare.FedaggAggregator"
    assert cfg["args"] == {"rule": "trimmed_mean", "f": 1, "nonfinite": "exclude", "exclude_vars": "step",
                           "dp": {"clip_norm": 1.0, "noise_multiplier": 1.0}, "params": {"beta": None},
                           "expected_clients": 4}
    rebuilt = FedaggAggregator(**cfg["args"])
    assert rebuilt._dp.clip_norm == 1.0 and rebuilt.nonfinite == "exclude"
    custom = tmp_path / "cfg" / "app_server" / "custom"
    assert not custom.exists() or not any(custom.rglob("*.py"))  # fedagg is imported, not copied


# The client side of the simulated job: a standalone module (NVFlare copies it into the job).
# Every update is a deterministic function of (site, round, global model), so the test can
# replay the rounds plainly. site-4 is Byzantine: huge updates in round 0, NaN in round 1.
SIM_MODULE = "fedagg_nvflare_sim_site"
SIM_SOURCE = textwrap.dedent('''
    import numpy as np
    from nvflare.apis.executor import Executor
    from nvflare.apis.fl_constant import FLMetaKey
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.utils.fl_model_utils import FLModelUtils

    SITES = ("site-1", "site-2", "site-3", "site-4")
    DTYPES = {"w": np.float32, "b": np.float64}


    def client_update(site, rnd, model, params_type):
        """(params, steps, metrics) of `site` in round `rnd` from the global `model`."""
        i = SITES.index(site)
        rng = np.random.default_rng([i, rnd, 7])
        params = {}
        for key, dtype in DTYPES.items():
            base = np.asarray(model[key]).astype(dtype)
            delta = (0.1 * rng.normal(size=base.shape) + 0.01 * (i + 1)).astype(dtype)
            if site == "site-4":
                delta = np.full(base.shape, np.nan if rnd == 1 else -1000.0, dtype)
            params[key] = delta if params_type == ParamsType.DIFF else base + delta
        return params, 10 * (i + 1), {"loss": float(i + rnd)}


    class SyntheticTrainer(Executor):
        """Answers task "train_full" with FULL params and "train_diff" with DIFF params."""

        def execute(self, task_name, shareable, fl_ctx, abort_signal):
            model = FLModelUtils.from_shareable(shareable)
            params_type = ParamsType.DIFF if task_name.endswith("diff") else ParamsType.FULL
            params, steps, metrics = client_update(fl_ctx.get_identity_name(), model.current_round,
                                                   model.params, params_type)
            return FLModelUtils.to_shareable(FLModel(params_type=params_type, params=params, metrics=metrics,
                                                     meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: steps}))
''')
SIM_ROUNDS = 2
SIM_TIMEOUT_S = 120
INITIAL = {"w": [[0.5, -1.0, 2.0], [0.0, 1.5, -0.5]], "b": [0.25, -0.75]}


def replay(client_update, rule, f, params_type, weighted):
    """The rounds computed plainly: client updates -> fedagg.aggregate -> the global model."""
    model = {k: np.asarray(v) for k, v in INITIAL.items()}
    for rnd in range(SIM_ROUNDS):
        updates = {s: client_update(s, rnd, model, params_type) for s in ("site-1", "site-2", "site-3", "site-4")}
        names = sorted(n for n, (p, _, _) in updates.items() if all(np.isfinite(v).all() for v in p.values()))
        X = np.stack([np.concatenate([np.asarray(updates[n][0][k], np.float32).reshape(-1) for k in INITIAL])
                      for n in names])
        w = np.array([float(updates[n][1]) for n in names]) if weighted else None
        agg = unflat(fedagg.aggregate(X, rule, f, weights=w), updates[names[0]][0])
        agg = {k: v.astype(updates[names[0]][0][k].dtype) for k, v in agg.items()}
        if params_type == ParamsType.DIFF:  # FLModelUtils.update_model: model + update
            model = {k: model[k] + agg[k] for k in model}
        else:
            model = agg
        # float64 check of the rule itself on the same float32 values
        ref = ref_mean(X, w) if rule == "mean" else ref_trimmed_mean(X, f)
        np.testing.assert_allclose(np.concatenate([f64(agg[k]).reshape(-1) for k in INITIAL]), ref,
                                   rtol=1e-6, atol=1e-6)
    return model, names, X


@pytest.mark.slow
def test_simulator_job_with_a_byzantine_client(tmp_path, monkeypatch):
    from nvflare.app_common.workflows.fedavg import FedAvg
    from nvflare.fuel.utils import fobs
    from nvflare.job_config.api import FedJob

    (tmp_path / f"{SIM_MODULE}.py").write_text(SIM_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, SIM_MODULE, raising=False)
    import importlib

    site = importlib.import_module(SIM_MODULE)
    try:
        job = FedJob(name="fedagg_sim", min_clients=4)
        job.set_app_packages(["fedagg"])
        # Workflow 1: FULL models, trimmed mean (f=1), NaN models excluded and reported.
        job.to_server(FedAvg(num_clients=4, num_rounds=SIM_ROUNDS, model=INITIAL, persistor_id="",
                             save_filename="full.fobs", task_name="train_full",
                             aggregator=FedaggAggregator(rule="trimmed_mean", f=1, nonfinite="exclude",
                                                         expected_clients=4)), id="robust")
        # Workflow 2: DIFF updates, FedAvg's weighted mean; a NaN model is refused (raise) and
        # NVFlare leaves that client out of the round.
        job.to_server(FedAvg(num_clients=4, num_rounds=SIM_ROUNDS, model=INITIAL, persistor_id="",
                             save_filename="diff.fobs", task_name="train_diff",
                             aggregator=FedaggAggregator(rule="mean")), id="fedavg")
        job.to_clients(site.SyntheticTrainer())
        jobs, ws = tmp_path / "jobs", tmp_path / "ws"
        job.export_job(str(jobs))
        assert (jobs / "fedagg_sim" / "app" / "custom" / f"{SIM_MODULE}.py").exists()
        assert not (jobs / "fedagg_sim" / "app" / "custom" / "fedagg").exists()

        cmd = [sys.executable, "-m", "nvflare.private.fed.app.simulator.simulator", str(jobs / "fedagg_sim"),
               "-w", str(ws), "-c", "site-1,site-2,site-3,site-4", "-t", "4"]
        t0 = time.monotonic()
        with open(tmp_path / "simulator.log", "wb") as log:
            proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = proc.wait(timeout=SIM_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                rc = None
            finally:  # the simulator's client processes share its process group: end them all
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
        output = (tmp_path / "simulator.log").read_text(errors="replace")
        assert rc is not None, f"simulator ran past {SIM_TIMEOUT_S} s:\n{output[-4000:]}"
        assert rc == 0, f"simulator exit code {rc}:\n{output[-4000:]}"
        print(f"NVFlare simulator: {elapsed:.1f} s")

        run_dir = ws / "server" / "simulate_job"
        for fname, rule, f, params_type, weighted in [("full.fobs", "trimmed_mean", 1, ParamsType.FULL, False),
                                                      ("diff.fobs", "mean", 0, ParamsType.DIFF, True)]:
            saved = fobs.loadf(str(run_dir / fname))
            expected, last_names, X = replay(site.client_update, rule, f, params_type, weighted)
            assert list(saved.params) == ["w", "b"]
            for k in expected:  # bit for bit, dtype included
                assert saved.params[k].dtype == expected[k].dtype, (fname, k)
                np.testing.assert_array_equal(saved.params[k], expected[k], err_msg=f"{fname}:{k}")
            meta = saved.meta["fedagg"]
            assert meta["rule"] == rule and meta["clients"] == last_names == ["site-1", "site-2", "site-3"]
            assert meta["excluded"] == (["site-4"] if rule == "trimmed_mean" else [])
            steps = np.array([10.0, 20.0, 30.0])
            assert saved.metrics == pytest.approx({"loss": float(np.dot(steps, [1, 2, 3]) / steps.sum())})
        # The robust run kept the Byzantine client's -1000 out; the weighted mean took it in round 0.
        robust = fobs.loadf(str(run_dir / "full.fobs")).params["w"]
        fedavg = fobs.loadf(str(run_dir / "diff.fobs")).params["w"]
        assert np.abs(robust - np.asarray(INITIAL["w"])).max() < 1.0
        assert (fedavg - np.asarray(INITIAL["w"])).max() < -100.0
        server_log = (ws / "server" / "log.txt").read_text(errors="replace")
        assert "client 'site-4': params['w'] contains NaN or Inf" in server_log
    finally:
        sys.modules.pop(SIM_MODULE, None)
