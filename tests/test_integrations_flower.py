"""fedagg.integrations.flower: Flower strategies aggregating with fedagg.

The real run starts a Flower deployment on 127.0.0.1 (one ``flower-superlink``,
five ``flower-supernode`` processes, ``flwr run`` of a Flower App written to a
temporary folder): Flower's own processes run the ServerApp and the ClientApps
and carry the messages; nothing of Flower is mocked. Two of the five clients
are Byzantine. The ServerApp saves what it aggregated, and the tests recompute
the same round with plain ``fedagg.aggregate`` from the clients' deterministic
updates and compare bit for bit. The other tests call ``aggregate_train``
directly with reply ``Message``s built as Flower delivers them.
"""

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import numpy as np
import pytest

import fedagg
import reference
from fedagg import compress

with warnings.catch_warnings():
    # flwr 1.42 imports typer, which imports names that click >= 8.2 deprecates
    # (click.utils.get_binary_stream, ...): a DeprecationWarning at import time only.
    warnings.filterwarnings("ignore", message=r"'click\.", category=DeprecationWarning)
    if not os.environ.get("FEDAGG_REQUIRE_FLOWER"):  # CI sets it: there, no Flower is a failure
        pytest.importorskip("flwr")
    from flwr.app import Array, ArrayRecord, ConfigRecord, Metadata, Message, MetricRecord, RecordDict
    from flwr.serverapp.strategy import (
        Bulyan,
        DifferentialPrivacyServerSideFixedClipping,
        FedMedian,
        FedTrimmedAvg,
        Krum,
        MultiKrum,
    )
    from flwr.serverapp.strategy.multikrum import select_multikrum
    from flwr.supercore.differential_privacy import compute_clip_model_update

    from fedagg.integrations import flower as ff


# ------------------------------------------------------------------ helpers
def record(arrays):
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


def reply(node, arrays, num_examples=10, **metrics):
    """A train reply as the ServerApp receives it from node `node`."""
    md = Metadata(run_id=1, message_id=f"m{node}", src_node_id=node, dst_node_id=0, reply_to_message_id="i",
                  group_id="1", created_at=time.time(), ttl=600.0, message_type="train")
    content = RecordDict({
        "arrays": arrays if isinstance(arrays, ArrayRecord) else record(arrays),
        "metrics": MetricRecord({"num-examples": num_examples, **metrics}),
    })
    return Message(content, metadata=md)


def model(seed=0, scale=1.0, offset=0.0):
    rng = np.random.default_rng(seed)
    return {"w": (offset + scale * rng.normal(size=(4, 3))).astype(np.float32),
            "b": (offset + scale * rng.normal(size=3)).astype(np.float32)}


def flat(arrays, keys=("w", "b")):
    if isinstance(arrays, ArrayRecord):
        arrays = {k: v.numpy() for k, v in arrays.items()}
    return np.concatenate([np.asarray(arrays[k], dtype=np.float32).ravel() for k in keys])


def strategy(rule="mean", f=0, global_arrays=None, **kw):
    s = ff.FedaggStrategy(rule, f, **kw)
    s.set_global_arrays(record(global_arrays if global_arrays is not None else model(0)))
    return s


# ----------------------------------------------------------- arrays <-> vectors
def test_arrays_are_read_as_views_of_the_message_bytes():
    arrays = record({"a": np.arange(6, dtype=np.float32).reshape(2, 3)})
    view = ff._npy_view(arrays["a"], "a")
    assert not view.flags.writeable and not view.flags.owndata
    assert view.base is not None and np.array_equal(view, np.arange(6).reshape(2, 3))
    buf = np.frombuffer(arrays["a"].data, dtype=np.uint8)
    assert np.shares_memory(view, buf)  # the very bytes of the Array


def test_vector_roundtrip_keeps_keys_shapes_dtypes_and_fortran_order():
    arrays = {"f": np.asfortranarray(np.arange(6, dtype=np.float64).reshape(2, 3)),
              "h": np.array([1.5, -2.0], dtype=np.float16), "s": np.float32(3.0).reshape(())}
    rec = record(arrays)
    layout = ff.Layout.of(rec)
    assert layout.keys == ("f", "h", "s") and layout.d == 9
    v = ff.arrays_to_vector(rec, layout=layout)
    assert v.dtype == np.float32 and v.tolist() == [0, 1, 2, 3, 4, 5, 1.5, -2.0, 3.0]
    back = ff.vector_to_arrays(v, layout)
    for k, a in arrays.items():
        got = back[k].numpy()
        assert got.dtype == a.dtype and got.shape == a.shape and np.array_equal(got, a)


