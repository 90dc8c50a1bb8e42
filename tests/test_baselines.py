"""Classical baselines beside the LLM programs: fitted on the same training split, recorded as child runs of
the experiment's parent, resumed, on the Pareto front, in compare and the report, refused where they do not fit.

The data is made so that 1-nearest-neighbour is predictable by hand: each label's texts share one word
that no other label uses, so a query whose label was seen in training finds a neighbour of that label,
and a query of a label with a single row (never in training when it is tested) shares no word with
anything and gets the first training example's label, which is another. The LLM part is DSPy's DummyLM.
"""

from __future__ import annotations

import json
from pathlib import Path

import dspy
import pytest
from dspy.utils.dummies import DummyLM
from mlflow.tracking import MlflowClient

from optimize import baselines, tracking
from optimize import trial as trial_module
from optimize.cli import main
from optimize.config import DataConfig, parse_experiment
from optimize.data import Splits, Task, load_splits
from optimize.errors import ConfigError
from optimize.report import write_report

GROUPS = {"apple": 6, "banana": 6, "cherry": 6, "kiwi": 1, "mango": 1, "plum": 1}
EXPERIMENT = """\
name = "baselines"
seeds = [0]
baselines = ["tfidf_1nn", "tfidf_logreg"]

[model]
max_tokens = 32
cache = false

[data]
path = "{path}"
task = "intent"
inputs = {{ query = "text" }}
answer = "label"
train = 14
test = 6
seed = 2   # puts mango, a label with one row, in the test split

[[programs]]
name = "intent.predict"

[[optimizers]]
name = "none"

[cost]
usd_per_hour = 3600.0   # one dollar per second: a baseline's USD per success is its seconds per success

[eval]
threads = 1
"""


