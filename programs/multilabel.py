"""Multi-label classification: a request → the set of labels that apply, each one from the task's label set."""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal, Sequence

import dspy

from programs.contract import OUTPUT_SCHEMA, PER_CALL_CHOICES, ProgramError, step
from programs.metrics import LabelSetMatch
from programs.registry import ProgramSpec, Record, TaskLike, Tunable, UnreadableOutput, ask
from programs.retrieval import Retriever
from programs.validators import LabelError, check_labels

CLASSIFY = "Give every intent label that applies to the customer request: one or more."
RETRY = f"{CLASSIFY} Earlier answers were rejected for the reasons given in feedback."
DESC = "the labels that apply"


def _signature(task: TaskLike, output: type, instructions: str, max_labels: int,
               feedback: bool = False) -> type[dspy.Signature]:
    """The answer field's grammar admits 1 to `max_labels` labels, so a small model repeating labels stops."""
    fields: dict[str, Any] = {name: (str, dspy.InputField()) for name in task.input_fields}
    if feedback:
        fields["feedback"] = (str, dspy.InputField(desc="why earlier answers were rejected"))
    fields[task.answer_field] = (output, dspy.OutputField(desc=DESC))
    bounds = {"minItems": 1, "maxItems": max_labels}
    return dspy.Signature(fields, instructions).with_updated_fields(task.answer_field, **{OUTPUT_SCHEMA: bounds})


def _check_max_labels(name: str, max_labels: int) -> None:
    if max_labels < 1:
        raise ProgramError(f"{name} needs max_labels >= 1, got {max_labels}")


def _choose_set(predictor: dspy.Module, output: str, inputs: dict[str, Any], labels: Sequence[str],
                record: Record) -> list[str]:
    """One LM call whose answer must be a non-empty list of `labels`; raises LabelError (or UnreadableOutput)."""
    record.steps += 1
    value, note = ask(predictor, output, inputs, record)
    chosen = check_labels(value, labels)
    record.accept("check_labels", value)
    record.note(note)
    return chosen


class MultiLabelPredict(dspy.Module):
    """Zero-shot: one call over the whole label set, its answer validated."""

    def __init__(self, task: TaskLike, max_labels: int = 3):
        super().__init__()
        _check_max_labels("multilabel.predict", max_labels)
        self.inputs, self.output, self.labels = tuple(task.input_fields), task.answer_field, tuple(task.labels)
        self.classify = dspy.Predict(_signature(task, list[Literal[self.labels]], CLASSIFY, max_labels))

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        record = Record()
        inputs = {name: kwargs[name] for name in self.inputs}
        chosen = None
        with step("classify"):
            try:
                chosen = _choose_set(self.classify, self.output, inputs, self.labels, record)
            except (LabelError, UnreadableOutput) as e:
                record.fail(f"classify: {e}", "check_labels", e.value)
        return record.prediction(**{self.output: chosen})


class MultiLabelRetrieve(dspy.Module):
    """Retrieval, then one narrowed choice of a set: the k training examples most like the query become its
    demos (the most similar last, next to the query, unless `nearest_last` = 0), and the answer must be a
    list of their labels (the decoding grammar admits nothing else), listed after the query so the prompt
    prefix stays shared. When the neighbours hold one label only, it is the answer and no LM call is made.
    An answer the label check rejects is retried over the whole label set, told why.
    """

    def __init__(self, task: TaskLike, k: int = 8, nearest_last: int = 1, max_retries: int = 1,
                 embedder: str = "tfidf", max_labels: int = 3):
        super().__init__()
        if k < 1:
            raise ProgramError(f"multilabel.retrieve needs k >= 1, got {k}")
        _check_max_labels("multilabel.retrieve", max_labels)
        self.inputs, self.output, self.labels = tuple(task.input_fields), task.answer_field, tuple(task.labels)
        self.settings = Tunable(k=k, nearest_last=nearest_last, max_retries=max_retries)
        self.retrieve = Retriever(task.input_fields, embedder=embedder)
        self.classify = dspy.Predict(_signature(task, list[str], CLASSIFY, max_labels))
        self.retry = dspy.Predict(_signature(task, list[Literal[self.labels]], RETRY, max_labels, feedback=True))

    def choices(self, neighbours: Sequence[dspy.Example]) -> tuple[str, ...]:
        """The union of the neighbours' known labels, most votes first (ties: the nearer first)."""
        named = [str(label) for d in neighbours for label in d[self.output]]
        votes = Counter(named)
        return tuple(sorted((label for label in dict.fromkeys(named) if label in self.labels),
                            key=lambda label: -votes[label]))

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        record = Record()
        inputs = {name: kwargs[name] for name in self.inputs}
        with step("retrieve"):
            neighbours = self.retrieve(self.settings["k"], **inputs)  # most similar first
        choices = self.choices(neighbours) or self.labels
        chosen, rejections = None, []
        if len(choices) == 1:
            chosen = list(choices)
            record.note(f"the {len(neighbours)} neighbours have label {choices[0]} only: no call")
        else:
            demos = neighbours[::-1] if self.settings["nearest_last"] else neighbours
            signature = self.classify.signature.with_updated_fields(self.output, type_=list[Literal[choices]],
                                                                    **{PER_CALL_CHOICES: True})
            call = {**inputs, "signature": signature, "demos": [*self.classify.demos, *demos]}
            with step("classify"):
                try:
                    chosen = _choose_set(self.classify, self.output, call, choices, record)
                except (LabelError, UnreadableOutput) as e:
                    rejections.append(f"classify: {e}")
                    record.fail(rejections[-1], "check_labels", e.value)
        while chosen is None and record.retries < self.settings["max_retries"]:
            record.retry()
            with step("classify.retry"):
                try:
                    feedback = "\n".join(rejections)
                    chosen = _choose_set(self.retry, self.output, {**inputs, "feedback": feedback}, self.labels,
                                         record)
                except (LabelError, UnreadableOutput) as e:
                    rejections.append(f"retry {record.retries}: {e}")
                    record.fail(rejections[-1], "check_labels", e.value)
        return record.prediction(**{self.output: chosen})


def _metric(task: TaskLike) -> LabelSetMatch:
    return LabelSetMatch(task.answer_field)


SPECS = (
    ProgramSpec("multilabel.predict", "multilabel", "one call: request → a set of labels from all of them",
                MultiLabelPredict, _metric, settings={"max_labels": 3}),
    ProgramSpec(
        "multilabel.retrieve", "multilabel",
        "k similar training examples as demos, the answer a set of their labels; validated, with a retry",
        MultiLabelRetrieve, _metric, settings={"k": 8, "nearest_last": 1, "max_retries": 1, "embedder": "tfidf", "max_labels": 3},
    ),
)
