"""The store's view of a sweep: which children are on the Pareto front."""

import mlflow

from optimize import tracking


def _child(experiment_id: str, name: str, metrics: dict[str, float]) -> None:
    with mlflow.start_run(run_name=name, nested=True, experiment_id=experiment_id,
                          tags={tracking.TAG_KIND: "child"}):
        mlflow.log_metrics(metrics)


def test_a_run_served_from_the_response_cache_is_never_on_the_pareto_front(mlflow_store):
    # Its tokens are replayed, but its seconds are not what computing the answers took: were it eligible,
    # a re-run from the cache would dominate the run that paid for the answers.
    experiment_id = tracking.setup("pareto-cache", mlflow_store)
    with mlflow.start_run(experiment_id=experiment_id) as parent:
        _child(experiment_id, "computed", {"accuracy": 0.5, "seconds_per_success": 2.0, "cache_hits": 0})
        _child(experiment_id, "cached", {"accuracy": 0.5, "seconds_per_success": 0.1, "cache_hits": 10})
        _child(experiment_id, "worse", {"accuracy": 0.4, "seconds_per_success": 3.0})
    rows = {r["name"]: r["pareto"] for r in tracking.child_rows(experiment_id, parent.info.run_id)}
    assert rows == {"computed": True, "cached": False, "worse": False}
