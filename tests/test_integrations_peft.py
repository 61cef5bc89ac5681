"""fedagg.integrations.peft with real PEFT LoRA adapters on a tiny Llama (built from a config, no
download): the update round trip, loading aggregates of another rank, and a small federated round
whose merged weights are checked against float64 NumPy references of the participants' deltas."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from fedagg.integrations.peft import LoraAggregator, LoraParticipant  # noqa: E402

# peft 0.21 asks transformers 5 for a renamed attribute (their matter, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(seed=0, r=4, alpha=8, dtype=torch.float32, rslora=False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(cfg).to(dtype)
    lora = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS, lora_dropout=0.0, use_rslora=rslora)
    pm = peft.get_peft_model(model, lora, autocast_adapter_dtype=False)
    pm.eval()
    return pm


def train(pm, seed, steps=3):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.5)
    for _ in range(steps):
        x = torch.randint(0, 64, (2, 12), generator=g)
        loss = pm(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()


def deltas(pm):
    """Each LoRA layer's weight update, float64: what the adapter adds to the base weight."""
    out = {}
    for name, mod in pm.named_modules():
        if isinstance(mod, peft.tuners.lora.LoraLayer) and mod.active_adapters:
            (a,) = mod.active_adapters
            out[name] = mod.get_delta_weight(a).detach().to(torch.float64).numpy()
    return out


def test_update_and_load_round_trip_exactly():
    a, b = tiny(0), tiny(1)
    train(a, 0)
    ua = LoraParticipant(a).update()
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in ua) and len(ua) == 2 * 2 * 7
    pb = LoraParticipant(b)
    pb.load(ua, LoraParticipant(a).scaling)
    ub = pb.update()
    assert set(ua) == set(ub) and all(torch.equal(ua[k], ub[k]) for k in ua)
    assert pb.adapter == "default"  # same rank and scaling: loaded in place
    # a clone: training on goes on without changing what was sent
    train(a, 1)
    assert not all(torch.equal(ua[k], v) for k, v in LoraParticipant(a).update().items())


@pytest.mark.parametrize("mode, rank", [("stacked", None), ("exact", 2), ("exact", 8)])
def test_a_federated_round_merges_to_the_aggregate_of_the_participants_deltas(mode, rank):
    n = 4
    models = [tiny(0, r=4, alpha=a) for a in (8, 4, 8, 16)]  # one base, different scalings
    for i, m in enumerate(models):
        train(m, 10 + i)
    parts = [LoraParticipant(m) for m in models]
    updates, scalings = [p.update() for p in parts], [p.scaling for p in parts]
    res = LoraAggregator(mode, "mean", rank=rank).aggregate(updates, scalings=scalings)
    target = LoraParticipant(tiny(0))
    target.load(res.adapters, res.scaling)
    got = deltas(target.model)
    per = [deltas(m) for m in models]
    assert set(got) == set(per[0]) and len(got) == 14
    for name, d in got.items():
        mean = sum(p[name] for p in per) / n
        if mode == "stacked" or rank >= 16:
            want = mean
        else:
            U, S, Vt = np.linalg.svd(mean, full_matrices=False)
            want = (U[:, :rank] * S[:rank]) @ Vt[:rank]
        np.testing.assert_allclose(d, want, rtol=1e-4, atol=1e-5 * np.abs(mean).max())
    assert target.adapter != "default" and list(target.model.peft_config) == [target.adapter]


def test_robust_rule_leaves_out_a_byzantine_adapter():
    models = [tiny(0) for _ in range(6)]
    for i, m in enumerate(models):
        train(m, 20 + i)
    updates = [LoraParticipant(m).update() for m in models]
    updates[3] = {k: v * 50 for k, v in updates[3].items()}  # an attacker's oversized adapter
    res = LoraAggregator("stacked", "multi_krum", f=1).aggregate(updates, scalings=2.0)
    assert 3 not in res.info.selected.tolist() and len(res.info.selected) == 5


def test_bf16_adapters_in_and_out():
    models = [tiny(0, dtype=torch.bfloat16) for _ in range(3)]
    for i, m in enumerate(models):
        train(m, 30 + i, steps=2)
    updates = [LoraParticipant(m).update() for m in models]
    assert all(v.dtype == torch.bfloat16 for v in updates[0].values())
    res = LoraAggregator("exact", "median", f=1, rank=4).aggregate(updates, scalings=2.0)
    assert all(v.dtype == torch.bfloat16 for v in res.adapters.values())
    target = LoraParticipant(tiny(0, dtype=torch.bfloat16))
    target.load(res.adapters, res.scaling)
    got = deltas(target.model)
    per = [deltas(m) for m in models]
    for name, d in got.items():
        med = np.median(np.stack([p[name] for p in per]), axis=0)
        U, S, Vt = np.linalg.svd(med, full_matrices=False)
        want = (U[:, :4] * S[:4]) @ Vt[:4]
        np.testing.assert_allclose(d, want, atol=2.0 ** -6 * np.abs(med).max())  # bf16 factors


def test_wrong_inputs_are_refused():
    pm = tiny(0)
    with pytest.raises(TypeError, match="PeftModel"):
        LoraParticipant(pm.base_model.model)
    with pytest.raises(ValueError, match="no adapter"):
        LoraParticipant(pm, adapter="other")
    p = LoraParticipant(pm)
    u = p.update()
    with pytest.raises(ValueError, match="do not match"):
        p.load({k: v for k, v in list(u.items())[:-1]})
    with pytest.raises(ValueError, match="scaling"):
        p.load(u, 0.0)
    assert LoraParticipant(tiny(0, r=4, alpha=8, rslora=True)).scaling == pytest.approx(8 / 2)
