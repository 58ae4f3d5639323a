"""Which aggregator trains the best global model when clients hold different skills? FedAvg
against merge methods (task arithmetic, TIES, DARE-TIES) and robust statistics (median, trimmed
mean), round by round, on the tiny zoo.

    python benchmarks/federated_zoo.py [--clients 6] [--rounds 5] [--local-steps 40] [--out DIR]
    python benchmarks/federated_zoo.py --malicious 1 --scale -10    # one client poisons its update
    python benchmarks/federated_zoo.py --upload topk --density 0.1  # clients send 10% of their update
    python benchmarks/federated_zoo.py --alpha 0.5                  # a Dirichlet(0.5) split of every skill

Every aggregator runs the same federation (``mergeforge.federated.simulation.run_scenario``): the
same non-IID shards (each client holds ``--skills-per-client`` of the zoo's skills, disjoint
training examples), the same sampled clients per round and the same local training seeds, so
the curves differ only by the aggregation. Two references come with them: centralised training
on the pooled data with the same steps per round, and a one-shot merge (each aggregator) of the
clients trained alone for all the steps. Prints a Markdown table of mean exact-match accuracy
per round (round 0 is the zoo's base model), MB communicated and wall time; writes
``results.json`` and ``accuracy.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

AGGREGATORS = [
    {"method": "linear", "name": "fedavg"},
    {"method": "task_arithmetic"},
    {"method": "ties", "parameters": {"density": 0.5}},
    {"method": "dare_ties", "parameters": {"density": 0.5}},
    {"method": "median"},
    {"method": "trimmed_mean", "parameters": {"trim": 0.2}},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default=None, help="a built zoo folder (default: the cached tiny zoo)")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--skills-per-client", type=int, default=2)
    parser.add_argument("--alpha", type=float, default=None,
                        help="a Dirichlet(alpha) split of every skill over the clients instead of whole skills")
    parser.add_argument("--fraction-train", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=40)  # R·E = 200: one zoo expert's steps
    parser.add_argument("--examples-per-client", type=int, default=200)
    parser.add_argument("--eval-examples", type=int, default=64)
    parser.add_argument("--malicious", type=int, default=0, help="the first N clients send global + scale·update")
    parser.add_argument("--scale", type=float, default=-10.0, help="the malicious clients' update scale")
    parser.add_argument("--upload", choices=["dense", "topk", "dare"], default="dense", help="what clients send")
    parser.add_argument("--density", type=float, default=0.1, help="share of each update sent (topk, dare)")
    parser.add_argument("--seed", type=int, default=0, help="client draws, local batch orders, DARE's masks")
    parser.add_argument("--methods", default=None, help="comma-separated labels of AGGREGATORS to run (default: all)")
    parser.add_argument("--out", type=Path, default=Path("federated-results"))
    args = parser.parse_args()

    from mergeforge.federated.scenario import load_scenario
    from mergeforge.federated.simulation import run_scenario, summary, write_report

    chosen = [a for a in AGGREGATORS if not args.methods or (a.get("name") or a["method"]) in args.methods.split(",")]
    scenario = load_scenario({
        "zoo": args.zoo, "clients": args.clients, "skills_per_client": args.skills_per_client,
        "fraction_train": args.fraction_train, "rounds": args.rounds, "local_steps": args.local_steps,
        "examples_per_client": args.examples_per_client, "eval_examples": args.eval_examples, "aggregators": chosen,
        "malicious": {"clients": args.malicious, "scale": args.scale} if args.malicious else None, "references": True, "seed": args.seed,
        "upload": {"kind": args.upload, "density": args.density},
        "split": {"kind": "dirichlet", "alpha": args.alpha} if args.alpha is not None else {"kind": "skills"},
    })
    logging.getLogger("flwr").setLevel(logging.WARNING)
    result = run_scenario(scenario, progress=print)
    paths = write_report(result, args.out)
    print(summary(result))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main()
