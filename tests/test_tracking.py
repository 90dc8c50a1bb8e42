"""The store's view of a sweep: which children are on the Pareto front."""

import os
import signal

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from sqlalchemy import event
from sqlalchemy.engine import Engine

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


def test_ctrl_c_inside_a_store_write_waits_for_it_and_the_run_ends_failed(mlflow_store, ctrl_c):
    # CI saw Ctrl-C land inside SQLite's INSERT of a dataset input: the KeyboardInterrupt left the write lock
    # taken, so marking the run FAILED hit "database is locked" and the command exited 1 with a traceback.
    # Here the signal is sent from inside that very INSERT.
    experiment_id = tracking.setup("held-write", mlflow_store)
    sent = []

    def interrupt_the_insert(conn, cursor, statement, *args) -> None:
        if statement.startswith("INSERT INTO datasets") and not sent:
            sent.append(statement)
            os.kill(os.getpid(), signal.SIGINT)

    event.listen(Engine, "before_cursor_execute", interrupt_the_insert)
    try:
        with pytest.raises(KeyboardInterrupt):
            with tracking.child_run(experiment_id, "interrupted", "hash") as run_id:
                tracking.log_datasets([tracking.DataSlice("toy.train", [{"q": "a", "a": "b"}], "toy.jsonl",
                                                          "training", "a")])
                raise AssertionError("the block went on after Ctrl-C")
    finally:
        event.remove(Engine, "before_cursor_execute", interrupt_the_insert)
    assert sent, "no dataset was inserted: the test exercised nothing"
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FAILED"
    assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["toy.train"]  # the write finished whole
