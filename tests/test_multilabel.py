"""Multi-label classification end to end: a list-valued answer column loads as a label set, the programs
answer a validated set of labels, the metric is per-example F1 (exact-set accuracy beside it), and a run
exports and predicts again. The data is built from Banking77 by tests/multilabel_data.py."""

import json
from pathlib import Path
from typing import Literal

import dspy
import mlflow
import pytest
from dspy.utils.dummies import DummyLM
from mlflow.tracking import MlflowClient

from multilabel_data import write
from optimize.cli import main
from optimize.config import DataConfig
from optimize.data import load_splits
from optimize.errors import DataError
from optimize.export import input_columns, read_inputs
from optimize.llm.adapter import CacheFriendlyAdapter
from optimize.llm.engine import schema_grammar
from optimize.trial import get_program
from programs.contract import PER_CALL_CHOICES
from programs.metrics import LabelSetMatch
from programs.retrieval import fill_retrievers



def _mine(path, **settings) -> DataConfig:
    """The built file as a user's data: its `split` column says train or test."""
    return DataConfig(path=str(path), inputs={"query": "text"}, split_column="split", train=30, test=5, **settings)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write(tmp_path_factory.mktemp("multilabel") / "mine.jsonl", train=40, test=10)


def _rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- loading


def test_a_list_column_loads_as_label_sets_whose_union_is_the_label_set(data):
    """Fails if the lists become JSON text, or the label set is not the union of every row's labels."""
    splits = load_splits(_mine(data, task="multilabel"))
    assert splits.task.kind == "multilabel" and splits.task.answer_field == "intents"
    assert splits.task.labels == tuple(sorted({label for row in _rows(data) for label in row["intents"]}))
    example = splits.train[0]
    assert isinstance(example.intents, list) and set(example.intents) <= set(splits.task.labels)
    assert {len(e.intents) for e in splits.train} == {1, 2}  # joined requests, and some single ones


def test_a_list_column_is_found_without_a_task(data):
    splits = load_splits(_mine(data))
    assert splits.task.kind == "multilabel"


def test_an_intent_task_refuses_lists_and_points_to_multilabel(data):
    with pytest.raises(DataError) as error:
        load_splits(_mine(data, task="intent", answer="intents"))
    assert "holds lists" in str(error.value) and 'data.task = "multilabel"' in str(error.value)


def test_an_empty_label_list_is_a_malformed_row(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "hi", "intents": ["a"]}\n{"text": "yo", "intents": []}\n')
    with pytest.raises(DataError, match="line 2: field 'intents' is missing or empty"):
        load_splits(DataConfig(path=str(path), task="multilabel", inputs={"query": "text"}, train=1, test=1))


