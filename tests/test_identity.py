"""A trial's identity (what resume compares): its resolved config, its model file and its data content."""

import json

import pytest

import optimize.trial as trial_module
from optimize.config import parse_experiment
from optimize.llm.models import describe
from optimize.trial import get_program, identity, program_settings


def _trial(path, **budget):
    exp = parse_experiment({"name": "t", "data": {"path": str(path), "task": "intent", "train": 0, "test": 2},
                            "programs": [{"name": "intent.chain"}], "budget": budget})
    return exp.combinations()[0]


def _write(path, texts):
    path.write_text("".join(json.dumps({"query": t, "intent": "a" if i % 2 else "b"}) + "\n"
                            for i, t in enumerate(texts)))


def test_changed_data_at_the_same_path_is_a_new_trial(tmp_path):
    data = tmp_path / "mine.jsonl"
    _write(data, ["one", "two", "three"])
    before = identity(_trial(data))
    assert identity(_trial(data)) == before  # same content: the same work, reused on resume
    _write(data, ["one", "two", "three!"])
    assert identity(_trial(data)) != before


def test_a_changed_model_file_at_the_same_spec_is_a_new_trial(tmp_path, monkeypatch):
    data = tmp_path / "mine.jsonl"
    _write(data, ["one", "two"])
    trial = _trial(data)
    before = identity(trial)
    real = describe(trial.model.spec)
    monkeypatch.setattr(trial_module, "describe", lambda spec: real.__class__(**{**real.__dict__, "sha256": "0" * 64}))
    assert identity(trial) != before


@pytest.mark.parametrize("budget, settings, expected", [
    ({"max_retries": 0}, {}, 0),                    # budget.max_retries reaches a program that retries
    ({"max_retries": 5}, {"max_retries": 1}, 1),    # the program's own setting wins
    ({}, {}, 2),                                     # the default
])
def test_budget_max_retries_is_the_default_retry_count(tmp_path, budget, settings, expected):
    data = tmp_path / "mine.jsonl"
    _write(data, ["one", "two"])
    trial = _trial(data, **budget)
    trial = trial.model_copy(update={"program": trial.program.model_copy(update={"settings": settings})})
    assert program_settings(trial, get_program("intent.chain")) == {"max_retries": expected}
    if not settings:
        assert program_settings(trial, get_program("intent.predict")) == {}  # takes no retries: nothing added


def test_an_export_keeps_the_hub_split_its_examples_came_from():
    # Before, the manifest's data.split was overwritten with the scored slice ("test"), so the manifest named
    # the Hub's test split as the source of the training examples.
    from optimize.export import data_section

    exp = parse_experiment({"name": "t", "data": {"path": "hf:someone/tickets", "split": "validation",
                                                  "task": "intent", "test": 5}})
    section = data_section(exp.combinations()[0], 5, digest="hf:someone/tickets:validation")
    assert section["split"] == "validation" and section["eval_split"] == "test" and section["examples"] == 5
    assert section["path"] == "hf:someone/tickets" and "path_resolved" not in section and "dataset" not in section
