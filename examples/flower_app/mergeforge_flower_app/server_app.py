"""The ServerApp: FedAvg replaced by MergeStrategy, scored on both partitions after each round."""

from __future__ import annotations

import json

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from mergeforge.federated import MergeStrategy
from mergeforge_flower_app.task import make_model, mse, test_data

app = ServerApp()


def central_evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
    model = make_model()
    model.load_state_dict(arrays.to_torch_state_dict())
    return MetricRecord({"mse": mse(model, *test_data())})


@app.main()
def main(grid: Grid, context: Context) -> None:
    strategy = MergeStrategy(str(context.run_config["method"]), fraction_evaluate=0.0, min_train_nodes=2,
                             min_available_nodes=2)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(make_model().state_dict()),
                            num_rounds=int(context.run_config["num-server-rounds"]), evaluate_fn=central_evaluate)
    curve = {server_round: metrics["mse"] for server_round, metrics in result.evaluate_metrics_serverapp.items()}
    print("mergeforge-flower-app: mse per round", json.dumps(curve))
    print("mergeforge-flower-app: rejections", strategy.rejections)
