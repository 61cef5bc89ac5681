"""The ClientApp: local training on the node's synthetic data (NumPy only).

What a train reply must hold for ``FedaggStrategy`` (as for Flower's FedAvg):

- ``"arrays"``: one ``ArrayRecord`` with the trained model, the same keys,
  shapes and floating-point dtypes as the global model it received (full
  weights, not the update: the strategy subtracts the global model itself);
- ``"metrics"``: one ``MetricRecord`` holding ``"num-examples"`` (the update's
  weight for the rules that take weights; the robust rules ignore it) and any
  other numeric metrics, which Flower averages over the updates the rule used.
"""

from flwr.app import Array, ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from .task import client_update, evaluate as evaluate_model, load_partition, settings

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = settings(context.run_config)
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    global_arrays = {key: array.numpy() for key, array in msg.content["arrays"].items()}

    trained, loss, num_examples = client_update(global_arrays, partition_id, num_partitions, config)

    content = RecordDict({
        "arrays": ArrayRecord({key: Array(value) for key, value in trained.items()}),
        "metrics": MetricRecord({"num-examples": num_examples, "train-loss": loss}),
    })
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    arrays = {key: array.numpy() for key, array in msg.content["arrays"].items()}
    x, y = load_partition(int(context.node_config["partition-id"]))
    loss, accuracy = evaluate_model(arrays, x, y)
    metrics = MetricRecord({"num-examples": len(x), "eval-loss": loss, "eval-accuracy": accuracy})
    return Message(RecordDict({"metrics": metrics}), reply_to=msg)
