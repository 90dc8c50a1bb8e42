"""Metrics that every DSPy optimizer accepts.

Signature `metric(gold, pred, trace=None, pred_name=None, pred_trace=None)`. A plain call returns a
float (1.0 or 0.0): Evaluate sums it and BootstrapFewShot tests its truth — a `dspy.Prediction` would
always be truthy there, so it is returned only when GEPA asks for feedback on one predictor (`pred_name`
set), as `dspy.Prediction(score=..., feedback=...)` with the same score as the plain call (GEPA warns
on a mismatch). The feedback names the gold answer and repeats the validators' findings (`trace_notes`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import dspy

from programs.validators import normalize_label, parse_number


def _feedback(correct: bool, expected: Any, got: Any, pred: Any, extra: list[str]) -> str:
    lines = ["Correct." if correct else f"Wrong: the answer was {got!r}, the correct answer is {expected!r}."]
    lines += extra
    lines += [f"Check: {note}" for note in getattr(pred, "trace_notes", None) or []]
    return "\n".join(lines)


@dataclass(frozen=True)
class NumericMatch:
    """1.0 when the predicted number equals the gold one within 1e-6 (relative or absolute).

    Both sides may be text: the number is read out of it (`"$1,200.50"`, `"72 apples"`).
    """

    answer_field: str = "answer"
    rel_tol: float = 1e-6
    abs_tol: float = 1e-6

    def score(self, gold: Any, pred: Any) -> float:
        try:
            expected = parse_number(gold[self.answer_field])
            got = parse_number(getattr(pred, self.answer_field, None))
        except ValueError:
            return 0.0
        return float(math.isclose(expected, got, rel_tol=self.rel_tol, abs_tol=self.abs_tol))

    def __call__(self, gold: Any, pred: Any, trace: Any = None, pred_name: str | None = None, pred_trace: Any = None):
        score = self.score(gold, pred)
        if pred_name is None:
            return score
        got = getattr(pred, self.answer_field, None)
        text = _feedback(bool(score), str(gold[self.answer_field]), got, pred, [])
        return dspy.Prediction(score=score, feedback=text)


@dataclass(frozen=True, eq=False)  # hashed by identity: groups is a dict
class LabelMatch:
    """1.0 when the predicted label equals the gold one after `normalize_label` (case, spaces, quotes).

    With `groups` (the intent chain's topic groups), GEPA's feedback also names the gold label's group.
    """

    answer_field: str = "intent"
    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def score(self, gold: Any, pred: Any) -> float:
        got = getattr(pred, self.answer_field, None)
        return float(got is not None and normalize_label(str(got)) == normalize_label(str(gold[self.answer_field])))

    def __call__(self, gold: Any, pred: Any, trace: Any = None, pred_name: str | None = None, pred_trace: Any = None):
        score = self.score(gold, pred)
        if pred_name is None:
            return score
        expected = str(gold[self.answer_field])
        got = getattr(pred, self.answer_field, None)
        hint = [] if score else self._group_hint(expected, pred_trace)
        return dspy.Prediction(score=score, feedback=_feedback(bool(score), expected, got, pred, hint))

    def _group_hint(self, expected: str, pred_trace: Any) -> list[str]:
        """For a wrong answer: whether the group step chose the gold label's group, so blame lands on the right step."""
        key = normalize_label(expected)
        gold_group = next((name for name, members in self.groups.items() if key in map(normalize_label, members)), None)
        if gold_group is None:
            return []
        chosen = pred_trace[-1][2].get("group") if pred_trace else None
        if chosen is None:
            return [f"The correct topic group is {gold_group!r}."]
        if chosen == gold_group:
            return [f"This step chose the right topic group, {gold_group!r}; the label step went wrong."]
        return [f"This step chose topic group {chosen!r}; the correct one is {gold_group!r}."]


@dataclass(frozen=True)
class LabelSetMatch:
    """Per-example F1 between the predicted and the gold label sets (after `normalize_label`).

    F1 is 1.0 only for the exact set, so a run's accuracy (chains at score 1.0) is exact-set accuracy,
    and the mean score is its F1. GEPA's feedback names the missing and the extra labels.
    """

    answer_field: str = "intents"

    def sets(self, gold: Any, pred: Any) -> tuple[set[str], set[str]]:
        """The gold and predicted label sets, normalised; an answer that is no list is one label."""
        def keys(value: Any) -> set[str]:
            items = value if isinstance(value, (list, tuple, set)) else [] if value is None else [value]
            return {normalize_label(str(item)) for item in items}

        return keys(gold[self.answer_field]), keys(pred.get(self.answer_field))

    def score(self, gold: Any, pred: Any) -> float:
        expected, got = self.sets(gold, pred)
        overlap = len(expected & got)
        return 2 * overlap / (len(expected) + len(got)) if overlap else 0.0

    def __call__(self, gold: Any, pred: Any, trace: Any = None, pred_name: str | None = None, pred_trace: Any = None):
        score = self.score(gold, pred)
        if pred_name is None:
            return score
        expected, got = self.sets(gold, pred)
        extra = [f"Missing labels: {', '.join(sorted(expected - got))}."] if expected - got else []
        extra += [f"Extra labels, not in the answer: {', '.join(sorted(got - expected))}."] if got - expected else []
        text = _feedback(score == 1.0, sorted(expected), sorted(got), pred, extra)
        return dspy.Prediction(score=score, feedback=text)
