"""`chainopt run` on a tiny real slice, read back through the MLflow client; then compare, export, predict."""

import json
import math

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from optimize.cli import main
from optimize.tracking import read_metrics

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def finished(tmp_path_factory, root):
    folder = tmp_path_factory.mktemp("e2e")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.chdir(folder)
    assert main(["run", str(root / "tests/data/e2e.toml"), "--json"]) == 0
    yield folder, uri
    mp.undo()


def _children(uri):
    mlflow.set_tracking_uri(uri)
    exp = MlflowClient().get_experiment_by_name("e2e")
    return MlflowClient().search_runs([exp.experiment_id], "tags.`chainopt.kind` = 'child'")


def test_run_records_metrics_params_and_artifacts(finished):
    folder, uri = finished
    runs = _children(uri)
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        m, p = read_metrics(run), run.data.params
        assert m["n"] == 3 and 0 <= m["accuracy"] <= 1
        assert m["parse_failures"] == 0
        assert m["tokens_total"] == m["input_tokens_computed"] + m["input_tokens_reused"] + m["output_tokens"] > 0
        if m["successes"]:
            assert math.isclose(m["tokens_per_success"], m["tokens_total"] / m["successes"])
        else:
            assert math.isinf(m["tokens_per_success"]) and math.isinf(m["seconds_per_success"])
        assert p["model.sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
        assert p["model.quantization"] == "Q4_1" and p["program.name"] == "intent.predict"
        assert p["data.dataset"] == "banking77" and p["seed"] == "0" and p["eval.split"] == "test"
        assert run.data.tags["dspy.version"] == "3.4.1"
        names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
        assert {"program.json", "predictions.json", "trajectory.json", "trial.json", "task.json"} <= names
        state = json.loads(open(mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                                                    artifact_path="program.json")).read())
        assert "signature" in state["classify"] and "demos" in state["classify"]
    fewshot = next(r for r in runs if r.data.params["optimizer.name"] == "labeled_fewshot")
    assert fewshot.data.params["optimizer.resolved.k"] == "2"
    assert "break_even_queries_seconds" in fewshot.data.metrics


def test_no_trace_is_written_when_traces_are_off(finished):
    """e2e.toml leaves `[tracking] traces` at its default (off). Fails if a run writes traces anyway."""
    folder, uri = finished
    (run, *_) = _children(uri)
    assert mlflow.search_traces(locations=[run.info.experiment_id], return_type="list") == []


def test_parent_has_pareto_plot_and_children_are_marked(finished):
    folder, uri = finished
    runs = _children(uri)
    parent_id = runs[0].data.tags["mlflow.parentRunId"]
    assert "pareto.png" in {a.path for a in MlflowClient().list_artifacts(parent_id)}
    assert {r.data.tags["chainopt.pareto"] for r in runs} <= {"true", "false"}
    # Only a run with a success has a cost per success to trade: the front is empty when none succeeded.
    solved = {r.info.run_id for r in runs if r.data.metrics["successes"] > 0}
    marked = {r.info.run_id for r in runs if r.data.tags["chainopt.pareto"] == "true"}
    assert marked <= solved and bool(marked) == bool(solved)


def test_rerun_reuses_finished_children(finished, root, capsys):
    folder, uri = finished
    before = {r.info.run_id for r in _children(uri)}
    assert main(["run", str(root / "tests/data/e2e.toml")]) == 0
    assert "finished earlier, reused" in capsys.readouterr().err
    assert {r.info.run_id for r in _children(uri)} == before


def test_compare_table_sorted_by_cost(finished, root, capsys):
    assert main(["compare", str(root / "tests/data/e2e.toml"), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    costs = [r["cost"] for r in rows]
    assert len(rows) == 2 and costs == sorted(costs, key=lambda c: math.inf if c in (None, "inf") else c)
    assert any(r["pareto"] for r in rows) == any(r["metrics"]["successes"] > 0 for r in rows)


def test_export_and_predict_reproduce_accuracy(finished, tmp_path, capsys):
    folder, uri = finished
    best = max(_children(uri), key=lambda r: r.data.metrics["accuracy"])
    out = tmp_path / "export"
    assert main(["export", best.info.run_id, "--out", str(out), "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["model"]["sha256"].startswith("b179c952")
    assert manifest["registered"]["version"] == "1"
    assert (out / "program.json").exists() and (out / "eval.jsonl").exists()
    version = MlflowClient().get_model_version(manifest["registered"]["name"], "1")
    assert float(version.tags["accuracy"]) == best.data.metrics["accuracy"]
    answers = tmp_path / "answers.jsonl"
    assert main(["predict", str(out), "--output", str(answers), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["accuracy"] == best.data.metrics["accuracy"]
    assert len(answers.read_text().splitlines()) == 3


def test_predict_refuses_a_different_model_file(finished, tmp_path, capsys, smollm_info):
    folder, uri = finished
    run = _children(uri)[0]
    out = tmp_path / "export"
    assert main(["export", run.info.run_id, "--out", str(out), "--no-register"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["model"]["sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["predict", str(out), "--output", str(tmp_path / "a.jsonl")]) == 2
    assert "use --force" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists()