def test_a_csv_cell_holding_a_json_list_is_a_label_list(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text('text,intents\nhi,"[""a"", ""b""]"\nyo,c\n')
    splits = load_splits(DataConfig(path=str(path), task="multilabel", inputs={"query": "text"}, train=1, test=1))
    assert splits.task.labels == ("a", "b", "c")
    assert sorted(map(tuple, (e.intents for e in splits.train + splits.test))) == [("a", "b"), ("c",)]


# ---------------------------------------------------------------- the programs

TASK_LABELS = ("card_arrival", "card_linking", "exchange_rate", "top_up_failed")
POOL = [dspy.Example(query=q, intents=labels).with_inputs("query") for q, labels in [
    ("When will my new card arrive? Also, what is the exchange rate?", ["card_arrival", "exchange_rate"]),
    ("My card has not arrived yet", ["card_arrival"]),
    ("How do I link my new card?", ["card_linking"]),
    ("Top up failed again", ["top_up_failed"]),
]]


def _program(name: str, **settings):
    from optimize.data import Task

    task = Task("mine", "multilabel", ("query",), "intents", TASK_LABELS)
    program = get_program(name).build(task, **settings)
    fill_retrievers(program, POOL)
    return program


def _run(program, answers, query: str):
    adapter = CacheFriendlyAdapter()
    lm = DummyLM(answers, adapter=adapter)
    with dspy.context(lm=lm, adapter=adapter):
        return program(query=query), lm


def test_retrieve_narrows_the_choices_to_the_neighbours_labels_and_answers_a_set():
    """Fails if the choices are not the union of the neighbours' labels, listed after the query only."""
    program = _program("multilabel.retrieve", k=2)
    prediction, lm = _run(program, [{"intents": ["card_arrival", "exchange_rate"]}],
                          "My new card has not arrived. Also, what exchange rate do you use?")
    assert prediction.intents == ["card_arrival", "exchange_rate"]
    assert (prediction.steps, prediction.validator_failures, prediction.retries) == (1, 0, 0)
    messages = lm.history[-1]["messages"]
    assert messages[-1]["content"].endswith("Choices for `intents`: card_arrival; exchange_rate")
    assert "card_linking" not in messages[0]["content"]  # the system prompt is the same for every call
    assert len(messages) == 1 + 2 * 2 + 1  # system, two retrieved demos (user + assistant), the query


def test_retrieve_rejects_an_unknown_label_and_retries_over_all_labels():
    program = _program("multilabel.retrieve", k=2)
    prediction, lm = _run(program, [{"intents": ["card_arrival", "lost_card"]}, {"intents": ["card_arrival"]}],
                          "My new card has not arrived. Also, what exchange rate do you use?")
    assert prediction.intents == ["card_arrival"]
    assert (prediction.steps, prediction.validator_failures, prediction.retries) == (2, 1, 1)
    assert "'lost_card' is not an allowed label" in prediction.trace_notes[-1]
    retry = lm.history[-1]["messages"]
    assert "'lost_card' is not an allowed label" in retry[-1]["content"]  # told why
    assert "top_up_failed" in retry[0]["content"]  # the retry chooses from the whole label set


def test_neighbours_with_one_label_answer_without_a_call():
    prediction, lm = _run(_program("multilabel.retrieve", k=1), [], "How do I link my card?")
    assert prediction.intents == ["card_linking"] and prediction.steps == 0 and not lm.history


def test_predict_chooses_from_every_label_and_validates():
    prediction, _ = _run(_program("multilabel.predict"), [{"intents": ["top_up_failed", "top_up_failed"]}],
                         "top up failed")
    assert prediction.intents == ["top_up_failed"]  # a set: no label twice
    prediction, _ = _run(_program("multilabel.predict"), [{"intents": []}], "top up failed")
    assert prediction.intents is None and "no label was given" in prediction.trace_notes[-1]


def test_a_set_of_choices_decodes_under_a_grammar_of_labels_alone():
    """The per-call narrowed field sends an array-of-enum schema: the grammar admits those labels only."""
    signature = dspy.Signature({"query": (str, dspy.InputField()), "intents": (list[str], dspy.OutputField())}, "x")
    narrowed = signature.with_updated_fields("intents", type_=list[Literal["a_b", "c"]], **{PER_CALL_CHOICES: True})
    kwargs: dict = {}

    class SchemaLM:
        supported_params = frozenset({"response_format"})
        supports_response_schema = True

    CacheFriendlyAdapter()._prepare_response_format(SchemaLM(), kwargs, narrowed)
    grammar = schema_grammar(json.dumps(kwargs["response_format"].model_json_schema()))
    assert 'intents-item ::= "\\"a_b\\"" | "\\"c\\""' in grammar


@pytest.mark.parametrize("name", ["multilabel.predict", "multilabel.retrieve"])
def test_the_answer_holds_at_most_max_labels_by_its_grammar(name):
    """Fails if a small model can repeat labels until max_tokens: the schema, and so the grammar, caps the list
    (the narrowed per-call field of multilabel.retrieve keeps the cap, and so does its retry)."""
    program = _program(name, max_labels=2, **({"k": 3} if name.endswith("retrieve") else {}))
    adapter = CacheFriendlyAdapter()

    class SchemaLM:
        supported_params = frozenset({"response_format"})
        supports_response_schema = True

    narrowed = program.classify.signature.with_updated_fields(
        "intents", type_=list[Literal["card_arrival", "card_linking"]], **{PER_CALL_CHOICES: True})
    for signature in [program.classify.signature, narrowed, *([program.retry.signature] if name.endswith("retrieve") else [])]:
        kwargs: dict = {}
        adapter._prepare_response_format(SchemaLM(), kwargs, signature)
        schema = kwargs["response_format"].model_json_schema()
        intents = schema["properties"]["intents"]
        assert (intents["minItems"], intents["maxItems"]) == (1, 2)
        rule = next(line for line in schema_grammar(json.dumps(schema)).splitlines() if line.startswith("intents ::="))
        assert rule.count('","') == 1 and not {"*", "+"} & set(rule)  # one label, or two, never more
    with pytest.raises(ValueError, match="max_labels >= 1"):
        _program(name, max_labels=0)


# ---------------------------------------------------------------- the metric


@pytest.mark.parametrize("gold, got, f1", [
    (["a", "b"], ["a", "b"], 1.0), (["a", "b"], ["b", "a"], 1.0), (["a", "b"], ["a"], 2 / 3),
    (["a"], ["a", "b", "c"], 0.5), (["a", "b"], ["c"], 0.0), (["a"], None, 0.0), (["Card Arrival"], ["card_arrival"], 1.0),
])
def test_the_metric_is_per_example_f1(gold, got, f1):
    assert LabelSetMatch()(dspy.Example(intents=gold), dspy.Prediction(intents=got)) == pytest.approx(f1)


def test_exact_set_accuracy_and_f1_from_records():
    """A run's accuracy counts exact sets only (score 1.0); its f1 is the mean score."""
    from optimize.evaluate import EvalResult, evaluate
    from optimize.trial import mean_score

    examples = [dspy.Example(query=str(i), intents=gold).with_inputs("query")
                for i, gold in enumerate([["a", "b"], ["a"], ["c"]])]
    answers = {"0": ["a", "b"], "1": ["a", "b"], "2": ["a"]}
    result = evaluate(lambda query: dspy.Prediction(intents=answers[query]), examples, LabelSetMatch(), "intents",
                      threads=1)
    assert isinstance(result, EvalResult)
    assert sorted(r.success for r in result.records) == [False, False, True]
    assert mean_score(result.records) == pytest.approx((1 + 2 / 3 + 0) / 3)


def test_gepa_feedback_names_missing_and_extra_labels():
    feedback = LabelSetMatch()(dspy.Example(intents=["a", "b"]), dspy.Prediction(intents=["b", "c"]),
                               pred_name="classify")
    assert feedback.score == 0.5
    assert "Missing labels: a." in feedback.feedback and "Extra labels, not in the answer: c." in feedback.feedback
    right = LabelSetMatch()(dspy.Example(intents=["a"]), dspy.Prediction(intents=["a"]), pred_name="classify")
    assert right.score == 1.0 and right.feedback.startswith("Correct.")


# ---------------------------------------------------------------- predict's input file


def test_predict_reads_a_users_label_lists_through_the_runs_mapping(tmp_path):
    from optimize.data import Task

    task = Task("mine", "multilabel", ("query",), "intents", TASK_LABELS)
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "card late", "tags": ["card_arrival"]}) + "\n")
    _, (example,) = read_inputs(path, task, input_columns({"inputs": {"query": "text"}, "answer": "tags"}, task))
    assert example.query == "card late" and example.intents == ["card_arrival"]


