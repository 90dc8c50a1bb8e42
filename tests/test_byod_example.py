"""The README's "Bring your own data" walkthrough ships its files in examples/byod/: the experiment must
validate as the walkthrough's first command does, over a label set of its own (not Banking77's), with the
columns and sizes the walkthrough names. No model call."""

import json
from collections import Counter

from optimize.config import load_experiment
from optimize.data import load_splits


def test_the_byod_example_validates_on_its_own_labels(root):
    from optimize.experiment import check

    folder = root / "examples" / "byod"
    exp = load_experiment(folder / "tickets.toml")
    check(exp)  # what `chainopt validate examples/byod/tickets.toml` does
    assert [p.name for p in exp.programs] == ["intent.predict", "intent.retrieve"]
    assert list(exp.baselines) == ["tfidf_1nn", "tfidf_logreg"]

    rows = [json.loads(line) for line in (folder / "tickets.jsonl").read_text().splitlines() if line.strip()]
    assert all(set(row) == {"text", "label"} for row in rows)
    assert len({row["text"] for row in rows}) == len(rows) >= exp.data.train + exp.data.dev + exp.data.test
    labels = Counter(row["label"] for row in rows)
    assert 5 <= len(labels) <= 8 and min(labels.values()) >= 10
    banking77 = set(json.loads((root / "datasets" / "banking77" / "categories.json").read_text()))
    assert not {label.lower() for label in labels} & {label.lower() for label in banking77}

    splits = load_splits(exp.data)
    assert set(splits.task.labels) == set(labels)
    assert (len(splits.train), len(splits.dev), len(splits.test)) == (exp.data.train, exp.data.dev, exp.data.test)