def write_data(folder: Path) -> Path:
    path = folder / "fruit.jsonl"
    rows = [{"id": f"{g}{i}", "text": f"{g} {g}{i}", "label": g} for g, n in GROUPS.items() for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_experiment(folder: Path, text: str = EXPERIMENT) -> Path:
    path = folder / "baselines.toml"
    path.write_text(text.format(path=write_data(folder)), encoding="utf-8")
    return path


def expected_1nn_accuracy(folder: Path) -> float:
    """By the rule of the data: right exactly when the query's label has a row in the training split."""
    splits = load_splits(DataConfig(path=str(folder / "fruit.jsonl"), task="intent", inputs={"query": "text"},
                                    answer="label", train=14, test=6, seed=2))
    seen = {e.intent for e in splits.train}
    return sum(e.intent in seen for e in splits.test) / len(splits.test)


def run(path: Path, capsys) -> dict:
    assert main(["run", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One experiment for the module, in its own MLflow store; the program's LM answers 'apple' to
    everything (right on apples only) and loads no model."""
    folder = tmp_path_factory.mktemp("baselines")
    mp = pytest.MonkeyPatch()
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{folder / 'mlflow.db'}")
    mp.chdir(folder)
    mp.setattr(trial_module, "build_lm",
               lambda cfg: DummyLM([{"intent": "apple"}] * 100, adapter=trial_module.adapter()))
    path = write_experiment(folder)
    assert main(["run", str(path), "--json", "-q"]) == 0
    yield folder, path
    mp.undo()


@pytest.fixture
def finished(store, capsys) -> tuple[Path, dict]:
    """The module's experiment and what `run --json` says of it (every run reused: the store has them)."""
    folder, path = store
    capsys.readouterr()
    return path, run(path, capsys)


def by_program(result: dict) -> dict[str, dict]:
    return {r["program"]: r for r in result["runs"]}


def test_1nn_accuracy_recorded_in_mlflow_is_the_hand_computed_one(finished, tmp_path):
    expected = expected_1nn_accuracy(finished[0].parent)
    assert expected == 5 / 6  # five queries of seen labels, and mango: both kinds, so the check can tell them apart
    run_id = by_program(finished[1])["baseline.tfidf_1nn"]["run_id"]
    stored = MlflowClient().get_run(run_id)
    assert stored.info.status == "FINISHED" and stored.info.run_name == "baseline.tfidf_1nn"
    assert stored.data.metrics["accuracy"] == pytest.approx(expected)
    assert stored.data.params["optimizer.name"] == "none" and stored.data.params["model.spec"] == "none"
    assert stored.data.tags[tracking.TAG_BASELINE] == "tfidf_1nn"
    rows = json.loads(Path(tracking.download(run_id, "predictions.json")).read_text())
    assert len(rows["data"]) == 6 and sum(row[rows["columns"].index("success")] for row in rows["data"]) == 6 * expected


def test_baselines_spend_no_tokens_and_are_priced_by_their_time(finished):
    for name in ("baseline.tfidf_1nn", "baseline.tfidf_logreg"):
        m = tracking.read_metrics(MlflowClient().get_run(by_program(finished[1])[name]["run_id"]))
        assert m["tokens_total"] == 0 and m["lm_calls"] == 0 and m["compile_tokens"] == 0
        assert m["cpu_seconds"] > 0 and m["seconds_total"] > 0 and m["compile_seconds"] > 0
        assert m["usd_total"] == pytest.approx(m["seconds_total"])  # $3600 an hour
        assert m["seconds_per_success"] == pytest.approx(m["seconds_total"] / m["successes"])
        assert m["usd_per_success"] == pytest.approx(m["seconds_per_success"])
        assert m["n"] == 6 and m["parse_failures"] == 0


def test_baselines_are_child_rows_on_the_pareto_front_in_compare_and_the_report(finished, tmp_path, capsys):
    path, result = finished
    experiment_id = tracking.setup("baselines")
    rows = tracking.child_rows(experiment_id, result["parent_run_id"])
    assert {r["program"]: r["baseline"] for r in rows} == {
        "intent.predict": "", "baseline.tfidf_1nn": "tfidf_1nn", "baseline.tfidf_logreg": "tfidf_logreg"}
    llm = next(r for r in rows if not r["baseline"])
    nn = next(r for r in rows if r["baseline"] == "tfidf_1nn")
    assert nn["accuracy"] > llm["accuracy"]  # the LM says 'apple' only
    # The most accurate run, the cheapest of those, is never dominated: a baseline, and marked so in the store.
    top = min((r for r in rows if r["accuracy"] == max(x["accuracy"] for x in rows)), key=lambda r: r["cost"])
    assert top["baseline"] and top["pareto"]
    assert MlflowClient().get_run(top["run_id"]).data.tags[tracking.TAG_PARETO] == "true"

    assert main(["compare", str(path)]) == 0
    out = capsys.readouterr().out
    assert "baseline.tfidf_1nn" in out and "baseline.tfidf_logreg" in out and "no LM (0 tokens)" in out

    page, data = write_report(str(path), tmp_path / "report.html")
    section = page.read_text(encoding="utf-8").split("<h2>Against classical baselines</h2>")[1].split("<h2>")[0]
    assert "baseline.tfidf_1nn" in section and "baseline.tfidf_logreg" in section and "(baseline ahead)" in section
    assert data["best_run_id"] == llm["run_id"]  # the best LLM program is what the report shows and exports


def test_a_rerun_reuses_the_finished_baselines(tmp_path, monkeypatch, mlflow_store, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(trial_module, "build_lm", lambda cfg: DummyLM([{"intent": "apple"}] * 100,
                                                                      adapter=trial_module.adapter()))
    path = write_experiment(tmp_path)
    first = run(path, capsys)
    assert not any(r["reused"] for r in first["runs"])
    again = run(path, capsys)
    assert by_program(again) == {k: {**v, "reused": True} for k, v in by_program(first).items()}
    assert main(["run", str(path)]) == 0
    assert "[3/3] baseline.tfidf_logreg: finished earlier, reused" in capsys.readouterr().err


def test_a_baseline_run_is_not_exported(finished, tmp_path, capsys):
    run_id = by_program(finished[1])["baseline.tfidf_1nn"]["run_id"]
    assert main(["export", run_id, "--out", str(tmp_path / "out")]) != 0
    assert "classical baseline tfidf_1nn: it has no DSPy program to export" in capsys.readouterr().err


MATH = """\
name = "math-baseline"
baselines = ["tfidf_1nn"]
[data]
dataset = "gsm8k"
train = 2
test = 2
[[programs]]
name = "math.predict"
[[optimizers]]
name = "{optimizer}"
"""


def test_a_baseline_on_a_math_task_is_refused_in_one_line_with_the_other_problems(tmp_path, capsys):
    path = tmp_path / "math.toml"
    path.write_text(MATH.format(optimizer="labeled_fewshott"), encoding="utf-8")
    assert main(["validate", str(path)]) != 0
    lines = capsys.readouterr().err.strip().removeprefix("chainopt: error: ").splitlines()
    assert len(lines) == 2 and "unknown optimizer 'labeled_fewshott'" in lines[0]
    assert lines[1] == f"{path}: baseline tfidf_1nn is for intent tasks, but task gsm8k is math"


def test_an_unknown_baseline_name_is_answered_with_the_closest_one(tmp_path, capsys):
    path = tmp_path / "typo.toml"
    path.write_text(EXPERIMENT.replace('"tfidf_logreg"', '"tfidf_logres"').format(path=write_data(tmp_path)),
                    encoding="utf-8")
    assert main(["validate", str(path)]) != 0
    err = capsys.readouterr().err.strip()
    assert err == (f"chainopt: error: {path}: unknown baseline 'tfidf_logres' (did you mean 'tfidf_logreg'?); "
                   "available: tfidf_1nn, tfidf_logreg")


def test_a_baseline_listed_twice_is_refused():
    with pytest.raises(ConfigError, match="baselines lists tfidf_1nn more than once"):
        parse_experiment({"name": "x", "baselines": ["tfidf_1nn", "tfidf_logreg", "tfidf_1nn"]})


def test_logistic_regression_needs_two_labels_in_training(tmp_path):
    write_data(tmp_path)
    exp = parse_experiment({"name": "x", "baselines": ["tfidf_logreg"], "data": {
        "path": str(tmp_path / "fruit.jsonl"), "task": "intent", "inputs": {"query": "text"}, "answer": "label",
        "train": 1, "test": 1}})
    splits = load_splits(exp.data)
    with pytest.raises(ConfigError, match="needs at least 2 labels in the training split"):
        baselines.run_baseline(baselines.baseline_trial(exp, "tfidf_logreg"), splits)
    baselines.check_baseline(baselines.get_baseline("tfidf_1nn"), splits)  # one neighbour is enough for 1-NN


def test_1nn_reads_every_input_field_joined():
    """A two-field task: the label follows the second field, which a baseline reading only the first misses."""
    examples = [dspy.Example(id=str(i), a="same words", b=word, intent=word).with_inputs("a", "b")
                for i, word in enumerate(["alpha", "beta", "alpha", "beta"])]
    splits = Splits(Task("two", "intent", ("a", "b"), "intent", ("alpha", "beta")), examples[:2], [], examples[2:])
    exp = parse_experiment({"name": "x", "baselines": ["tfidf_1nn"]})
    outcome = baselines.run_baseline(baselines.baseline_trial(exp, "tfidf_1nn"), splits)
    assert [r.predicted for r in outcome.records] == ["alpha", "beta"] and outcome.metrics["accuracy"] == 1.0
