"""The ServerApp: Flower's training loop with a fedagg robust rule (FedaggStrategy).

Saves the final global model to ``result-path`` (an ``.npz`` of the named
arrays) and, next to it, ``<result-path>.json`` with the server-side accuracy
per round, the aggregated train metrics (fedagg's included) and what the rule
did in the last round.
"""

import json
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log

from fedagg.integrations.flower import FedaggStrategy

from .task import evaluate, initial_arrays, load_test_data, settings

app = ServerApp()


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    """Accuracy of the global model on the server's held-out data, before round 1 and after each round."""
    loss, accuracy = evaluate({key: array.numpy() for key, array in arrays.items()}, *load_test_data())
    return MetricRecord({"accuracy": accuracy, "loss": loss})


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = settings(context.run_config)
    strategy = FedaggStrategy(
        str(config["rule"]), int(config["f"]),     # "trimmed_mean", f = 2: at least 5 nodes (n > 2f)
        invalid="drop", nonfinite="exclude",       # untrusted nodes: malformed or NaN replies are left out
        fraction_evaluate=float(config["fraction-evaluate"]),
    )
    start = ArrayRecord({key: Array(value) for key, value in initial_arrays().items()})
    result = strategy.start(grid=grid, initial_arrays=start, num_rounds=int(config["num-server-rounds"]),
                            evaluate_fn=central_evaluate)

    # result.arrays: the last aggregated global model (empty if every round was skipped)
    path = Path(str(config["result-path"])).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    final = result.arrays if len(result.arrays) else start
    with open(path, "wb") as fh:  # exactly `path` (np.savez(name) would append ".npz" to another suffix)
        np.savez(fh, **{key: array.numpy() for key, array in final.items()})

    report = strategy.last_report  # the last round: node ids in the order the rule saw them
    info = report.info if report is not None else None
    summary = {
        "rule": strategy.rule,
        "f": strategy.f,
        "min-nodes": strategy.min_nodes,
        "accuracy": {r: float(m["accuracy"]) for r, m in result.evaluate_metrics_serverapp.items()},
        "train-metrics": {r: dict(m) for r, m in result.train_metrics_clientapp.items()},
        "last-round": None if report is None else {
            "node-ids": report.node_ids,
            "dropped": {str(node): why for node, why in report.dropped.items()},
            # info.selected / info.excluded hold positions in report.node_ids; report.nodes() maps them to ids
            "excluded-node-ids": report.nodes(info.excluded) if info is not None else [],
            "selected-node-ids": (report.nodes(info.selected)
                                  if info is not None and info.selected is not None else None),
        },
    }
    Path(f"{path}.json").write_text(json.dumps(summary, indent=1))
    log(INFO, "fedagg example: final accuracy %.3f; global model saved to %s (summary: %s.json)",
        summary["accuracy"].get(int(config["num-server-rounds"]), float("nan")), path, path)