def test_payload_roundtrip_through_an_arrayrecord():
    x = np.random.default_rng(1).normal(size=50).astype(np.float32)
    codec = compress.TopK(k=7)
    payload = codec.encode(x, codec.state(50))
    rec = ff.payload_to_arrays(payload)
    assert ff.is_payload(rec) and not ff.is_payload(record({"a": x}))
    assert all(a.stype == ff.PAYLOAD_STYPE for a in rec.values())
    back = ff.arrays_to_payload(rec)
    assert np.array_equal(compress.decode(back), compress.decode(payload))
    broken = ArrayRecord(dict(rec.items()))
    del broken["fedagg.payload.0"]
    with pytest.raises(compress.PayloadError, match="keys"):
        ff.arrays_to_payload(broken)


# ---------------------------------------------------------------- aggregation
def test_aggregate_train_equals_fedagg_on_deltas_with_weights():
    g = model(0)
    clients = [model(10 + i, 0.1, 0.0) for i in range(5)]
    ws = [{k: g[k] + c[k] for k in g} for c in clients]
    s = strategy("multi_krum", 1, g, rule_params={"m": 3})
    arrays, metrics = s.aggregate_train(1, [reply(100 + i, w, 10 * (i + 1), loss=float(i)) for i, w in enumerate(ws)])
    gv = flat(g)
    W = np.stack([flat(w) for w in ws])
    want, info = fedagg.multi_krum(W - gv, 1, m=3, weights=[10, 20, 30, 40, 50], return_info=True)
    assert np.array_equal(flat(arrays), gv + want)
    assert [arrays[k].numpy().shape for k in ("w", "b")] == [(4, 3), (3,)]
    assert metrics["fedagg-selected-nodes"] == [100 + int(i) for i in info.selected]
    assert metrics["fedagg-n"] == 5 and metrics["fedagg-dropped-nodes"] == []
    sel = [int(i) for i in info.selected]  # client metrics: weighted over the selected replies only
    assert metrics["loss"] == pytest.approx(sum(10 * (i + 1) * i for i in sel) / sum(10 * (i + 1) for i in sel))
    assert s.last_report.node_ids == [100, 101, 102, 103, 104]


def test_reply_order_does_not_matter_and_a_node_replies_once():
    g = model(0)
    msgs = [reply(7 - i, model(i + 1)) for i in range(6)]
    a, _ = strategy("geometric_median", 1, g).aggregate_train(1, msgs)
    b, _ = strategy("geometric_median", 1, g).aggregate_train(1, msgs[::-1])
    assert np.array_equal(flat(a), flat(b))
    with pytest.raises(ValueError, match="node 3: a second reply"):
        strategy("median", 1, g).aggregate_train(1, msgs + [reply(3, model(9))])


def test_weights_mode_and_translation_invariant_rules_agree():
    g = model(0, offset=3.0)
    ws = [model(20 + i, 0.2, 3.0) for i in range(6)]
    for rule, f in (("median", 2), ("trimmed_mean", 1), ("krum", 1), ("geometric_median", 1)):
        a, _ = strategy(rule, f, g).aggregate_train(1, [reply(i + 1, w) for i, w in enumerate(ws)])
        b, _ = strategy(rule, f, g, aggregate_on="weights").aggregate_train(
            1, [reply(i + 1, w) for i, w in enumerate(ws)])
        assert np.array_equal(flat(b), fedagg.aggregate(np.stack([flat(w) for w in ws]), rule, f,
                                                        **({"weights": [10] * 6} if rule == "geometric_median" else {})))
        np.testing.assert_allclose(flat(a), flat(b), rtol=0, atol=2e-5, err_msg=rule)


def test_compressed_and_dense_replies_mix():
    g = model(0)
    gv = flat(g)
    deltas = [np.random.default_rng(30 + i).normal(size=gv.size).astype(np.float32) * 0.1 for i in range(5)]
    msgs, rows = [], []
    for i, dx in enumerate(deltas):
        if i % 2 == 0:
            codec = compress.Uniform(bits=8)
            p = codec.encode(dx, codec.state(gv.size), seed=i)
            msgs.append(reply(i + 1, ff.payload_to_arrays(p)))
            rows.append(compress.decode(p))
        else:
            w = ff.vector_to_arrays(gv + dx, ff.Layout.of(record(g)))
            msgs.append(reply(i + 1, w))
            rows.append((gv + dx) - gv)
    s = strategy("median", 1, g)
    arrays, _ = s.aggregate_train(1, msgs)
    assert s.last_report.compressed == [True, False, True, False, True]
    assert np.array_equal(flat(arrays), gv + fedagg.median(np.stack(rows), 1))


