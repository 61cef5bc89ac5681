"""fedagg.lora.LoraAggregator against float64 NumPy references written here: the aggregated
products, their truncated SVD, stacking, separate averages, robust rules on the products, bf16."""

import numpy as np
import pytest

import fedagg
from fedagg.lora import LoraAggregator

# two layers with non-square shapes (a GQA k/v-like 16 -> 8 and an MLP-like 12 -> 20), and a bias
SHAPES = {"m.l0.k_proj": (16, 8), "m.l0.up_proj": (12, 20)}


def make(seed, n, ranks=None, scale=1.0, bias=True):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        u = {}
        for name, (din, dout) in SHAPES.items():
            r = 4 if ranks is None else ranks[i]
            u[name + ".lora_A.weight"] = rng.normal(size=(r, din)) * scale
            u[name + ".lora_B.weight"] = rng.normal(size=(dout, r)) * scale
        if bias:
            u["m.head.bias"] = rng.normal(size=5) * scale
        out.append(u)
    return out


def products(u, s=1.0):
    return {name: s * u[name + ".lora_B.weight"] @ u[name + ".lora_A.weight"] for name in SHAPES}


def flat(u, s=1.0):
    p = products(u, s)
    return np.concatenate([p[name].ravel() for name in SHAPES] + ([u["m.head.bias"]] if "m.head.bias" in u else []))


def unflat(v):
    out, pos = {}, 0
    for name, (din, dout) in SHAPES.items():
        out[name] = v[pos:pos + din * dout].reshape(dout, din)
        pos += din * dout
    return out, v[pos:]


def truncation(M, r):
    U, S, Vt = np.linalg.svd(M, full_matrices=False)
    return (U[:, :r] * S[:r]) @ Vt[:r], float(np.sum(S[r:] ** 2) / np.sum(S ** 2))


def product_of(res, name):
    a, b = np.asarray(res.adapters[name + ".lora_A.weight"]), np.asarray(res.adapters[name + ".lora_B.weight"])
    return res.scaling * b.astype(np.float64) @ a.astype(np.float64)


@pytest.mark.parametrize("rank", [2, 4, 7])
def test_exact_mean_is_the_truncated_mean_of_the_products(rank):
    ups = make(1, 5)
    w = np.array([1.0, 2.0, 3.0, 1.0, 0.5])
    s = np.array([0.5, 2.0, 1.0, 1.0, 4.0])  # each its own lora_alpha / r
    res = LoraAggregator("exact", "mean", rank=rank, scaling=2.0).aggregate(ups, weights=w, scalings=s)
    for name in SHAPES:
        ref = sum(wi * products(u, si)[name] for u, wi, si in zip(ups, w, s)) / w.sum()
        want, lost = truncation(ref, rank)
        np.testing.assert_allclose(product_of(res, name), want, rtol=1e-9, atol=1e-9 * np.abs(ref).max())
        assert res.discarded[name] == pytest.approx(lost, rel=1e-9, abs=1e-12)
        assert res.rank[name] == rank and res.adapters[name + ".lora_A.weight"].shape[0] == rank
    bias = sum(wi * u["m.head.bias"] for u, wi in zip(ups, w)) / w.sum()
    np.testing.assert_allclose(res.adapters["m.head.bias"], bias, rtol=1e-12)
    np.testing.assert_allclose(res.info.weights, w / w.sum())


def test_stacked_is_the_exact_aggregate_at_the_summed_rank_with_heterogeneous_ranks():
    ups = make(2, 4, ranks=[1, 3, 4, 2])
    before = [{k: v.copy() for k, v in u.items()} for u in ups]
    res = LoraAggregator("stacked", "mean", scaling=0.5).aggregate(ups)
    for name in SHAPES:
        ref = sum(products(u)[name] for u in ups) / 4
        np.testing.assert_allclose(product_of(res, name), ref, rtol=1e-12, atol=1e-12)
        assert res.rank[name] == 10
    # the output factors (rescaled for scaling = 0.5) are new arrays: the inputs are as they were
    assert all(np.array_equal(u[k], b[k]) for u, b in zip(ups, before) for k in u)
    # exact mode takes heterogeneous ranks too; factors mode refuses them
    LoraAggregator("exact", "mean", rank=3).aggregate(ups)
    with pytest.raises(ValueError, match="same rank"):
        LoraAggregator("factors").aggregate(ups)


