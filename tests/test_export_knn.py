"""A KNN program run, exported, predicted again and served as a registered MLflow model in a new process.

One tiny real run (tests/data/knn.toml: knn_fewshot, k = 2, TF-IDF) is exported and registered once for
the module. KNNFewShot chooses its demos per input at call time, so its saved state holds no demos: the
export must rebuild the retriever from the training split when it is loaded.
"""

import json
import os
import subprocess
import sys

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from optimize.cli import main

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


SERVE = """
import json, sys
import mlflow, pandas
model = mlflow.pyfunc.load_model(sys.argv[1])
answers = model.predict(pandas.DataFrame({"query": json.loads(sys.argv[2])}))
print("ANSWERS " + json.dumps(list(answers)))
"""


def test_the_registered_model_loads_and_answers_in_a_fresh_process(exported, root):
    """`mlflow.pyfunc.load_model("models:/<name>/<version>")` in a new Python process (only the tracking
    store and caches in common) answers the same labels as `chainopt predict`. Fails if the registered
    model cannot be loaded from the store (missing code or artifacts, a pickle), if it needs state of the
    process that exported it, or if it answers differently (another model, no KNN demos)."""
    reg = exported["manifest"]["registered"]
    queries = [a["query"] for a in exported["answers"]]
    env = {**os.environ, "MLFLOW_TRACKING_URI": exported["uri"]}
    done = subprocess.run([sys.executable, "-c", SERVE, f"models:/{reg['name']}/{reg['version']}",
                           json.dumps(queries)], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("ANSWERS "))
    served = json.loads(line.removeprefix("ANSWERS "))
    labels = set(exported["manifest"]["task"]["labels"])
    assert len(served) == len(queries) and set(served) <= labels
    assert served == [a["intent"] for a in exported["answers"]]


def test_predict_keeps_dspys_compile_chatter_to_itself(exported, tmp_path, capfd):
    """A KNN program compiles a BootstrapFewShot at every call and DSPy prints 'Bootstrapped 0 full traces…'
    each time. Fails if that reaches the terminal without -v."""
    assert main(["predict", str(exported["out"]), "--output", str(tmp_path / "again.jsonl")]) == 0
    captured = capfd.readouterr()
    assert "wrote 3 answers" in captured.out and "Bootstrapped" not in captured.out + captured.err