def test_fedagg_central_dp_is_reproducible_with_a_seed():
    pytest.importorskip("dp_accounting")
    from fedagg import privacy

    g = model(0)
    ws = [{k: g[k] + 0.1 * v for k, v in model(40 + i).items()} for i in range(5)]
    kw = dict(clip_norm=0.5, noise_multiplier=1.0, delta=1e-5, seed=1234)
    s = strategy("median", 1, g, dp=privacy.CentralDP(**kw))
    arrays, metrics = s.aggregate_train(1, [reply(i + 1, w) for i, w in enumerate(ws)])
    gv = flat(g)
    W = np.stack([flat(w) for w in ws])
    want = fedagg.aggregate(W - gv, "median", 1, dp=privacy.CentralDP(**kw))
    assert np.array_equal(flat(arrays), gv + want)
    assert metrics["fedagg-epsilon"] > 0


def test_composes_with_flowers_server_side_dp_wrapper():
    d = 4000  # enough coordinates to measure the noise
    g = {"w": np.random.default_rng(0).normal(size=d).astype(np.float32)}
    gv = g["w"]
    ws = [{"w": gv + np.random.default_rng(50 + i).normal(size=d).astype(np.float32)} for i in range(5)]
    ws[4] = {"w": gv + np.full(d, 1e4, np.float32)}  # Byzantine

    def run(noise):
        inner = ff.FedaggStrategy("median", 1)
        dp = DifferentialPrivacyServerSideFixedClipping(inner, noise_multiplier=noise, clipping_norm=2.0,
                                                       num_sampled_clients=5)
        dp.current_arrays = record(g)  # what dp.configure_train sets, and passes on to inner's
        inner.set_global_arrays(dp.current_arrays)
        arrays, _ = dp.aggregate_train(1, [reply(i + 1, w) for i, w in enumerate(ws)])
        return arrays["w"].numpy()

    # Flower clips each update to norm 2 (relative to the global), fedagg takes the median.
    clipped = []
    for w in ws:
        nd = [w["w"].copy()]
        compute_clip_model_update(nd, [gv], 2.0)
        clipped.append(nd[0] - gv)
    exact = gv + fedagg.median(np.stack(clipped), 1)
    assert np.array_equal(run(0.0), exact)
    noise = run(3.0) - exact
    assert np.std(noise) == pytest.approx(3.0 * 2.0 / 5, rel=0.05)  # Flower's std: z C / m


# ----------------------------------------------------------------- validation
def test_validation_errors():
    g = model(0)
    with pytest.raises(ValueError, match="unknown rule"):
        ff.FedaggStrategy("average")
    with pytest.raises(TypeError, match="f must be an integer"):
        ff.FedaggStrategy("krum", 1.5)
    with pytest.raises(ValueError, match="needs at least 7 replies"):
        ff.FedaggStrategy("bulyan", 1, min_train_nodes=5)
    assert ff.FedaggStrategy("krum", 2).min_train_nodes == 7
    with pytest.raises(ValueError, match="does not use f"):  # at construction, not at the first round
        ff.FedaggStrategy("mean", 2)
    with pytest.raises(ValueError, match="does not take per-update weights"):
        ff.FedaggStrategy("median", weighted=True)
    with pytest.raises(ValueError, match="clip_norm must be a finite number > 0"):
        ff.FedaggStrategy("median", clip_norm=-1.0)
    with pytest.raises(ValueError, match="acts on updates"):
        ff.FedaggStrategy("mean", aggregate_on="weights", clip_norm=1.0)
    with pytest.raises(RuntimeError, match="no global model"):
        ff.FedaggStrategy("mean").aggregate_train(1, [reply(1, g)])
    with pytest.raises(TypeError, match="not floating point"):
        strategy("mean", 0, {**g, "steps": np.array([3], dtype=np.int64)})

    ok = [reply(i + 1, model(i + 1)) for i in range(4)]
    cases = [
        ({"w": g["w"]}, ValueError, "keys differ"),
        ({"w": g["w"], "b": np.zeros(4, np.float32)}, ValueError, r"shape \(4,\)"),
        ({"w": g["w"], "b": np.zeros(3, np.int32)}, TypeError, "expected floating point"),
    ]
    for arrays, exc, match in cases:
        with pytest.raises(exc, match=f"reply from node 99: .*{match}"):
            strategy("median", 1, g).aggregate_train(1, ok + [reply(99, arrays)])
    bad_weight = reply(99, model(9), num_examples=-3)
    with pytest.raises(ValueError, match="num-examples"):
        strategy("mean", 0, g).aggregate_train(1, ok + [bad_weight])
    nan = {**model(9), "b": np.array([0, np.nan, 0], np.float32)}
    with pytest.raises(ValueError, match=r"updates \[4\] contain NaN.*node_ids = \[1, 2, 3, 4, 99\]"):
        strategy("median", 1, g).aggregate_train(1, ok + [reply(99, nan)])
    with pytest.raises(ValueError, match="4 usable replies, krum with f = 1 needs at least 5"):
        strategy("krum", 1, g).aggregate_train(1, ok)
    wrong_d = compress.TopK(k=2).encode(np.ones(7, np.float32), compress.TopK(k=2).state(7))
    with pytest.raises(ValueError, match="decodes to 7 values, the model has 15"):
        strategy("mean", 0, g).aggregate_train(1, ok + [reply(99, ff.payload_to_arrays(wrong_d))])


