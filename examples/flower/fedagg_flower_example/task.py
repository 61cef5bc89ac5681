"""The learning task, in NumPy only (no torch): softmax regression on synthetic Gaussian data.

Every node draws its own data from the same 5 Gaussian clusters in 20 dimensions,
seeded by its ``partition-id``; the server holds a held-out test set. Everything
is deterministic: the same global model and partition give the same update.
"""

from __future__ import annotations

from typing import Dict, Mapping, Tuple

import numpy as np

NUM_FEATURES = 20
NUM_CLASSES = 5
SAMPLES_PER_NODE = 250
TEST_SAMPLES = 2000

#: The run config. The same keys and values are in pyproject.toml's [tool.flwr.app.config]
#: (``flwr run`` reads them there and takes overrides with ``--run-config``);
#: ``flwr.simulation.run_simulation`` passes no run config, so these defaults apply.
DEFAULTS: Dict[str, object] = {
    "num-server-rounds": 5,
    "rule": "trimmed_mean",  # any fedagg.RULES entry
    "f": 2,  # Byzantine nodes the rule tolerates; trimmed_mean needs n > 2f, 5 nodes for f = 2
    "byzantine": 2,  # the last `byzantine` partitions attack: they send g - attack-scale * (w - g)
    "attack-scale": 4.0,
    "local-steps": 5,
    "learning-rate": 0.1,
    "fraction-evaluate": 0.0,  # > 0: also evaluate on the nodes' own data (the ClientApp's evaluate)
    "result-path": "fedagg-flower-result.npz",  # relative to the ServerApp's working directory
}

Arrays = Dict[str, np.ndarray]


def settings(run_config: Mapping[str, object]) -> Dict[str, object]:
    """The run config over the defaults."""
    return {**DEFAULTS, **dict(run_config)}


def _centers() -> np.ndarray:
    return np.random.default_rng(2024).normal(size=(NUM_CLASSES, NUM_FEATURES)) * 0.8


def _sample(seed: int, n: int) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, NUM_CLASSES, size=n)
    x = (_centers()[y] + rng.normal(size=(n, NUM_FEATURES))).astype(np.float32)
    return x, y


def load_partition(partition_id: int) -> Tuple[np.ndarray, np.ndarray]:
    """The training data of node `partition_id`."""
    return _sample(1 + int(partition_id), SAMPLES_PER_NODE)


def load_test_data() -> Tuple[np.ndarray, np.ndarray]:
    """The server's held-out test set."""
    return _sample(10_000, TEST_SAMPLES)


def initial_arrays() -> Arrays:
    rng = np.random.default_rng(0)
    return {"weight": (0.01 * rng.normal(size=(NUM_FEATURES, NUM_CLASSES))).astype(np.float32),
            "bias": np.zeros(NUM_CLASSES, dtype=np.float32)}


def _probabilities(arrays: Arrays, x: np.ndarray) -> np.ndarray:
    z = x @ arrays["weight"] + arrays["bias"]
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def train(arrays: Arrays, x: np.ndarray, y: np.ndarray, steps: int, lr: float) -> Tuple[Arrays, float]:
    """`steps` full-batch gradient steps of the cross-entropy; returns the new arrays (float32) and the loss."""
    w = arrays["weight"].astype(np.float32).copy()
    b = arrays["bias"].astype(np.float32).copy()
    onehot = np.eye(NUM_CLASSES, dtype=np.float32)[y]
    loss = 0.0
    for _ in range(int(steps)):
        p = _probabilities({"weight": w, "bias": b}, x)
        loss = float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))
        grad = ((p - onehot) / len(x)).astype(np.float32)
        w -= np.float32(lr) * (x.T @ grad)
        b -= np.float32(lr) * grad.sum(axis=0)
    return {"weight": w, "bias": b}, loss


def evaluate(arrays: Arrays, x: np.ndarray, y: np.ndarray) -> Tuple[float, float]:
    """(loss, accuracy) of the model on (x, y)."""
    p = _probabilities(arrays, x)
    loss = float(-np.mean(np.log(p[np.arange(len(y)), y] + 1e-12)))
    return loss, float(np.mean(p.argmax(axis=1) == y))


def is_byzantine(partition_id: int, num_partitions: int, byzantine: int) -> bool:
    return int(partition_id) >= int(num_partitions) - int(byzantine)


def sign_flip(global_arrays: Arrays, trained: Arrays, scale: float) -> Arrays:
    """The attack: the honest update reversed and scaled, g - scale * (w - g)."""
    return {k: (g - np.float32(scale) * (trained[k] - g)).astype(g.dtype) for k, g in global_arrays.items()}


def client_update(global_arrays: Arrays, partition_id: int, num_partitions: int,
                  config: Mapping[str, object]) -> Tuple[Arrays, float, int]:
    """What node `partition_id` sends back: (arrays, train loss, number of examples)."""
    x, y = load_partition(partition_id)
    trained, loss = train(global_arrays, x, y, int(config["local-steps"]), float(config["learning-rate"]))
    if is_byzantine(partition_id, num_partitions, int(config["byzantine"])):
        trained = sign_flip(global_arrays, trained, float(config["attack-scale"]))
    return trained, loss, len(x)
