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