class _Grid:
    """Just what FedAvg.configure_train asks of a Grid: the connected node ids, over time."""

    def __init__(self, *counts):
        self.counts = list(counts)

    def get_node_ids(self):
        n = self.counts.pop(0) if len(self.counts) > 1 else self.counts[0]
        return list(range(1, n + 1))


def test_the_rules_minimum_of_nodes_is_logged_and_enforced(caplog, monkeypatch):
    # multi_krum with f = 2 needs n > 2f + 2: 7 nodes. With 6, Flower would wait for ever.
    with caplog.at_level(logging.INFO, logger="flwr"):
        s = ff.FedaggStrategy("multi_krum", 2, rule_params={"m": 6})
    assert s.min_nodes == fedagg.RULES["multi_krum"].min_n(2) == 7
    assert (s.min_train_nodes, s.min_available_nodes) == (7, 7)
    text = [r.getMessage() for r in caplog.records if r.name == "flwr"]
    assert any("multi_krum with f = 2 needs at least 7 replies per round (n > 2f + 2)" in t
               and "waits until 7 nodes are connected" in t for t in text), text

    for kw in ({"min_train_nodes": 6}, {"min_available_nodes": 6}):  # below the rule's minimum: refused
        name = next(iter(kw))
        with pytest.raises(ValueError, match=rf"multi_krum with f = 2 needs at least 7 replies.*{name} = 6 is below"):
            ff.FedaggStrategy("multi_krum", 2, **kw)
    assert ff.FedaggStrategy("bulyan", 1, min_available_nodes=9).min_available_nodes == 9
    assert ff.FedaggStrategy("median", 2, fraction_train=0.0, min_available_nodes=1).min_available_nodes == 1
    assert ff.FedaggStrategy("mean", 0, min_train_nodes=1).min_nodes == 1  # the mean takes one reply

    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_task_id", "_run_id", "_node_id"):  # what a ServerApp process has set when it builds Messages
        monkeypatch.setattr(TaskIdentity, key, 1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="flwr"):
        s.summary()
        # 6 nodes connected when round 1 is configured, a 7th joins while Flower waits
        messages = list(s.configure_train(1, record(model(0)), ConfigRecord(), _Grid(6, 6, 7)))
    assert len(messages) == 7
    text = [r.getMessage() for r in caplog.records if r.name == "flwr"]
    assert any("needs n > 2f + 2: at least 7 replies per round; waits for 7 connected nodes" in t for t in text)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("round 1: 6 nodes connected; multi_krum with f = 2 needs at least 7" in t
               and "waits until 7 nodes are connected" in t for t in warned), warned


def test_invalid_drop_and_nonfinite_exclude_are_reported():
    g = model(0)
    ok = [reply(i + 1, model(i + 1)) for i in range(5)]
    nan = {**model(9), "b": np.array([0, np.nan, 0], np.float32)}
    s = strategy("median", 1, g, invalid="drop", nonfinite="exclude")
    arrays, metrics = s.aggregate_train(1, ok + [reply(98, {"w": g["w"]}), reply(99, nan)])
    assert metrics["fedagg-dropped-nodes"] == [98] and "keys differ" in s.last_report.dropped[98]
    assert metrics["fedagg-excluded-nodes"] == [99] and metrics["fedagg-n"] == 6
    gv = flat(g)
    assert np.array_equal(flat(arrays), gv + fedagg.median(np.stack([flat(m.content["arrays"]) for m in ok]) - gv, 1))
    # too few left after dropping: the round is skipped, not failed
    arrays, metrics = strategy("krum", 1, g, invalid="drop").aggregate_train(
        1, ok[:4] + [reply(98, {"w": g["w"]})])
    assert arrays is None and metrics["fedagg-n"] == 4 and metrics["fedagg-dropped-nodes"] == [98]


def test_non_float_arrays_kept_from_the_global_model():
    g = {**model(0), "steps": np.array([7], dtype=np.int64)}
    ws = [{**model(i + 1), "steps": np.array([100 + i], dtype=np.int64)} for i in range(3)]
    arrays, _ = strategy("mean", 0, g, non_float="keep").aggregate_train(1, [reply(i + 1, w) for i, w in enumerate(ws)])
    assert arrays["steps"].numpy().tolist() == [7] and list(arrays.keys()) == ["w", "b", "steps"]


