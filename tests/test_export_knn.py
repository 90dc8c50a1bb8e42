"""A KNN program run, exported, predicted again and served as a registered MLflow model in a new process.

One tiny real run (tests/data/knn.toml: knn_fewshot, k = 2, TF-IDF) is exported and registered once for
the module. KNNFewShot chooses its demos per input at call time, so its saved state holds no demos: the
export carries the training pool (pool.jsonl) and rebuilds the retriever from it when it is loaded, with
no dataset in reach.
"""

import functools
import json
import os
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import optimize.data
from optimize.cli import main
from optimize.config import DataConfig

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def exported(tmp_path_factory, root):
    """The finished KNN run, its export folder (registered) and `chainopt predict`'s answers on its test slice."""
    folder = tmp_path_factory.mktemp("knn")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.chdir(folder)
    try:
        assert main(["run", str(root / "tests/data/knn.toml"), "--quiet"]) == 0
        mlflow.set_tracking_uri(uri)
        exp = MlflowClient().get_experiment_by_name("knn-export")
        (run,) = MlflowClient().search_runs([exp.experiment_id], "tags.`chainopt.kind` = 'child'")
        out = folder / "export"
        assert main(["export", run.info.run_id, "--out", str(out), "--quiet"]) == 0
        answers = folder / "answers.jsonl"
        assert main(["predict", str(out), "--output", str(answers), "--quiet"]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        yield {"uri": uri, "run": run, "out": out, "manifest": manifest,
               "answers": [json.loads(line) for line in answers.read_text().splitlines()]}
    finally:
        mp.undo()


def _run_predictions(run_id: str) -> list[dict]:
    """The run's predictions.json (an MLflow table: columns and rows), in example order."""
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="predictions.json")
    with open(path) as handle:
        table = json.load(handle)
    rows = [dict(zip(table["columns"], row)) for row in table["data"]]
    return sorted(rows, key=lambda r: r["index"])


def test_predict_reproduces_the_knn_runs_answers_and_prompts(exported):
    """Same answer and same token count per example as in the run. Fails if loading the export does not
    rebuild the retriever (no demos: shorter prompts, other answers) or rebuilds it from other training
    rows (other demos), or if predict scores another slice than the one the run was measured on."""
    run, answers = exported["run"], exported["answers"]
    assert exported["manifest"]["optimizer"]["name"] == "knn_fewshot"
    assert run.data.params["optimizer.resolved.k"] == "2" and run.data.params["data.train_size"] == "20"
    recorded = _run_predictions(run.info.run_id)
    assert len(recorded) == len(answers) == 3
    assert [a["query"] for a in answers] == [r["input.query"] for r in recorded]
    assert [a["intent"] for a in answers] == [r["predicted"] for r in recorded]
    assert [a["tokens"] for a in answers] == \
        [r["input_tokens_computed"] + r["input_tokens_reused"] + r["output_tokens"] for r in recorded]
    # Two demos in the prompt: each example costs more than its zero-shot prompt would (~750-760 tokens).
    assert min(a["tokens"] for a in answers) > 800


def test_the_export_predicts_from_another_folder_with_no_dataset(exported, tmp_path, monkeypatch):
    """Fails if loading the export reads the dataset (the vendored folder is empty here, and the loaded
    rows are forgotten), if the pool it carries is not the run's whole training split, or if the retriever
    rebuilt from it picks other demos (other answers or token counts than the export's own predict)."""
    pool = [json.loads(line) for line in (exported["out"] / "pool.jsonl").read_text().splitlines()]
    assert len(pool) == 20 and all(row["query"] and row["intent"] for row in pool)
    monkeypatch.setattr(optimize.data, "DATA_DIR", tmp_path / "no-datasets")
    monkeypatch.setattr(optimize.data, "_raw", functools.lru_cache(optimize.data._raw.__wrapped__))
    monkeypatch.setattr(optimize.data, "_labels", functools.lru_cache(optimize.data._labels.__wrapped__))
    monkeypatch.chdir(tmp_path)
    assert main(["predict", str(exported["out"]), "--output", "answers.jsonl", "--quiet"]) == 0
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [(a["intent"], a["tokens"]) for a in answers] == [(a["intent"], a["tokens"]) for a in exported["answers"]]


def test_the_manifest_names_the_dataset_and_its_content_hash(exported):
    """Fails if the manifest gives no digest of the data, or another than the run recorded and the data has."""
    data = exported["manifest"]["data"]
    assert data["dataset"] == "banking77" and "path" not in data
    digest = optimize.data.data_digest(DataConfig(dataset="banking77"))
    assert data["digest"] == exported["run"].data.params["data.digest"] == digest


SERVE = """
import json, pathlib, sys
import mlflow, pandas
import optimize.data
optimize.data.DATA_DIR = pathlib.Path(sys.argv[3])  # no dataset: the model carries its KNN pool
model = mlflow.pyfunc.load_model(sys.argv[1])
answers = model.predict(pandas.DataFrame({"query": json.loads(sys.argv[2])}))
print("ANSWERS " + json.dumps(list(answers)))
"""


def test_the_registered_model_loads_and_answers_in_a_fresh_process(exported, root, tmp_path):
    """`mlflow.pyfunc.load_model("models:/<name>/<version>")` in a new Python process (only the tracking
    store and caches in common), in another folder and with no dataset in reach, answers the same labels as
    `chainopt predict`. Fails if the registered model cannot be loaded from the store (missing code or
    artifacts, a pickle, no KNN pool), if it needs state of the process that exported it, or if it answers
    differently (another model, no KNN demos)."""
    reg = exported["manifest"]["registered"]
    queries = [a["query"] for a in exported["answers"]]
    env = {**os.environ, "MLFLOW_TRACKING_URI": exported["uri"], "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", SERVE, f"models:/{reg['name']}/{reg['version']}",
                           json.dumps(queries), str(tmp_path / "no-datasets")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("ANSWERS "))
    served = json.loads(line.removeprefix("ANSWERS "))
    labels = set(exported["manifest"]["task"]["labels"])
    assert len(served) == len(queries) and set(served) <= labels
    assert served == [a["intent"] for a in exported["answers"]]


def test_export_prints_its_result_and_no_mlflow_notices_unless_verbose(exported, tmp_path, capfd):
    """MLflow prints "Successfully registered model …" and "Created version …" to stderr. Fails if that
    reaches the terminal without -v, or if -v does not show it."""
    run_id = exported["run"].info.run_id
    assert main(["export", run_id, "--out", str(tmp_path / "quiet")]) == 0
    captured = capfd.readouterr()
    assert "registered as MLflow model" in captured.out
    assert "Successfully registered" not in captured.err and "Created version" not in captured.err
    assert main(["export", run_id, "--out", str(tmp_path / "verbose"), "-v"]) == 0
    assert "Created version" in capfd.readouterr().err


def test_predict_keeps_dspys_compile_chatter_to_itself(exported, tmp_path, capfd):
    """A KNN program compiles a BootstrapFewShot at every call and DSPy prints 'Bootstrapped 0 full traces…'
    each time. Fails if that reaches the terminal without -v."""
    assert main(["predict", str(exported["out"]), "--output", str(tmp_path / "again.jsonl")]) == 0
    captured = capfd.readouterr()
    assert "wrote 3 answers" in captured.out and "Bootstrapped" not in captured.out + captured.err