def test_factors_are_the_separate_averages():
    ups = make(3, 6)
    w = np.arange(1.0, 7.0)
    res = LoraAggregator("factors", "mean").aggregate(ups, weights=w, scalings=0.5)
    for k in ups[0]:
        want = sum(wi * u[k] for u, wi in zip(ups, w)) / w.sum()
        if k.endswith("lora_B.weight"):
            want = want * 0.5  # the output's scaling is 1: B carries the inputs' 0.5
        np.testing.assert_allclose(res.adapters[k], want, rtol=1e-12)
    # ... which is not the average of the updates
    name = "m.l0.up_proj"
    true = sum(wi * products(u, 0.5)[name] for u, wi in zip(ups, w)) / w.sum()
    assert np.linalg.norm(product_of(res, name) - true) > 0.1 * np.linalg.norm(true)
    with pytest.raises(ValueError, match="one scaling"):
        LoraAggregator("factors").aggregate(ups, scalings=np.arange(1.0, 7.0))


@pytest.mark.parametrize("rule, f, kw", [("krum", 1, {}), ("multi_krum", 1, {}), ("geometric_median", 1, {}),
                                         ("centered_clipping", 1, {"tau": 1.0, "iterations": 3})])
def test_distance_rules_on_the_products_match_the_rule_on_dense_products(rule, f, kw):
    ups = make(4, 7)
    ups[2] = {k: v * 30 for k, v in ups[2].items()}  # an outlier
    X = np.stack([flat(u) for u in ups])
    want, info = fedagg.aggregate(X.astype(np.float32), rule, f, return_info=True, **kw)
    res = LoraAggregator("stacked", rule, f, **kw).aggregate(ups)
    if info.selected is not None:
        assert sorted(res.info.selected.tolist()) == sorted(np.asarray(info.selected).tolist())
        assert 2 not in res.info.selected.tolist()
    layers, bias = unflat(np.asarray(want, dtype=np.float64))
    tol = 2e-4 * np.abs(X).max()  # the reference ran on float32 rows; the embedding's distances round too
    for name in SHAPES:
        np.testing.assert_allclose(product_of(res, name), layers[name], atol=tol)
    np.testing.assert_allclose(res.adapters["m.head.bias"], bias, atol=tol)


@pytest.mark.parametrize("rule, f", [("median", 2), ("trimmed_mean", 1), ("bulyan", 1)])
def test_coordinatewise_rules_on_the_products_then_truncated(rule, f):
    ups = make(5, 7)
    P = {name: np.stack([products(u)[name] for u in ups]) for name in SHAPES}
    res = LoraAggregator("exact", rule, f, rank=3).aggregate(ups)
    if rule == "bulyan":
        X = np.stack([flat(u) for u in ups])
        sel = np.sort(np.asarray(fedagg.aggregate(X.astype(np.float32), "bulyan", f, return_info=True)[1].selected))
        assert sorted(res.info.selected.tolist()) == sel.tolist()
    for name in SHAPES:
        stack = P[name]
        if rule == "median":
            agg = np.median(stack, axis=0)
        elif rule == "trimmed_mean":
            agg = np.sort(stack, axis=0)[f:len(ups) - f].mean(axis=0)
        else:  # Bulyan: the trimmed mean (f per side) of the selected
            agg = np.sort(stack[sel], axis=0)[f:len(sel) - f].mean(axis=0)
        want, lost = truncation(agg, 3)
        np.testing.assert_allclose(product_of(res, name), want, atol=1e-5 * np.abs(agg).max())
        assert res.discarded[name] == pytest.approx(lost, rel=1e-4, abs=1e-6)
    with pytest.raises(ValueError, match="no stacked form"):
        LoraAggregator("stacked", rule, f)


def test_one_update_at_its_own_rank_comes_back_exactly():
    (u,) = make(6, 1)
    res = LoraAggregator("exact", "mean").aggregate([u], scalings=3.0)
    for name in SHAPES:
        np.testing.assert_allclose(product_of(res, name), products(u, 3.0)[name], rtol=1e-9, atol=1e-9)
        assert res.discarded[name] == pytest.approx(0.0, abs=1e-12)


def test_the_mean_does_not_depend_on_the_order():
    ups = make(7, 5)
    a = LoraAggregator("exact", "mean", rank=3).aggregate(ups)
    b = LoraAggregator("exact", "mean", rank=3).aggregate(ups[::-1])
    for name in SHAPES:
        np.testing.assert_allclose(product_of(a, name), product_of(b, name), rtol=1e-9, atol=1e-9)


