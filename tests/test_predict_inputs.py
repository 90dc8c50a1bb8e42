"""`chainopt predict`'s input file: the user's own columns, as the experiment's `[data] inputs` mapped them,
or the program's field names (the exported evaluation slice), read without the model."""

import json

import pytest

from optimize.data import Task
from optimize.errors import DataError
from optimize.export import input_columns, read_inputs

TASK = Task("mine", "intent", ("query",), "intent", ("card_arrival", "top_up"))
# The manifest's data section of a run on a user's file with `inputs = { query = "text" }, answer = "label"`.
DATA = {"path": "/data/mine.jsonl", "task": "intent", "inputs": {"query": "text"}, "answer": "label"}


def _file(tmp_path, *rows) -> str:
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_the_users_columns_are_read_through_the_runs_mapping(tmp_path):
    """Fails if predict wants the program's input name (`query`) where the user's file has `text`."""
    row = {"id": "a", "text": "my card has not arrived", "label": "card_arrival"}
    rows, (example,) = read_inputs(_file(tmp_path, row), TASK, input_columns(DATA, TASK))
    assert rows == [row]  # what the output file echoes: the line as the user wrote it
    assert example.inputs().toDict() == {"query": "my card has not arrived"}
    assert example.intent == "card_arrival"  # the gold, so predict can grade


def test_the_programs_field_names_keep_working(tmp_path):
    """The exported evaluation slice (and files written for it) use the program's names."""
    _, (example,) = read_inputs(_file(tmp_path, {"query": "top me up", "intent": "top_up"}), TASK,
                                input_columns(DATA, TASK))
    assert example.inputs().toDict() == {"query": "top me up"} and example.intent == "top_up"


def test_the_mapped_column_wins_over_a_same_named_other_column(tmp_path):
    """The run read `text`; a `query` column beside it in the user's file is something else."""
    _, (example,) = read_inputs(_file(tmp_path, {"query": "Q-17", "text": "card late"}), TASK,
                                input_columns(DATA, TASK))
    assert example.query == "card late"


@pytest.mark.parametrize("data, needle", [(DATA, "missing input column(s) 'text' (or 'query')"),
                                          ({"inputs": None, "answer": None}, "missing input column(s) 'query'")])
def test_a_missing_input_names_the_column_to_provide(tmp_path, data, needle):
    with pytest.raises(DataError) as error:
        read_inputs(_file(tmp_path, {"utterance": "card late"}), TASK, input_columns(data, TASK))
    assert needle in str(error.value) and "line 1" in str(error.value)


def test_an_ungraded_input_is_answered_without_an_error():
    """Fails if the metric is asked to grade a new line that has no gold answer: every answer of
    `chainopt predict` on new lines then carried `"error": "'intent'"` and `"steps": 0`."""
    import dspy

    from optimize.evaluate import evaluate

    class Fixed(dspy.Module):
        def forward(self, query):
            return dspy.Prediction(intent="top_up", steps=2)

    graded = dspy.Example(query="top me up", intent="top_up").with_inputs("query")
    new = dspy.Example(query="top me up").with_inputs("query")
    result = evaluate(Fixed(), [graded, new], lambda example, pred, trace=None: example.intent == pred.intent,
                      "intent", threads=1)
    first, second = sorted(result.records, key=lambda r: r.index)
    assert (first.gold, first.success, first.error, first.steps) == ("top_up", True, None, 2)
    assert (second.gold, second.predicted, second.error, second.steps) == (None, "top_up", None, 2)
