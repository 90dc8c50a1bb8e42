"""A sweep in a driver process of its own, printed as JSON: on a two-node Ray cluster it starts
(ray.cluster_utils.Cluster, one CPU each), or at the experiment's [execution] address when it names one.

Run by tests/test_ray.py: a Cluster, or a Ray Client connection, and the session's `ray.init` cannot share
one process. Usage: python tests/ray_driver.py '<experiment as JSON>'
"""

from __future__ import annotations

import json
import sys

from optimize.experiment import ExperimentResult

# Results must match across backends, costs and timings aside: these metrics, and each chain's answer.
SAME = ("n", "successes", "accuracy", "attempted", "planned", "errors", "error_rate", "parse_failures",
        "validator_failures", "retries", "steps", "lm_calls", "output_tokens", "tokens_total", "tokens_per_success")


def answers(result: ExperimentResult) -> list:
    """Per trial: its name, each chain's (index, id, answer, success, steps, error, tokens), and SAME metrics."""
    return [[t.trial.run_name,
             [[r.index, r.example_id, r.predicted, r.success, r.steps, r.error, r.usage.tokens] for r in t.records],
             {k: t.metrics[k] for k in SAME}] for t in result.trials]


def main(experiment: str) -> None:
    from optimize.config import parse_experiment
    from optimize.experiment import run_experiment

    exp = parse_experiment(json.loads(experiment))
    lines: list[str] = []
    if exp.execution.address:  # run_experiment joins it, and leaves it
        result = run_experiment(exp, progress=lines.append)
        print(json.dumps({"lines": lines, "answers": answers(result)}))
        return
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        result = run_experiment(exp, progress=lines.append)
        nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
        print(json.dumps({"lines": lines, "answers": answers(result), "nodes": nodes}))
    finally:
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
