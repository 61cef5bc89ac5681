"""examples/flower: the Flower App shipped in the repository, run for real.

``test_example_in_a_flower_deployment`` deploys Flower on 127.0.0.1 the way
examples/flower/README.md says (``flower-superlink
--disable-runtime-dependency-installation``, six ``flower-supernode`` with
``partition-id`` / ``num-partitions``, ``flwr run examples/flower``), with the
app's own settings but 2 rounds: trimmed mean with f = 2, the last two of the
six nodes flipping the sign of their update (x4). The saved global model must
equal, bit for bit, the same rounds replayed here with ``fedagg.aggregate`` on
the clients' updates (the example's own ``task.client_update``, deterministic),
and reach 90% on the held-out data, where FedAvg under the same attack falls
below chance. ``test_example_with_run_simulation`` runs ``run_simulation.py``
where Ray (``flwr[simulation]``) is installed. The other tests check the
ClientApp's replies, the run config, and that the docs' snippets are the
example's code.
"""

import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import fedagg

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"'click\.", category=DeprecationWarning)  # see test_integrations_flower
    if not os.environ.get("FEDAGG_REQUIRE_FLOWER"):  # CI sets it: there, no Flower is a failure
        pytest.importorskip("flwr")
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict

    from test_integrations_flower import run_flower_app  # the loopback deployment, shared

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "flower"
N_NODES = 6
ROUNDS = 2  # of the app's 5 (each round starts six ClientApp processes: ~10 s on 2 cores)
RUN_TIMEOUT = 100  # s, the whole `flwr run`; ~40 s on 2 cores


@pytest.fixture(scope="module")
def example():
    """The example's modules (task, client_app), imported from examples/flower."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        from fedagg_flower_example import client_app, task

        yield task, client_app
    finally:
        sys.path.remove(str(EXAMPLE))
        for name in [m for m in sys.modules if m.split(".")[0] == "fedagg_flower_example"]:
            del sys.modules[name]


def flat(arrays):
    return np.concatenate([np.asarray(arrays[k], dtype=np.float32).ravel() for k in ("weight", "bias")])


def replay(task, config, n_nodes, rule, f):
    """The example's rounds computed plainly: task.client_update on every node, fedagg.aggregate on the deltas."""
    g = task.initial_arrays()
    shapes = {k: v.shape for k, v in g.items()}
    for _ in range(int(config["num-server-rounds"])):
        gv = flat(g)
        deltas = np.stack([flat(task.client_update(g, pid, n_nodes, config)[0]) - gv for pid in range(n_nodes)])
        v = gv + fedagg.aggregate(deltas, rule, f)
        g = {"weight": v[:-shapes["bias"][0]].reshape(shapes["weight"]), "bias": v[-shapes["bias"][0]:].copy()}
    return g


def accuracy(task, arrays):
    return task.evaluate(arrays, *task.load_test_data())[1]


def test_pyproject_run_config_is_tasks_defaults(example):
    task, _ = example
    try:
        import tomllib
    except ImportError:  # Python < 3.11; flwr depends on tomli
        import tomli as tomllib
    config = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())
    assert config["tool"]["flwr"]["app"]["config"] == task.DEFAULTS  # run_simulation runs on DEFAULTS


@pytest.mark.parametrize("name", ["server_app", "client_app"])
def test_docs_snippets_are_the_examples_code(name):
    """docs/integrations.md shows server_app.py and client_app.py: every code line there is in the file."""
    doc = (EXAMPLE.parent.parent / "docs" / "integrations.md").read_text()
    at = doc.index(f"from `{name}.py`")
    block = doc[doc.index("```python\n", at) + len("```python\n"):]
    block = block[:block.index("```")]
    source = {line.split("  #")[0].strip() for line in (EXAMPLE / "fedagg_flower_example" / f"{name}.py").read_text()
              .splitlines()}
    code = [line.split("  #")[0].strip() for line in block.splitlines()]
    missing = [line for line in code if line and not line.startswith("#") and "..." not in line and line not in source]
    assert not missing, f"lines of the docs' {name}.py snippet not in examples/flower: {missing}"


