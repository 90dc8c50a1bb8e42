"""A run's compiled program as an MLflow 3 logged model, on the embedded model: logged with its run (pyfunc
from code, signature, input example, requirements that install chainopt, the GGUF named by sha256 and not
copied), linked to its registered prompt, loaded by `mlflow.pyfunc.load_model` in a fresh process that
answers as the run did, and registered by `chainopt export` with its accuracy and cost per success as tags.

One tiny real run (intent.predict, labelled 2-shot, 2 test examples) for the module.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

import optimize
from optimize import tracking
from optimize.cli import main
from optimize.llm.models import describe

pytestmark = pytest.mark.model

CONFIG = """
name = "pyfunc"
seeds = [0]
[model]
max_tokens = 48
cache = false
[data]
dataset = "banking77"
train = 4
test = 2
seed = 29
[[programs]]
name = "intent.predict"
[[optimizers]]
name = "labeled_fewshot"
settings = { k = 2 }
[eval]
threads = 2
"""


@pytest.fixture(scope="module")
def logged(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    (folder / "pyfunc.toml").write_text(CONFIG)
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.chdir(folder)
    try:
        assert main(["run", str(folder / "pyfunc.toml"), "--quiet"]) == 0
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        exp = client.get_experiment_by_name("pyfunc")
        (run,) = client.search_runs([exp.experiment_id], "tags.`chainopt.kind` = 'child'")
        model = client.get_logged_model(run.data.tags[tracking.TAG_MODEL_ID])
        local = Path(mlflow.artifacts.download_artifacts(model.artifact_location, dst_path=str(folder / "model")))
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="predictions.json")
        table = json.loads(Path(path).read_text())
        predictions = sorted((dict(zip(table["columns"], row)) for row in table["data"]), key=lambda r: r["index"])
        yield {"uri": uri, "folder": folder, "run": run, "model": model, "local": local, "predictions": predictions}
    finally:
        mp.undo()


def test_the_run_logs_its_program_as_a_pyfunc_model_with_signature_example_and_requirements(logged):
    """Fails if the run has no logged model, if it is not a pyfunc model from code, has no signature or
    input example, does not require chainopt, or copies the GGUF instead of naming it by sha256."""
    model, local, run = logged["model"], logged["local"], logged["run"]
    assert model.source_run_id == run.info.run_id and model.name == "program"
    meta = mlflow.models.Model.load(str(local / "MLmodel"))
    assert meta.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert [c["name"] for c in meta.signature.inputs.to_dict()] == ["query"]
    example = json.loads((local / "input_example.json").read_text())
    assert example["columns"] == ["query"] and len(example["data"]) == 2
    assert f"chainopt=={optimize.__version__}" in (local / "requirements.txt").read_text().split()
    manifest = json.loads((local / "artifacts" / "export" / "manifest.json").read_text())
    assert manifest["model"]["sha256"] == describe("smollm2-135m").sha256 and manifest["run_id"] == run.info.run_id
    sizes = [p.stat().st_size for p in local.rglob("*") if p.is_file()]
    assert max(sizes) < 1_000_000 and not list(local.rglob("*.gguf"))  # the 98 MB model file is not copied


def test_the_logged_model_is_linked_to_the_registered_prompt_and_carries_the_metrics(logged):
    """Fails if the predictor's prompt (instruction and its two demos) is not registered, or not linked to
    the run and to the model, or if the model shows no accuracy measured on the test slice."""
    run, model, local = logged["run"], logged["model"], logged["local"]
    (link,) = json.loads(run.data.tags["mlflow.linkedPrompts"])
    prompt = MlflowClient().load_prompt(f"prompts:/{link['name']}/{link['version']}")
    assert "Demos (2):" in prompt.template
    assert mlflow.models.Model.load(str(local / "MLmodel")).prompts == [prompt.uri]
    accuracy = [m for m in model.metrics if m.key == "accuracy" and m.dataset_name == "banking77.test"]
    assert accuracy and accuracy[0].value == run.data.metrics["accuracy"]


SERVE = """
import json, sys
import mlflow, pandas
model = mlflow.pyfunc.load_model(sys.argv[1])
print("ANSWERS " + json.dumps(list(model.predict(pandas.DataFrame({"query": json.loads(sys.argv[2])})))))
"""


def test_the_logged_model_loads_and_predicts_in_a_fresh_process(logged, root, tmp_path):
    """`mlflow.pyfunc.load_model("models:/<model id>")` in a new Python process, in another folder, answers
    the run's two test queries as the run did. Fails if the model cannot be loaded from the store (missing
    code, artifacts, a pickle), needs the process that logged it, or answers otherwise than the run."""
    queries = [p["input.query"] for p in logged["predictions"]]
    env = {**os.environ, "MLFLOW_TRACKING_URI": logged["uri"], "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", SERVE, f"models:/{logged['model'].model_id}", json.dumps(queries)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("ANSWERS "))
    assert json.loads(line.removeprefix("ANSWERS ")) == [p["predicted"] for p in logged["predictions"]]


def test_export_registers_the_runs_logged_model_with_accuracy_and_cost_tags(logged, monkeypatch):
    """Fails if `chainopt export` logs another model instead of registering the run's own, or if the model
    version lacks its accuracy and cost per success tags."""
    monkeypatch.chdir(logged["folder"])
    run = logged["run"]
    assert main(["export", run.info.run_id, "--out", str(logged["folder"] / "export"), "--quiet"]) == 0
    registered = json.loads((logged["folder"] / "export" / "manifest.json").read_text())["registered"]
    version = MlflowClient().get_model_version(registered["name"], registered["version"])
    assert logged["model"].model_id in version.source and version.tags["model_id"] == logged["model"].model_id
    assert float(version.tags["accuracy"]) == run.data.metrics["accuracy"]
    for key in ("seconds_per_success", "tokens_per_success", "usd_per_success"):
        assert key in version.tags
    logged_models = MlflowClient().search_logged_models([run.info.experiment_id])
    assert [m.model_id for m in logged_models] == [logged["model"].model_id]
