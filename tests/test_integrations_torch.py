"""fedagg.integrations.torch: exact model <-> vector round trips, participant updates, server optimizers."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import fedagg  # noqa: E402
from fedagg import compress, privacy  # noqa: E402
from fedagg.integrations.torch import Participant, ParameterVector, ServerOptimizer  # noqa: E402


def net(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(),
                               torch.nn.Linear(3 * 6 * 6, 5))


def test_vector_roundtrip_is_exact():
    a, b = net(0), net(1)
    pa, pb = ParameterVector(a, buffers=True), ParameterVector(b, buffers=True)
    v = pa.get()
    assert v.dtype == torch.float32 and v.numel() == sum(p.numel() for p in a.parameters()) + 3 + 3
    pb.set(v)
    for x, y in zip(a.state_dict().values(), b.state_dict().values()):
        if x.is_floating_point():
            assert torch.equal(x, y)
    assert torch.equal(pb.get(), v)
    out = torch.empty_like(v)
    assert pa.get(out) is out
    with pytest.raises(ValueError, match="values"):
        pa.set(v[:-1])
    with pytest.raises(ValueError, match="NaN"):
        pa.set(torch.full_like(v, float("nan")))
    with pytest.raises(TypeError):
        ParameterVector([1, 2])


def test_grads_vector_matches_the_parameters():
    m = net()
    m(torch.randn(2, 1, 8, 8)).sum().backward()
    g = ParameterVector(m).grads()
    want = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
    assert torch.equal(g, want)


def test_participant_update_with_codec_and_local_dp():
    m = net()
    p = Participant(m, codec=compress.TopK(ratio=0.1))
    g = ParameterVector(m).get()
    p.begin(g)
    with torch.no_grad():
        for q in m.parameters():
            q.add_(0.5)
    payload = p.update()
    delta = compress.decode(payload)
    assert np.count_nonzero(delta) == payload.params["k"]
    np.testing.assert_allclose(delta[delta != 0], 0.5, rtol=1e-6)
    np.testing.assert_allclose(p.state.residual + delta, np.full(delta.size, 0.5, np.float32), rtol=1e-6)
    plain = Participant(m, dp=privacy.LocalDP(clip_norm=1.0, noise_multiplier=0.5, seed=3))
    plain.begin(g)
    upd = plain.update()
    assert upd.shape == g.shape and torch.isfinite(upd).all()


def test_server_optimizers():
    x = torch.zeros(4)
    g = torch.tensor([1.0, -2.0, 0.5, 0.0])
    assert torch.equal(ServerOptimizer("fedavg", lr=0.5).step(x, g), 0.5 * g)
    opt = ServerOptimizer("fedavgm", lr=1.0, beta1=0.9)
    x1 = opt.step(x, g)
    x2 = opt.step(x1, g)
    assert torch.allclose(x2, x1 + 1.9 * g)
    adam = ServerOptimizer("fedadam", lr=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
    y = adam.step(x, g)
    m, v = 0.1 * g, 0.99 * 1e-6 + 0.01 * g * g
    assert torch.allclose(y, 0.1 * m / (v.sqrt() + 1e-3))
    with pytest.raises(ValueError, match="kind"):
        ServerOptimizer("sgd")
    with pytest.raises(ValueError, match="NaN"):
        ServerOptimizer().step(x, torch.full((4,), float("inf")))


def test_a_round_of_fedavg_with_a_robust_rule():
    global_model = net(0)
    gv = ParameterVector(global_model)
    start = gv.get()
    updates = []
    for i in range(5):
        local = net(0)
        p = Participant(local)
        p.begin(start)
        with torch.no_grad():
            for q in local.parameters():
                q.add_(1.0 if i < 4 else 1e6)  # one Byzantine participant
        updates.append(p.update())
    agg = fedagg.median(torch.stack(updates))
    gv.set(ServerOptimizer().step(start, agg))
    assert torch.allclose(gv.get(), start + 1.0)


def test_docstring_example():
    import doctest

    import fedagg.integrations.torch as module

    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("dtypes", [(torch.float64,), (torch.float16, torch.float32), (torch.bfloat16,),
                                    (torch.float64, torch.float16)])
def test_any_floating_point_module_round_trips_exactly(dtypes):
    torch.manual_seed(3)
    layers = [torch.nn.Linear(5, 4).to(dt) for dt in dtypes]
    m = torch.nn.ModuleList(layers)
    before = [p.detach().clone() for p in m.parameters()]
    pv = ParameterVector(m)
    v = pv.get()
    assert v.dtype == (torch.float64 if torch.float64 in dtypes else torch.float32)
    for p in m.parameters():  # scramble, then restore from the vector
        with torch.no_grad():
            p.fill_(7)
    pv.set(v)
    for a, b in zip(before, m.parameters()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(pv.get(), v)
    step = ServerOptimizer().step(v, torch.ones_like(v))
    assert step.dtype == v.dtype


def test_non_floating_parameters_are_refused():
    m = torch.nn.Linear(2, 2)
    m.register_parameter("count", torch.nn.Parameter(torch.zeros(2, dtype=torch.int64), requires_grad=False))
    with pytest.raises(TypeError, match="floating point"):
        ParameterVector(m)