def test_client_app_replies_what_the_strategy_reads(example, monkeypatch):
    """The ClientApp's train and evaluate replies, built as Flower hands them a message."""
    from flwr.supercore.task_identity import TaskIdentity

    for key in ("_task_id", "_run_id", "_node_id"):  # what a ClientApp process has set
        monkeypatch.setattr(TaskIdentity, key, 1)
    task, client_app = example
    g = task.initial_arrays()
    content = RecordDict({"arrays": ArrayRecord({k: Array(v) for k, v in g.items()}), "config": ConfigRecord()})
    msg = Message(content, dst_node_id=1, message_type="train")
    context = Context(run_id=1, node_id=1, node_config={"partition-id": 5, "num-partitions": 6}, state=RecordDict(),
                      run_config={})
    reply = client_app.train(msg, context)
    arrays, metrics = reply.content["arrays"], reply.content["metrics"]
    assert list(arrays) == ["weight", "bias"]
    assert all(arrays[k].numpy().dtype == g[k].dtype and arrays[k].numpy().shape == g[k].shape for k in g)
    assert metrics["num-examples"] == task.SAMPLES_PER_NODE and metrics["train-loss"] > 0
    want, _, _ = task.client_update(g, 5, 6, task.DEFAULTS)  # node 5 of 6 is Byzantine by default
    assert np.array_equal(flat({k: arrays[k].numpy() for k in arrays}), flat(want))
    honest, _ = task.train(g, *task.load_partition(5), 5, 0.1)
    assert np.allclose(flat(want) - flat(g), -4.0 * (flat(honest) - flat(g)), rtol=1e-5, atol=1e-7)

    reply = client_app.evaluate(Message(content, dst_node_id=1, message_type="evaluate"), context)
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == task.SAMPLES_PER_NODE and 0 <= metrics["eval-accuracy"] <= 1


@pytest.mark.slow
def test_example_in_a_flower_deployment(example, tmp_path):
    task, _ = example
    result = tmp_path / "out" / "global-model.npz"
    overrides = {"result-path": str(result), "num-server-rounds": ROUNDS}  # flwr run --run-config
    run = run_flower_app(tmp_path, EXAMPLE, N_NODES, done=Path(f"{result}.json"), run_config=overrides,
                         timeout=RUN_TIMEOUT)
    print(f"Flower example: {run['seconds']:.1f} s")
    summary = json.loads(Path(f"{result}.json").read_text())
    with np.load(result) as z:
        got = {k: z[k] for k in z.files}

    config = {**task.DEFAULTS, **overrides}
    assert (summary["rule"], summary["f"], summary["min-nodes"]) == ("trimmed_mean", 2, 5)
    assert "trimmed_mean with f = 2 needs at least 5 replies per round" in run["log"]  # logged at start
    rounds = int(config["num-server-rounds"])
    assert sorted(summary["train-metrics"]) == [str(r) for r in range(1, rounds + 1)]
    assert all(m["fedagg-n"] == N_NODES for m in summary["train-metrics"].values())  # every node, every round
    assert len(summary["last-round"]["node-ids"]) == N_NODES and summary["last-round"]["selected-node-ids"] is None

    want = replay(task, config, N_NODES, "trimmed_mean", 2)
    assert list(got) == ["weight", "bias"]
    for k in got:
        assert got[k].dtype == np.float32 and got[k].shape == want[k].shape
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert summary["accuracy"][str(rounds)] == pytest.approx(accuracy(task, got))
    assert accuracy(task, got) >= 0.9
    # FedAvg under the same attack: the two sign-flippers outweigh the four honest nodes
    assert accuracy(task, replay(task, config, N_NODES, "mean", 0)) < 1 / task.NUM_CLASSES
    assert summary["accuracy"]["0"] < 0.5  # where it started


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None and not os.environ.get("FEDAGG_REQUIRE_FLOWER"),
                    reason="run_simulation needs Flower's Simulation Runtime: pip install 'flwr[simulation]==1.42.0'")
def test_example_with_run_simulation(example, tmp_path):
    task, _ = example
    env = dict(os.environ, FLWR_DISABLE_UPDATE_CHECK="1", FLWR_TELEMETRY_ENABLED="0", RAY_DISABLE_USAGE_STATS="1")
    try:
        run = subprocess.run([sys.executable, str(EXAMPLE / "run_simulation.py")], cwd=tmp_path, env=env,
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT, start_new_session=True)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"run_simulation.py ran past {RUN_TIMEOUT} s:\n{(e.stdout or b'').decode(errors='replace')[-4000:]}")
    text = run.stdout.decode(errors="replace") + run.stderr.decode(errors="replace")
    result = tmp_path / task.DEFAULTS["result-path"]  # relative to the working directory
    assert run.returncode == 0 and result.exists(), text[-6000:]
    with np.load(result) as z:
        got = {k: z[k] for k in z.files}
    want = replay(task, task.DEFAULTS, N_NODES, "trimmed_mean", 2)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert accuracy(task, got) >= 0.9
