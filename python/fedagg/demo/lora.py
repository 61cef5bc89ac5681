"""``fedagg demo --task lora``: federated LoRA fine-tuning of a small Llama, in one process.

A Llama-architecture model built from a config (random weights, nothing downloaded) gets PEFT
LoRA adapters on every attention and MLP projection. The text is a synthetic language with known
structure: a sparse first-order Markov chain over the vocabulary; each participant's shard comes
from its own variant of the chain (the same chain with some of its rows replaced: non-IID
data), the held-out text from the chain itself. Each round every participant loads the global
adapters, trains a few steps on its shard and sends its adapters; the Byzantine ones send their
adapters flipped and scaled. The server aggregates them with ``fedagg.lora.LoraAggregator``.

Runs, one line per round (held-out perplexity; the chain's own entropy is the floor):
``factors`` (average A and B apart: FedIT) and ``exact`` (the products' mean, re-factored to the
rank) without attackers, then the exact mean and the exact robust rule with the attackers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import numpy as np

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class LoraOptions:
    participants: int = 8
    byzantine: int = 2
    rule: str = "multi_krum"
    f: Optional[int] = None  # default: byzantine
    rounds: int = 6
    steps: int = 12  # local steps per round
    rank: int = 4
    vocab: int = 48
    seq: int = 24
    batch: int = 16
    lr: float = 0.01
    attack_scale: float = 4.0  # Byzantine adapters: B -> -attack_scale x B
    seed: int = 0

    def check(self) -> None:
        from ..rules import RULES as SPECS

        if not 2 <= self.participants <= 64:
            raise ValueError("participants must be in [2, 64]")
        if not 0 <= self.byzantine < self.participants:
            raise ValueError("byzantine must be in [0, participants)")
        if self.rule not in SPECS:
            raise ValueError(f"unknown rule {self.rule!r}")
        f = self.byzantine if self.f is None else self.f
        if self.participants < SPECS[self.rule].min_n(f):
            raise ValueError(f"{self.rule} with f = {f} needs at least {SPECS[self.rule].min_n(f)} participants")
        for name in ("rounds", "steps", "rank", "batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.vocab < 8 or self.seq < 4 or not self.lr > 0 or not self.attack_scale > 0:
            raise ValueError("vocab >= 8, seq >= 4, lr > 0 and attack_scale > 0 are needed")


@dataclass
class LoraRun:
    label: str
    perplexity: List[float] = field(default_factory=list)  # held-out, after each round
    discarded: List[float] = field(default_factory=list)  # mean share of each layer's aggregate the rank left out
    excluded: List[List[int]] = field(default_factory=list)  # participants the rule left out, per round
    seconds: float = 0.0


def _chain(rng, vocab: int, fan: int = 3) -> np.ndarray:
    """A sparse Markov chain: each token goes to `fan` others, with random probabilities."""
    P = np.zeros((vocab, vocab))
    for a in range(vocab):
        nxt = rng.choice(vocab, fan, replace=False)
        P[a, nxt] = rng.dirichlet(np.ones(fan))
    return P


def _sample(rng, P: np.ndarray, count: int, length: int) -> np.ndarray:
    out = np.empty((count, length), dtype=np.int64)
    out[:, 0] = rng.integers(0, P.shape[0], count)
    cum = np.cumsum(P, axis=1)
    for t in range(1, length):
        u = rng.random(count)
        out[:, t] = np.minimum((u[:, None] > cum[out[:, t - 1]]).sum(axis=1), P.shape[0] - 1)
    return out


def entropy_rate(P: np.ndarray) -> float:
    """The chain's entropy per token (nats), under its stationary distribution: ln of the best
    perplexity any model can reach on its text."""
    w, v = np.linalg.eig(P.T)
    pi = np.real(v[:, np.argmin(np.abs(w - 1))])
    pi = pi / pi.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.nansum(P * np.where(P > 0, np.log(P), 0.0), axis=1)
    return float(pi @ h)


def _model(opts: LoraOptions):
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(opts.seed)
    cfg = transformers.LlamaConfig(vocab_size=opts.vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=opts.seq)
    base = transformers.LlamaForCausalLM(cfg)
    lora = LoraConfig(r=opts.rank, lora_alpha=2 * opts.rank, target_modules=TARGETS, lora_dropout=0.0)
    return get_peft_model(base, lora)


def run_lora(opts: LoraOptions, on_round: Optional[Callable[[LoraRun, int], None]] = None,
             runs: Optional[List[Tuple[str, str, str, bool]]] = None) -> Tuple[List[LoraRun], float]:
    """The demo's runs (label, mode, rule, attacked); returns them and the chain's best perplexity."""
    import warnings

    import torch

    from ..integrations.peft import LoraAggregator, LoraParticipant

    opts.check()
    f = opts.byzantine if opts.f is None else opts.f
    if runs is None:
        runs = [("factors, mean", "factors", "mean", False), ("exact, mean", "exact", "mean", False)]
        if opts.byzantine:
            runs += [("exact, mean, attacked", "exact", "mean", True),
                     (f"exact, {opts.rule} f={f}, attacked", "exact", opts.rule, True)]
    rng = np.random.default_rng(opts.seed)
    P = _chain(rng, opts.vocab)
    shards = []
    for i in range(opts.participants):  # each participant's variant: a quarter of the rows replaced
        Pi = P.copy()
        rows = rng.choice(opts.vocab, opts.vocab // 4, replace=False)
        Pi[rows] = _chain(rng, opts.vocab)[rows]
        shards.append(torch.from_numpy(_sample(rng, Pi, 64, opts.seq)))
    held_out = torch.from_numpy(_sample(rng, P, 128, opts.seq))
    bad = set(range(opts.participants - opts.byzantine, opts.participants))
    results = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # peft asks transformers for a renamed attribute
        torch.set_num_threads(1)
        models = [_model(opts) for _ in range(opts.participants)]
        evaluator = LoraParticipant(_model(opts))
        initial = evaluator.update()
        for label, mode, rule, attacked in runs:
            run, t0 = LoraRun(label), time.monotonic()
            agg = LoraAggregator(mode, rule, 0 if rule == "mean" else f, rank=opts.rank)
            glob, scaling = initial, evaluator.scaling
            parts = [LoraParticipant(m) for m in models]
            for rnd in range(opts.rounds):
                updates, scalings = [], []
                for i, p in enumerate(parts):
                    p.load(glob, scaling)
                    _train(p.model, shards[i], opts, seed=opts.seed * 1000 + rnd * 64 + i)
                    u = p.update()
                    if attacked and i in bad:
                        u = {k: -opts.attack_scale * v if k.endswith("lora_B.weight") else v for k, v in u.items()}
                    updates.append(u)
                    scalings.append(p.scaling)
                res = agg.aggregate(updates, scalings=scalings)
                glob, scaling = res.adapters, res.scaling
                evaluator.load(glob, scaling)
                run.perplexity.append(_perplexity(evaluator.model, held_out))
                run.discarded.append(float(np.mean(list(res.discarded.values()))) if res.discarded else 0.0)
                chosen = res.info.selected
                run.excluded.append([] if chosen is None else sorted(set(range(opts.participants)) -
                                                                      {int(c) for c in chosen}))
                if on_round is not None:
                    on_round(run, rnd)
            run.seconds = time.monotonic() - t0
            results.append(run)
    return results, math.exp(entropy_rate(P))


def _train(model, data, opts: LoraOptions, seed: int) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=opts.lr)
    for _ in range(opts.steps):
        idx = torch.randint(0, data.shape[0], (opts.batch,), generator=g)
        x = data[idx]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def _perplexity(model, data) -> float:
    import torch

    with torch.no_grad():
        return float(math.exp(model(input_ids=data, labels=data).loss.item()))


def main(opts: LoraOptions, printer=print) -> List[LoraRun]:
    """Run the demo, printing a line per round and a summary."""
    printer(f"LoRA fine-tuning of a small Llama (2 layers, hidden 64, rank {opts.rank} on {len(TARGETS)} projections), "
            f"{opts.participants} participants on non-IID shards of a Markov language, "
            f"{opts.byzantine} Byzantine (adapters flipped and scaled by {opts.attack_scale:g})")

    def row(run: LoraRun, rnd: int) -> None:
        ex = ",".join(f"p{i}" for i in run.excluded[-1]) or "-"
        printer(f"  {run.label:<34} round {rnd}: perplexity {run.perplexity[-1]:7.2f}   "
                f"rank loss {run.discarded[-1]:.3f}   excluded {ex}")
    results, floor = run_lora(opts, row)
    printer(f"perplexity floor (the chain's own entropy): {floor:.2f}; a uniform guess: {opts.vocab}")
    for r in results:
        printer(f"  {r.label:<34} final perplexity {r.perplexity[-1]:7.2f} ({r.seconds:.1f} s)")
    return results