def test_clip_norm_scales_each_whole_update():
    ups = make(8, 4)
    norms = [np.linalg.norm(flat(u)) for u in ups]
    C = float(np.median(norms))
    res = LoraAggregator("stacked", "mean", clip_norm=C).aggregate(ups)
    ref = sum(flat(u) * min(1.0, C / nrm) for u, nrm in zip(ups, norms)) / 4
    layers, bias = unflat(ref)
    for name in SHAPES:
        np.testing.assert_allclose(product_of(res, name), layers[name], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(res.adapters["m.head.bias"], bias, rtol=1e-9)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_torch_half_precision_in_and_out(dtype):
    torch = pytest.importorskip("torch")
    ups = make(9, 5, scale=0.5)
    tdt = getattr(torch, dtype)
    tups = [{k: torch.from_numpy(v).to(tdt) for k, v in u.items()} for u in ups]
    wide = [{k: v.to(torch.float64).numpy() for k, v in u.items()} for u in tups]  # what the rule sees
    for mode, rule, f in (("exact", "mean", 0), ("exact", "median", 1), ("factors", "trimmed_mean", 1)):
        res = LoraAggregator(mode, rule, f, rank=4).aggregate(tups)
        ref = LoraAggregator(mode, rule, f, rank=4).aggregate(wide)
        eps = {"bfloat16": 2.0 ** -8, "float16": 2.0 ** -11, "float32": 2.0 ** -24}[dtype]
        for k, v in res.adapters.items():
            assert isinstance(v, torch.Tensor) and v.dtype == tdt
            want = np.asarray(ref.adapters[k])
            np.testing.assert_allclose(v.to(torch.float64).numpy(), want, rtol=eps, atol=eps * np.abs(want).max())


@pytest.mark.parametrize("bad, match", [
    (lambda u: u.pop("m.l0.k_proj.lora_B.weight"), "other entries"),
    (lambda u: u.__setitem__("m.extra", np.zeros(3)), "other entries"),
    (lambda u: u.__setitem__("m.l0.k_proj.lora_A.weight", np.zeros((4, 9))), "maps"),
    (lambda u: u.__setitem__("m.l0.k_proj.lora_A.weight", np.full((4, 16), np.nan)), "NaN"),
    (lambda u: u.__setitem__("m.l0.k_proj.lora_A.weight", np.zeros((4, 16), np.int32)), "floating"),
])
def test_malformed_updates_are_refused_naming_the_entry(bad, match):
    ups = make(10, 3)
    bad(ups[1])
    with pytest.raises((ValueError, TypeError), match=match):
        LoraAggregator("exact").aggregate(ups)


def test_a_layer_without_its_b_factor_is_refused():
    ups = make(10, 3)
    for u in ups:
        u.pop("m.l0.k_proj.lora_B.weight")
    with pytest.raises(ValueError, match="needs both"):
        LoraAggregator("exact").aggregate(ups)


def test_options_are_checked():
    for kw, match in ((dict(mode="x"), "mode"), (dict(rule="x"), "rule"), (dict(rank=0), "rank"),
                      (dict(scaling=0.0), "scaling"), (dict(clip_norm=-1.0), "clip_norm"), (dict(nnm=True), "nnm")):
        with pytest.raises(ValueError, match=match):
            LoraAggregator(**kw)
    ups = make(11, 3)
    dora = [dict(u, **{"m.l0.k_proj.lora_magnitude_vector": np.ones(8)}) for u in ups]
    with pytest.raises(ValueError, match="DoRA"):
        LoraAggregator().aggregate(dora)
    with pytest.raises(TypeError, match="sequence"):
        LoraAggregator().aggregate(ups[0])
    with pytest.raises(ValueError, match="weights"):
        LoraAggregator().aggregate(ups, weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="f"):  # Krum needs n > 2f + 2
        LoraAggregator("exact", "krum", 1).aggregate(ups)


def test_repeated_updates_rank_deficient_stack():
    """Three copies of one update: the stacked factors are rank-deficient (the Cholesky path cannot
    be used); the exact mean is that update's product, at its rank, nothing discarded."""
    (u,) = make(12, 1)
    res = LoraAggregator("exact", "mean").aggregate([u, u, u])
    for name in SHAPES:
        np.testing.assert_allclose(product_of(res, name), products(u)[name], rtol=1e-8, atol=1e-8)
        assert res.discarded[name] == pytest.approx(0.0, abs=1e-10)


# ------------------------------------------------------------------ the torch backend (device=...)
# The same float64 linear algebra run by torch where the adapters live: forced onto the CPU here
# (device="cpu"), on a GPU when the tests have one. Every result is held to the NumPy references
# above, and to the NumPy backend's result.

def _devices():
    torch = pytest.importorskip("torch")
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _devices())
@pytest.mark.parametrize("mode", ["exact", "stacked"])
def test_torch_backend_matches_the_references(device, mode):
    import torch

    ups = make(21, 6, ranks=[4, 2, 4, 3, 4, 1])
    w = np.array([1.0, 2.0, 3.0, 1.0, 0.5, 1.5])
    s = np.array([0.5, 2.0, 1.0, 1.0, 4.0, 1.0])
    tups = [{k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in u.items()} for u in ups]
    f32 = [{k: v.astype(np.float32) for k, v in u.items()} for u in ups]  # what the tensors hold
    res = LoraAggregator(mode, "mean", rank=3, device=device).aggregate(tups, weights=w, scalings=s)
    host = LoraAggregator(mode, "mean", rank=3).aggregate(f32, weights=w, scalings=s)
    for name in SHAPES:
        a = res.adapters[name + ".lora_A.weight"]
        assert isinstance(a, torch.Tensor) and a.device.type == device and a.dtype == torch.float32
        ref = sum(wi * products(u, si)[name] for u, wi, si in zip(f32, w, s)) / w.sum()
        want, lost = truncation(ref, 3) if mode == "exact" else (ref, 0.0)
        got = res.scaling * (res.adapters[name + ".lora_B.weight"].double() @ a.double()).cpu().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(ref).max())  # float32 out
        np.testing.assert_allclose(got, product_of(host, name), rtol=1e-5, atol=1e-6 * np.abs(ref).max())
        if mode == "exact":
            assert res.discarded[name] == pytest.approx(lost, rel=1e-9, abs=1e-12)
    assert res.adapters["m.head.bias"].dtype == torch.float32


