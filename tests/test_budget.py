"""A run token ceiling stops the run cleanly: marked in MLflow, partial metrics kept, exit code 3."""

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from optimize.cli import main
from optimize.tracking import read_metrics

pytestmark = pytest.mark.model


def test_run_budget_stops_cleanly(tmp_path, monkeypatch, root, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(root / "tests/data/budget.toml"), "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert out["runs"][0]["stopped"] == "run_token_budget"
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name("budget")
    (child,) = client.search_runs([exp.experiment_id], "tags.`chainopt.kind` = 'child'")
    m = read_metrics(child)
    assert child.info.status == "FINISHED" and child.data.tags["chainopt.stopped"] == "run_token_budget"
    assert m["planned"] == 6 and 1 <= m["attempted"] < 6 and m["n"] == m["attempted"]
    assert m["budget_exceeded_chains"] >= 1
    # The ceiling is checked before each call: it is crossed by at most the one call that was under way.
    assert 2000 <= m["tokens_total"] < 2000 + 1000
    rows = json.load(open(mlflow.artifacts.download_artifacts(run_id=child.info.run_id,
                                                              artifact_path="predictions.json")))
    assert len(rows["data"]) == m["attempted"]


def test_run_budget_reached_while_compiling_stops_that_run_cleanly_and_the_sweep_goes_on(tmp_path, monkeypatch,
                                                                                        root, capsys):
    # Before: BudgetExceeded escaped the compile, the child ended FAILED without metrics and the
    # zero-shot combination after it never ran.
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(root / "tests/data/budget-compile.toml"), "--json"]) == 3
    out = json.loads(capsys.readouterr().out)
    assert [(r["optimizer"], r["stopped"]) for r in out["runs"]] == [("bootstrap_fewshot", "run_token_budget"),
                                                                     ("none", "")]
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name("budget-compile")
    runs = {r.data.params["optimizer.name"]: r for r in
            client.search_runs([exp.experiment_id], "tags.`chainopt.kind` = 'child'")}
    stopped, zero_shot = runs["bootstrap_fewshot"], runs["none"]
    assert stopped.info.status == "FINISHED" and stopped.data.tags["chainopt.stopped"] == "run_token_budget"
    m = read_metrics(stopped)
    assert 2000 <= m["compile_tokens"] < 2000 + 1000 and "accuracy" not in m  # partial: compile only
    assert zero_shot.info.status == "FINISHED" and read_metrics(zero_shot)["n"] == 2
