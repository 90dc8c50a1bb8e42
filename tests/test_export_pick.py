"""Which run `chainopt export` takes (a start of its id, or `best` of an experiment file) and how its manifest
names a user's data file: as the experiment file gave it, resolved, and by content hash.

No model: the LLM runs are DSPy DummyLMs, told apart by max_tokens: 32 answers 'apple' (right on the
apples of the test split), 33 answers 'kiwi' (in no test row: never right). A TF-IDF 1-NN baseline beside
them is more accurate than both, and is never the one `best` exports.
"""

from __future__ import annotations

import hashlib
import json

import pytest
from dspy.utils.dummies import DummyLM
from mlflow.tracking import MlflowClient

from optimize import trial as trial_module
from optimize.cli import main
from optimize.config import load_experiment
from optimize.data import load_splits

ROWS = [{"id": f"{g}{i}", "text": f"{g} {g}{i}", "label": g} for g, n in
        {"apple": 6, "banana": 6, "cherry": 6, "kiwi": 1, "mango": 1, "plum": 1}.items() for i in range(n)]
EXPERIMENT = """\
name = "pick"
baselines = ["tfidf_1nn"]
[[models]]
spec = "smollm2-135m"
max_tokens = 32
[[models]]
spec = "smollm2-135m"
max_tokens = 33
[data]
path = "data/fruit.jsonl"
task = "intent"
inputs = { query = "text" }
answer = "label"
train = 14
test = 6
seed = 2
[[programs]]
name = "intent.predict"
[[optimizers]]
name = "none"
[eval]
threads = 1
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The experiment run once in its own store: its file, its data file and its child runs ('apple', 'kiwi',
    'baseline')."""
    folder = tmp_path_factory.mktemp("pick")
    (folder / "data").mkdir()
    data = folder / "data" / "fruit.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    config = folder / "pick.toml"
    config.write_text(EXPERIMENT, encoding="utf-8")
    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.chdir(folder)
    mp.setattr(trial_module, "build_lm", lambda cfg: DummyLM(
        [{"intent": "apple" if cfg.max_tokens == 32 else "kiwi"}] * 100, adapter=trial_module.adapter()))
    try:
        assert main(["run", str(config), "-q"]) == 0
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("pick")
        runs = client.search_runs([exp.experiment_id], "tags.`chainopt.kind` = 'child'")
        by_role = {("baseline" if r.data.tags.get("chainopt.baseline") else
                    "apple" if r.data.params["model.max_tokens"] == "32" else "kiwi"): r for r in runs}
        assert len(runs) == len(by_role) == 3
        yield {"config": config, "data": data, "uri": uri, "runs": by_role}
    finally:
        mp.undo()


def _export(args: list[str], capsys) -> dict:
    assert main(["export", *args, "--no-register", "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_the_data_is_as_the_test_assumes(store):
    test = load_splits(load_experiment(store["config"]).data).test
    assert any(e.intent == "apple" for e in test) and not any(e.intent == "kiwi" for e in test)
    accuracy = {role: run.data.metrics["accuracy"] for role, run in store["runs"].items()}
    assert accuracy["baseline"] > accuracy["apple"] > accuracy["kiwi"] == 0


def test_best_exports_the_most_accurate_llm_run_never_a_baseline(store, tmp_path, capsys):
    """Fails if `best` is not accepted, takes the baseline (more accurate, but no program to export), the
    less accurate LLM run, or another store than the experiment file's."""
    manifest = _export(["best", "--experiment", str(store["config"]), "--out", str(tmp_path / "best")], capsys)
    assert manifest["run_id"] == store["runs"]["apple"].info.run_id


def test_best_without_the_experiment_is_one_line(store, tmp_path, capsys):
    assert main(["export", "best", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--experiment" in err


def test_a_user_files_manifest_names_it_as_given_and_resolved_with_its_hash(store, tmp_path, capsys):
    """Fails if the manifest names the default dataset (banking77) for a user's file, loses the path as the
    experiment file wrote it or the absolute one, or gives no content hash of the file."""
    run = store["runs"]["apple"]
    data = _export([run.info.run_id, "--out", str(tmp_path / "one")], capsys)["data"]
    assert "dataset" not in data
    assert data["path"] == "data/fruit.jsonl" and data["path_resolved"] == str(store["data"].resolve())
    assert data["digest"] == hashlib.sha256(store["data"].read_bytes()).hexdigest() == run.data.params["data.digest"]
    assert (data["inputs"], data["answer"], data["task"]) == ({"query": "text"}, "label", "intent")
    saved = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert saved["data"] == data


def test_a_changed_data_file_is_not_exported_as_the_runs(store, tmp_path, capsys):
    """Fails if the export writes its slice from, and names, data other than the run was measured on."""
    run_id = store["runs"]["apple"].info.run_id
    before = store["data"].read_bytes()
    try:
        extra = json.dumps({"id": "new", "text": "fig fig", "label": "fig"}) + "\n"
        store["data"].write_bytes(before + extra.encode())
        assert main(["export", run_id, "--out", str(tmp_path / "changed"), "--no-register"]) == 2
    finally:
        store["data"].write_bytes(before)
    err = capsys.readouterr().err
    assert "changed since run" in err and "fruit.jsonl" in err and not (tmp_path / "changed").exists()


def test_a_start_of_the_run_id_exports_that_run(store, tmp_path, capsys):
    run_id = store["runs"]["apple"].info.run_id
    manifest = _export([run_id[:8].upper(), "--out", str(tmp_path / "short")], capsys)
    assert manifest["run_id"] == run_id


def test_an_ambiguous_or_unknown_start_is_one_line_naming_the_candidates(store, tmp_path, capsys):
    """Fails if a start shared by two runs exports either of them, or if the error does not list them."""
    client = MlflowClient(store["uri"])
    experiment_id = client.get_experiment_by_name("pick").experiment_id
    ids = [r.info.run_id for r in client.search_runs([experiment_id])]
    while True:  # 17 runs: two of them start with the same hex digit
        by_first: dict[str, list[str]] = {}
        for run_id in ids:
            by_first.setdefault(run_id[0], []).append(run_id)
        shared = next((group for group in by_first.values() if len(group) > 1), None)
        if shared:
            break
        ids.append(client.create_run(experiment_id, run_name="extra").info.run_id)
    assert main(["export", shared[0][0], "--out", str(tmp_path / "a"), "--no-register"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ambiguous" in err and all(run_id[:8] in err for run_id in shared)
    unknown = next(f"{a}{b}" for a in "0123456789abcdef" for b in "0123456789abcdef"
                   if not any(run_id.startswith(f"{a}{b}") for run_id in ids))
    assert main(["export", unknown, "--out", str(tmp_path / "u"), "--no-register"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no run id starts with {unknown!r}" in err
    assert "latest trials" in err and all(r.info.run_id[:8] in err for r in store["runs"].values())
    assert main(["export", "not-an-id", "--out", str(tmp_path / "n"), "--no-register"]) == 2
    assert "hexadecimal" in capsys.readouterr().err