@pytest.mark.parametrize("device", _devices())
def test_torch_backend_distance_rule_and_rank_deficient_stack(device):
    import torch

    ups = make(22, 7)
    ups[3] = {k: v * 30 for k, v in ups[3].items()}  # an outlier Krum must leave out
    tups = [{k: torch.tensor(v, device=device) for k, v in u.items()} for u in ups]  # float64 tensors
    res = LoraAggregator("exact", "multi_krum", 1, device=device).aggregate(tups)
    host = LoraAggregator("exact", "multi_krum", 1).aggregate(ups)
    assert res.info.selected.tolist() == host.info.selected.tolist() and 3 not in res.info.selected.tolist()
    for name in SHAPES:
        got = res.adapters[name + ".lora_B.weight"] @ res.adapters[name + ".lora_A.weight"]
        np.testing.assert_allclose(got.cpu().numpy(), product_of(host, name), rtol=1e-9, atol=1e-9)
    (u,) = make(23, 1)
    tu = {k: torch.tensor(v, device=device) for k, v in u.items()}
    res = LoraAggregator("exact", "mean", device=device).aggregate([tu, tu, tu])  # rank-deficient stack
    for name in SHAPES:
        got = (res.adapters[name + ".lora_B.weight"] @ res.adapters[name + ".lora_A.weight"]).cpu().numpy()
        np.testing.assert_allclose(got, products(u)[name], rtol=1e-8, atol=1e-8)
        assert res.discarded[name] == pytest.approx(0.0, abs=1e-10)


def test_torch_backend_refuses_non_finite_and_bad_devices():
    torch = pytest.importorskip("torch")
    ups = [{k: torch.tensor(v) for k, v in u.items()} for u in make(24, 3)]
    ups[2]["m.l0.k_proj.lora_B.weight"][1, 1] = float("nan")
    with pytest.raises(ValueError, match="update 2's m.l0.k_proj.lora_B.weight holds NaN or Inf"):
        LoraAggregator("exact", device="cpu").aggregate(ups)
    with pytest.raises(ValueError, match="device must name a torch device"):
        LoraAggregator("exact", device="gpu-please")