# ------------------------------------------------- Flower's robust strategies vs fedagg
def _both(flower_strategy, fedagg_strategy, ws, num_examples=None):
    ne = num_examples or [10] * len(ws)
    a, _ = flower_strategy.aggregate_train(1, [reply(i + 1, w, ne[i]) for i, w in enumerate(ws)])
    b, _ = fedagg_strategy.aggregate_train(1, [reply(i + 1, w, ne[i]) for i, w in enumerate(ws)])
    return (None if a is None else flat(a)), flat(b)


def test_compare_flower_krum_and_multikrum():
    g = model(0)
    ws = [model(60 + i, 0.1, 0.0) for i in range(6)] + [model(70, 50.0)]  # one Byzantine
    X = np.stack([flat(w) for w in ws])
    a, b = _both(Krum(num_malicious_nodes=1), strategy("krum", 1, g, aggregate_on="weights"), ws)
    assert np.array_equal(a, b) and np.array_equal(b, fedagg.krum(X, 1))  # same definition when n > 2f + 2
    ne = [5, 10, 15, 20, 25, 30, 35]
    a, b = _both(MultiKrum(num_malicious_nodes=1, num_nodes_to_select=6),
                 strategy("multi_krum", 1, g, aggregate_on="weights"), ws, ne)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)  # both weight by num-examples; float32 vs float64 sums
    # Flower's MultiKrum selects 1 by default (Krum); the paper's and fedagg's default m is n - f.
    assert MultiKrum(num_malicious_nodes=1).num_nodes_to_select == 1
    # n = 4, f = 1: Krum needs n > 2f + 2. Flower still scores with max(1, n - f - 2) neighbours.
    a, _ = Krum(num_malicious_nodes=1).aggregate_train(1, [reply(i + 1, w) for i, w in enumerate(ws[:4])])
    assert a is not None
    with pytest.raises(ValueError, match="needs at least 5"):
        strategy("krum", 1, g).aggregate_train(1, [reply(i + 1, w) for i, w in enumerate(ws[:4])])


