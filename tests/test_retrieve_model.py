"""intent.retrieve on the embedded model: a real run, its export, and predict with no dataset in reach."""

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import optimize.data
from optimize.cli import main

pytestmark = pytest.mark.model


def test_a_retrieval_run_exports_a_program_that_needs_no_dataset(tmp_path, root, monkeypatch):
    """Fails if the run does not narrow the model's choices to retrieved labels (an answer outside the
    neighbours' labels), if the export does not carry the retrieval pool (predict then has nothing to
    retrieve from: another prompt, other tokens, or an error), or if it reads the dataset to predict."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(root / "tests/data/retrieve.toml"), "--quiet"]) == 0
    mlflow.set_tracking_uri(uri)
    exp = MlflowClient().get_experiment_by_name("retrieve-export")
    (run,) = MlflowClient().search_runs([exp.experiment_id], "tags.`chainopt.kind` = 'child'")
    assert run.data.params["data.train_size"] == "400"
    assert main(["export", run.info.run_id, "--out", str(tmp_path / "export"), "--quiet"]) == 0
    state = json.loads((tmp_path / "export" / "program.json").read_text())
    assert len(state["retrieve"]["examples"]) == 400 and state["settings"]["k"] == 4

    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="predictions.json")
    table = json.loads(open(path).read())
    recorded = sorted((dict(zip(table["columns"], row)) for row in table["data"]), key=lambda r: r["index"])
    assert len(recorded) == 4 and all(r["predicted"] for r in recorded)

    # No dataset from here on: the vendored data folder is gone, and we are somewhere else.
    monkeypatch.setattr(optimize.data, "DATA_DIR", tmp_path / "no-datasets")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["predict", str(tmp_path / "export"), "--output", "answers.jsonl", "--quiet"]) == 0
    answers = [json.loads(line) for line in (elsewhere / "answers.jsonl").read_text().splitlines()]
    assert [a["intent"] for a in answers] == [r["predicted"] for r in recorded]
    assert [a["tokens"] for a in answers] == \
        [r["input_tokens_computed"] + r["input_tokens_reused"] + r["output_tokens"] for r in recorded]
