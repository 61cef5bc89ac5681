"""The client script (NVFlare Client API, NumPy only: no torch): local linear regression.

Every site fits y = X w + b on its own synthetic data (the same true model for
all, the data seeded by the site's name) with a few full-batch gradient steps
from the global model, and sends back its full model (``ParamsType.FULL``).
The site named by ``--byzantine`` attacks: huge values in the first round, NaN
after that.

job.py runs this script with ``ScriptRunner(script="client.py", framework="numpy")``;
NVFlare copies it into the job's ``custom/`` folder. Everything it computes is a
deterministic function of (site, round, global model): ``client_update`` is what
the tests replay.
"""

import argparse
from typing import Dict, Mapping, Tuple

import numpy as np

FEATURES = 10  # job.py's INITIAL_MODEL has this size
SAMPLES = 200
LOCAL_STEPS = 10
LEARNING_RATE = 0.1

Params = Dict[str, np.ndarray]


def true_model() -> Params:
    rng = np.random.default_rng(42)
    return {"w": rng.normal(size=FEATURES).astype(np.float32), "b": np.array([0.5], dtype=np.float32)}


def local_data(site: str) -> Tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([int(site.rsplit("-", 1)[-1]), 7])
    x = rng.normal(size=(SAMPLES, FEATURES)).astype(np.float32)
    truth = true_model()
    y = (x @ truth["w"] + truth["b"] + 0.1 * rng.normal(size=SAMPLES)).astype(np.float32)
    return x, y


def train(params: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> Tuple[Params, float]:
    """LOCAL_STEPS gradient steps on the mean squared error; returns the model (float32) and the loss."""
    w = np.asarray(params["w"], dtype=np.float32).copy()
    b = np.asarray(params["b"], dtype=np.float32).copy()
    loss = 0.0
    for _ in range(LOCAL_STEPS):
        err = x @ w + b - y
        loss = float(np.mean(err ** 2))
        w -= np.float32(LEARNING_RATE) * (2 * x.T @ err / len(y)).astype(np.float32)
        b -= np.float32(LEARNING_RATE) * np.float32(2 * err.mean())
    return {"w": w, "b": b}, loss


def client_update(site: str, current_round: int, params: Mapping[str, np.ndarray],
                  byzantine: str = "") -> Tuple[Params, float]:
    """(model, loss) that `site` sends in round `current_round` (0-based) from the global `params`."""
    model, loss = train(params, *local_data(site))
    if site == byzantine:
        fill = 1e4 if current_round == 0 else np.nan
        model = {k: np.full_like(v, fill) for k, v in model.items()}
    return model, loss


def main() -> None:
    import nvflare.client as flare
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

    parser = argparse.ArgumentParser()
    parser.add_argument("--byzantine", default="", help="the site that attacks (e.g. site-4)")
    args = parser.parse_args()

    flare.init()
    site = flare.get_site_name()
    while flare.is_running():
        received = flare.receive()  # an FLModel: params (dict of arrays or lists), current_round
        if received is None:
            break
        model, loss = client_update(site, received.current_round, received.params, args.byzantine)
        flare.send(FLModel(params=model, params_type=ParamsType.FULL, metrics={"loss": loss},
                           meta={"NUM_STEPS_CURRENT_ROUND": LOCAL_STEPS}))


if __name__ == "__main__":
    main()
