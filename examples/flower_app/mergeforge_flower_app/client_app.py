"""The ClientApp: trains the global model on the node's partition and replies with the model and
its example count, as Flower's templates do; nothing in it knows about mergeforge."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from mergeforge_flower_app.task import client_data, fit, make_model

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    model = make_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = client_data(int(context.node_config["partition-id"]))
    loss = fit(model, x, y, steps=int(context.run_config["local-steps"]))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss, "num-examples": len(x)})})
    return Message(content=content, reply_to=msg)