def test_compare_flower_bulyan_selection_differs_from_the_paper():
    g = model(0)
    rng = np.random.default_rng(0)
    ws = [{"w": rng.normal(size=(4, 3)).astype(np.float32), "b": rng.normal(size=3).astype(np.float32)}
          for _ in range(7)]
    X = np.stack([flat(w) for w in ws])
    a, b = _both(Bulyan(num_malicious_nodes=1), strategy("bulyan", 1, g, aggregate_on="weights"), ws)
    _, info = fedagg.bulyan(X, 1, return_info=True)
    paper = sorted(int(i) for i in info.selected)  # iterated Krum (El Mhamdi et al. 2018)
    contents = [reply(i + 1, w).content for i, w in enumerate(ws)]
    chosen = select_multikrum(contents, 1, 5)  # Flower: one Multi-Krum pass, theta = n - 2f best scores
    flower = sorted(next(i for i, c in enumerate(contents) if c is s) for s in chosen)
    assert paper != flower  # the selections differ on this input ...
    # ... and each result is the paper's second step (beta = theta - 2f closest to the median) on its selection
    np.testing.assert_allclose(b, reference.bulyan_reduce(X[paper], 1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(a, reference.bulyan_reduce(X[flower], 1), rtol=1e-6, atol=1e-7)
    assert not np.allclose(a, b)


def test_compare_flower_trimmed_mean_and_median():
    g = model(0)
    ws = [model(80 + i, 0.1) for i in range(7)]
    X = np.stack([flat(w) for w in ws])
    # beta = 0.2 of n = 7 cuts floor(1.4) = 1 per side: fedagg's trimmed_mean with f = 1 (or beta = 0.2)
    a, b = _both(FedTrimmedAvg(beta=0.2), strategy("trimmed_mean", 1, g, aggregate_on="weights"), ws)
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert np.array_equal(b, fedagg.trimmed_mean(X, beta=0.2))
    # n = 4: Flower's default beta = 0.2 cuts floor(0.8) = 0 -- the plain mean, silently; f = 1 cuts one per side
    a, b = _both(FedTrimmedAvg(beta=0.2), strategy("trimmed_mean", 1, g, aggregate_on="weights"), ws[:4])
    np.testing.assert_allclose(a, X[:4].mean(axis=0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(b, reference.trimmed_mean(X[:4], 1), rtol=1e-6, atol=1e-7)
    assert not np.allclose(a, b)
    a, b = _both(FedMedian(), strategy("median", 0, g, aggregate_on="weights"), ws[:6])
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)  # same definition (even n: mean of the middle two)


# -------------------------------------------------------------- a real Flower run
COMMON = '''
import numpy as np

SHAPES = {"weight": ((4, 3), "float32"), "bias": ((3,), "float32"), "scale": ((2,), "float64")}
PHASES = ("multi_krum_mixed", "median_flower_dp")
CLIP = 0.5
COMPRESSED = (1, 3)  # in multi_krum_mixed these nodes send an 8-bit fedagg payload of their update


def initial_arrays():
    rng = np.random.default_rng(7)
    return {k: rng.normal(size=s).astype(t) for k, (s, t) in SHAPES.items()}


def client_delta(phase, pid, d):
    """Node pid's update in a phase: 3 honest nodes, a sign-flipper (3) and a huge one (4)."""
    base = np.random.default_rng([PHASES.index(phase), 99]).normal(size=d) * 0.1
    if pid == 3:
        return (-8.0 * base).astype(np.float32)
    if pid == 4:
        return np.full(d, 1e6, dtype=np.float32)
    noise = np.random.default_rng([PHASES.index(phase), pid]).normal(size=d) * 0.02
    return (base + noise).astype(np.float32)


def num_examples(pid):
    return 10 * (pid + 1)
'''

CLIENT_APP = '''
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedagg import compress
from fedagg.integrations.flower import Layout, arrays_to_vector, payload_to_arrays, vector_to_arrays

from .common import COMPRESSED, client_delta, num_examples

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    phase = str(msg.content["config"]["phase"])
    arrays = msg.content["arrays"]
    layout = Layout.of(arrays)
    g = arrays_to_vector(arrays, layout=layout)
    delta = client_delta(phase, pid, layout.d)
    if phase == "multi_krum_mixed" and pid in COMPRESSED:  # a fedagg payload in the ArrayRecord
        codec = compress.Uniform(bits=8)
        out = payload_to_arrays(codec.encode(delta, codec.state(layout.d), seed=pid))
    else:  # full model weights, as Flower clients send them
        out = vector_to_arrays(g + delta, layout)
    metrics = MetricRecord({"num-examples": num_examples(pid), "partition-id": pid})
    return Message(RecordDict({"arrays": out, "metrics": metrics}), reply_to=msg)
'''

SERVER_APP = '''
import json
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping

from fedagg.integrations.flower import FedaggStrategy

from .common import CLIP, initial_arrays


class Recorded(FedaggStrategy):
    """Saves which node (partition id) each aggregated update came from."""

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        pid = {m.metadata.src_node_id: int(m.content["metrics"]["partition-id"])
               for m in replies if not m.has_error()}
        self.record = {
            "order": [pid[n] for n in self.last_report.node_ids],
            "selected": [pid[n] for n in metrics.get("fedagg-selected-nodes", [])],
            "n": metrics["fedagg-n"],
            "compressed": [pid[n] for n, c in zip(self.last_report.node_ids, self.last_report.compressed) if c],
        }
        return arrays, metrics


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = Path(str(context.run_config["out-dir"]))
    arrays = ArrayRecord({k: Array(v) for k, v in initial_arrays().items()})
    nodes = dict(fraction_evaluate=0.0, min_train_nodes=5, min_available_nodes=5)
    phases = [
        ("multi_krum_mixed", Recorded("multi_krum", 1, rule_params={"m": 3}, **nodes), None),
        ("median_flower_dp", Recorded("median", 2, **nodes), CLIP),
    ]
    for name, strategy, clip in phases:
        runner = strategy if clip is None else DifferentialPrivacyServerSideFixedClipping(
            strategy, noise_multiplier=0.0, clipping_norm=clip, num_sampled_clients=5)
        np.savez(out / f"{name}-in.npz", **{k: v.numpy() for k, v in arrays.items()})
        result = runner.start(grid=grid, initial_arrays=arrays, num_rounds=1, timeout=60,
                              train_config=ConfigRecord({"phase": name}))
        arrays = result.arrays
        np.savez(out / f"{name}-out.npz", **{k: v.numpy() for k, v in arrays.items()})
        (out / f"{name}.json").write_text(json.dumps(strategy.record))
    (out / "done").write_text("ok")
'''

PYPROJECT = '''
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedaggflowertest"
version = "1.0.0"
description = "fedagg's Flower integration test app"
license = "Apache-2.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedagg"

[tool.flwr.app.components]
serverapp = "fedaggflowertest.server_app:app"
clientapp = "fedaggflowertest.client_app:app"

[tool.flwr.app.config]
out-dir = "{out}"
'''

N_NODES = 5
RUN_TIMEOUT = 120  # s, the whole `flwr run`; it takes ~15 s on 2 cores


def _common():
    ns = {}
    exec(COMMON, ns)
    return ns


def _free_ports(k):
    """`k` distinct free loopback ports (all held open while chosen: two calls in a row
    may otherwise return the same port, and a supernode that cannot bind exits)."""
    socks = [socket.socket() for _ in range(k)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _free_port():
    return _free_ports(1)[0]


def _descendants(pids):
    """Every process below `pids` (Linux /proc; Flower detaches some of its children)."""
    children = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], list(pids)
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def _subreaper(on):
    """Linux: adopt orphaned descendants (so that they can be reaped here, not left as zombies)."""
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl(36, int(on), 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


def _stop(procs):
    """Stop the processes started here and everything they started, by pid, and reap them."""
    below = _descendants([p.pid for p in procs])
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)  # started with start_new_session: pgid == pid
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=5)
    for pid in below:  # detached children (SuperExec, ServerApp) that outlived their parents
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    left, deadline = set(below), time.monotonic() + 5
    while left and time.monotonic() < deadline:  # orphans adopted by this process (_subreaper)
        for pid in list(left):
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    left.discard(pid)
            except ChildProcessError:  # not ours (no subreaper) or already reaped
                left.discard(pid)
        if left:
            time.sleep(0.05)


def _wait_http(port, proc, log, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"flower-superlink did not listen on {port} in {timeout} s:\n{log.read_text()[-3000:]}")


def _wait_nodes(n_nodes, nodes, respawn, superlink, log, timeout=60.0):
    """Wait until the SuperLink has activated `n_nodes` SuperNodes; a SuperNode that exited
    before then (a port taken between choosing and binding it) is started again, at most
    twice each. Raises with the logs when the nodes do not all arrive in `timeout` s."""
    deadline, restarts = time.monotonic() + timeout, [0] * n_nodes
    while time.monotonic() < deadline:
        if superlink.poll() is not None:
            raise RuntimeError(f"flower-superlink exited with {superlink.returncode}:\n{log.read_text()[-3000:]}")
        if log.read_text(errors="replace").count("Activated node_id") >= n_nodes:
            return
        for i, p in enumerate(nodes):
            if p.poll() is not None:
                if restarts[i] == 2:
                    raise RuntimeError(f"flower-supernode {i} exited three times (last: {p.returncode})")
                restarts[i] += 1
                nodes[i] = respawn(i)
        time.sleep(0.2)
    raise RuntimeError(f"the SuperLink activated fewer than {n_nodes} SuperNodes in {timeout} s:\n"
                       f"{log.read_text(errors='replace')[-3000:]}")


def run_flower_app(root, app, n_nodes, done, run_config=None, timeout=RUN_TIMEOUT):
    """Deploy Flower on 127.0.0.1 and `flwr run` the Flower App in folder `app`.

    One ``flower-superlink --disable-runtime-dependency-installation`` (it runs the
    installed fedagg, it does not fetch the app's dependencies), `n_nodes`
    ``flower-supernode`` processes with ``partition-id=i num-partitions=n_nodes``,
    and ``flwr run <app> loopback --stream`` with FLWR_HOME in `root` (logs in
    `root`/logs). Fails the test unless the path `done` exists afterwards; every
    process started here, and everything they started, is stopped. Returns
    ``{"seconds": ..., "log": flwr run's output}``.
    """
    home, logs = root / "flwr-home", root / "logs"
    for p in (home, logs):
        p.mkdir()
    link = _free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\ninsecure = true\n')
    env = dict(os.environ)
    env.update(FLWR_HOME=str(home), FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0",
               PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    bindir = os.path.dirname(sys.executable)

    def spawn(args, name):
        fh = open(logs / f"{name}.log", "ab")  # a restarted node appends to its log
        try:
            return subprocess.Popen([os.path.join(bindir, args[0]), *args[1:]], stdout=fh,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=root, start_new_session=True)
        finally:
            fh.close()

    def tails():
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}" for p in sorted(logs.iterdir()))

    procs = []
    t0 = time.monotonic()
    adopted = _subreaper(True)
    try:
        procs.append(spawn(["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(link),
                            "--disable-runtime-dependency-installation"], "superlink"))
        ports = _free_ports(n_nodes)

        def node(i):
            return spawn(["flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                          "--host", "127.0.0.1", "--port", str(ports[i]),
                          "--node-config", f"partition-id={i} num-partitions={n_nodes}"], f"node{i}")

        def respawn(i):
            ports[i] = _free_port()
            procs.append(node(i))  # every process started here is stopped at the end
            return procs[-1]

        nodes = [node(i) for i in range(n_nodes)]
        procs.extend(nodes)
        _wait_http(link, procs[0], logs / "superlink.log")
        try:
            _wait_nodes(n_nodes, nodes, respawn, procs[0], logs / "superlink.log")
        except RuntimeError as e:
            pytest.fail(f"{e}\n{tails()}")
        cmd = [os.path.join(bindir, "flwr"), "run", str(app), "loopback", "--stream"]
        for key, value in (run_config or {}).items():
            cmd += ["--run-config", f"{key}={json.dumps(value)}"]  # JSON strings and numbers are TOML values
        try:
            run = subprocess.run(cmd, env=env, cwd=root, stdin=subprocess.DEVNULL, capture_output=True,
                                 timeout=timeout)
        except subprocess.TimeoutExpired as e:
            text = (e.stdout or b"").decode(errors="replace")
            pytest.fail(f"`flwr run` did not finish in {timeout} s:\n{text[-6000:]}\n{tails()}")
        text = run.stdout.decode(errors="replace") + run.stderr.decode(errors="replace")
        if not done.exists():
            pytest.fail(f"the Flower run did not finish (flwr run exited {run.returncode}):\n{text[-6000:]}\n{tails()}")
    finally:
        _stop(procs)
        if adopted:
            _subreaper(False)
    return {"seconds": time.monotonic() - t0, "log": text}


@pytest.fixture(scope="module")
def flower_run(tmp_path_factory):
    """One real Flower deployment run on loopback; returns the ServerApp's output folder."""
    root = tmp_path_factory.mktemp("flower")
    out = root / "out"
    out.mkdir()
    app = root / "app"
    (app / "fedaggflowertest").mkdir(parents=True)
    (app / "pyproject.toml").write_text(PYPROJECT.replace("{out}", str(out)))
    for name, text in (("__init__", ""), ("common", COMMON), ("client_app", CLIENT_APP),
                       ("server_app", SERVER_APP)):
        (app / "fedaggflowertest" / f"{name}.py").write_text(textwrap.dedent(text))
    return {"out": out, **run_flower_app(root, app, N_NODES, done=out / "done")}


def _load(path):
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _expected(phase, g_arrays, order, ns):
    """g + fedagg.aggregate(updates) computed plainly from the clients' deterministic updates."""
    keys = list(ns["SHAPES"])
    g32 = {k: g_arrays[k].astype(np.float32) for k in keys}
    gv = np.concatenate([g32[k].ravel() for k in keys])
    d = gv.size
    sizes = np.cumsum([0] + [g32[k].size for k in keys])

    def weights_of(pid):  # what the client sends: its float32 model, in the global's dtypes
        v = gv + ns["client_delta"](phase, pid, d)
        return {k: v[sizes[j]:sizes[j + 1]].reshape(g32[k].shape).astype(g_arrays[k].dtype)
                for j, k in enumerate(keys)}

    def delta_of(w):  # w - g per array, in float64, rounded once to float32 (as the strategy decodes)
        return np.concatenate([(w[k].astype(np.float64) - g32[k].astype(np.float64)).astype(np.float32).ravel()
                               for k in keys])

    if phase == "multi_krum_mixed":
        rows = []
        for p in order:
            if p in ns["COMPRESSED"]:
                codec = compress.Uniform(bits=8)
                rows.append(compress.decode(codec.encode(ns["client_delta"](phase, p, d), codec.state(d), seed=p)))
            else:
                rows.append(delta_of(weights_of(p)))
        agg = fedagg.aggregate(np.stack(rows), "multi_krum", 1, m=3, weights=[ns["num_examples"](p) for p in order])
    else:
        rows = []
        for p in order:
            w = weights_of(p)
            nd = [w[k] for k in keys]
            compute_clip_model_update(nd, [g_arrays[k] for k in keys], ns["CLIP"])  # Flower's own clipping
            rows.append(delta_of(dict(zip(keys, nd))))
        agg = fedagg.aggregate(np.stack(rows), "median", 2)
    v = gv + agg
    return {k: v[sizes[j]:sizes[j + 1]].reshape(g32[k].shape).astype(g_arrays[k].dtype) for j, k in enumerate(keys)}


@pytest.mark.parametrize("phase", ["multi_krum_mixed", "median_flower_dp"])
def test_real_flower_run_equals_fedagg(flower_run, phase):
    ns = _common()
    out = flower_run["out"]
    rec = json.loads((out / f"{phase}.json").read_text())
    assert sorted(rec["order"]) == list(range(N_NODES)) and rec["n"] == N_NODES  # all five replied
    g = _load(out / f"{phase}-in.npz")
    got = _load(out / f"{phase}-out.npz")
    want = _expected(phase, g, rec["order"], ns)
    assert list(got) == list(ns["SHAPES"])
    for k in got:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{phase}: {k}")
        assert np.abs(got[k].astype(np.float64) - g[k]).max() < 0.5  # the Byzantine nodes had no pull
    if phase == "multi_krum_mixed":
        assert sorted(rec["compressed"]) == list(ns["COMPRESSED"])
        assert sorted(rec["selected"]) == [0, 1, 2]  # the sign-flipper (3) and the huge one (4) left out
