"""The demo's learning task: scikit-learn's handwritten digits (it ships inside the
package, nothing is downloaded), a small MLP, local SGD, and the attacks.

Every process derives the same split from the seed: a held-out test set for the
server, and one shard of the rest per participant.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import List, Tuple

import numpy as np
import torch

from ..integrations.torch import ParameterVector

from .options import ATTACKS, CODECS
TEST_FRACTION = 0.2


@dataclass
class Data:
    X: np.ndarray  # float32, pixels in [0, 1]
    y: np.ndarray  # int64 labels 0..9
    test: np.ndarray  # indices of the held-out test set
    shards: List[np.ndarray]  # one index array per participant


def load(participants: int, seed: int) -> Data:
    from sklearn.datasets import load_digits

    if participants < 1:
        raise ValueError("participants must be >= 1")
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    order = np.random.default_rng(seed).permutation(len(X))
    n_test = int(len(X) * TEST_FRACTION)
    test, train = order[:n_test], order[n_test:]
    if len(train) < participants:
        raise ValueError(f"{len(train)} training images cannot be shared by {participants} participants")
    return Data(X, y.astype(np.int64), test, np.array_split(train, participants))


def model(seed: int = 0) -> torch.nn.Module:
    """64 pixels -> 32 hidden units -> 10 classes; the same initial weights everywhere."""
    gen = torch.Generator().manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        for p in net.parameters():
            p.uniform_(-1.0 / math.sqrt(p.shape[-1]), 1.0 / math.sqrt(p.shape[-1]), generator=gen)
    return net


def train(net: torch.nn.Module, X: np.ndarray, y: np.ndarray, *, epochs: int, lr: float, seed: int,
          batch: int = 16) -> None:
    """Local SGD on (X, y), in place."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    xs, ys = torch.from_numpy(X), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=gen).split(batch):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(xs[idx]), ys[idx]).backward()
            opt.step()


def accuracy(net: torch.nn.Module, vector: np.ndarray, X: np.ndarray, y: np.ndarray) -> float:
    """Test accuracy of the flat parameter `vector` loaded into `net`."""
    ParameterVector(net).set(vector)
    with torch.no_grad():
        return float((net(torch.from_numpy(X)).argmax(1).numpy() == y).mean())


def alie_z(n: int, f: int) -> float:
    """z_max of "A Little Is Enough" (Baruch et al. 2019): s = floor(n/2 + 1) - f supporters needed,
    z = Phi^-1((n - s) / n)."""
    s = n // 2 + 1 - f
    p = (n - s) / n
    return NormalDist().inv_cdf(min(max(p, 1e-6), 1 - 1e-6))


def attack(kind: str, honest: np.ndarray, rng: np.random.Generator, *, estimates: Tuple[np.ndarray, ...] = (),
           n: int = 1, f: int = 0) -> np.ndarray:
    """A Byzantine participant's update, from its own honest one.

    signflip: -10 x the honest update (a scaled sign flip: the mean moves backwards).
    noise:    Gaussian noise, std 1 per coordinate (about 100x an honest update's norm here).
    alie:     mean - z_max * std of honest updates (Baruch et al. 2019), estimated from
              `estimates`: the honest updates of the whole colluding coalition, which every
              attacker computes alike, so all of them send the same vector.
    """
    if kind == "none":
        return honest
    if kind == "signflip":
        return (-10.0 * honest).astype(np.float32)
    if kind == "noise":
        return rng.standard_normal(honest.size).astype(np.float32)
    if kind == "alie":
        if len(estimates) < 2:
            raise ValueError("alie needs at least two honest estimates")
        E = np.stack(estimates).astype(np.float64)
        return (E.mean(0) - alie_z(n, f) * E.std(0)).astype(np.float32)
    raise ValueError(f"attack must be one of {ATTACKS}, got {kind!r}")


def make_codec(name: str):
    """The codec a participant encodes with (None: raw float32 updates)."""
    from .. import compress

    makers = {"none": lambda: None, "topk": lambda: compress.TopK(ratio=0.1), "uniform8": lambda: compress.Uniform(8),
              "sign": compress.Sign, "rotation": lambda: compress.Rotation(4)}
    if name not in makers:
        raise ValueError(f"codec must be one of {CODECS}, got {name!r}")
    return makers[name]()