# ---------------------------------------------------------------- a real run, exported and predicted

RUN = """\
name = "multilabel-e2e"
seeds = [0]
[model]
max_tokens = 64
cache = false
[data]
path = "{path}"
inputs = {{ query = "text" }}
split_column = "split"
train = 200
test = 5
[[programs]]
name = "multilabel.retrieve"
settings = {{ k = 3 }}
[[optimizers]]
name = "none"
[eval]
threads = 1
"""


@pytest.mark.model
def test_a_run_reports_f1_and_exact_set_accuracy_and_exports(tmp_path, mlflow_store):
    """One tiny run on the embedded model: MLflow has f1 and accuracy (exact sets), the export's manifest
    carries both, and predict on the export reproduces the run's answers and both numbers."""
    data = write(tmp_path / "mine.jsonl", train=200, test=5)
    config = tmp_path / "run.toml"
    config.write_text(RUN.format(path=data))
    assert main(["run", str(config), "--quiet"]) == 0
    client = MlflowClient(mlflow_store)
    exp = client.get_experiment_by_name("multilabel-e2e")
    (run,) = client.search_runs([exp.experiment_id], "tags.`chainopt.kind` = 'child'")
    metrics = run.data.metrics
    assert metrics["n"] == 5 and 0 <= metrics["accuracy"] <= metrics["f1"] <= 1
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="predictions.json",
                                               tracking_uri=mlflow_store)
    table = json.loads(open(path).read())
    recorded = sorted((dict(zip(table["columns"], row)) for row in table["data"]), key=lambda r: r["index"])
    assert metrics["f1"] == pytest.approx(sum(r["score"] for r in recorded) / 5)
    assert metrics["accuracy"] == sum(r["score"] == 1.0 for r in recorded) / 5

    out = tmp_path / "export"
    assert main(["export", run.info.run_id, "--out", str(out), "--no-register", "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["task"]["kind"] == "multilabel" and manifest["metrics"]["f1"] == metrics["f1"]
    answers = tmp_path / "answers.jsonl"
    assert main(["predict", str(out), "--output", str(answers), "--quiet"]) == 0
    predicted = [json.loads(line) for line in answers.read_text().splitlines()]
    # predictions.json writes an answer as text, "" for none (a set the checks rejected twice)
    assert ["" if a["intents"] is None else str(a["intents"]) for a in predicted] == [r["predicted"] for r in recorded]
    assert all(set(a["intents"] or []) <= set(manifest["task"]["labels"]) for a in predicted)


def test_the_vendored_multilabel_file_is_what_its_script_makes(tmp_path):
    """Fails if datasets/banking77-multilabel/ drifts from tests/multilabel_data.py (its card says how it is made)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    made = tmp_path / "made.jsonl"
    subprocess.run([sys.executable, str(root / "tests" / "multilabel_data.py"), str(made), "--train", "2000",
                    "--test", "100"], check=True, capture_output=True)
    assert made.read_bytes() == (root / "datasets" / "banking77-multilabel" / "banking77_multilabel.jsonl").read_bytes()
