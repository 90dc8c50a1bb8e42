"""Intent classification: one-shot, with reasoning, and a two-stage chain (topic group, then label)."""

from __future__ import annotations

from typing import Any, Literal, Sequence

import dspy

from programs.contract import step
from programs.metrics import LabelMatch
from programs.registry import ProgramSpec, Record, TaskLike, UnreadableOutput, ask
from programs.validators import LabelError, check_label, normalize_label

# Keyword → group, first match wins, so every label lands in exactly one group; labels that match
# nothing go to "other". The order matters: "top_up_by_card_charge" is a top-up, not a card or a fee,
# and "card_payment_wrong_exchange_rate" is an exchange question. Keywords match whole words of the label.
GROUP_KEYWORDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("top_up", ("top_up", "topping_up")),
    ("cash_and_atm", ("cash", "atm", "cheque")),
    ("exchange_and_currency", ("exchange", "currency", "currencies", "fiat", "country")),
    ("transfer", ("transfer", "beneficiary", "receiving_money")),
    ("payment_and_refund", ("payment", "charge", "charged", "fee", "refund", "transaction", "debit", "pay")),
    ("identity_and_security", ("identity", "verify", "passcode", "pin", "phone", "compromised", "personal")),
    ("new_card", ("arrival", "delivery", "order", "get", "getting", "activate", "expire")),
    ("card", ("card", "contactless", "visa", "mastercard")),
    ("account", ("account", "age")),
)
OTHER_GROUP = "other"
CLASSIFY = "Classify the customer request."


def derive_groups(labels: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """Non-empty groups in GROUP_KEYWORDS order (then "other"), each with its labels in the given order."""
    groups: dict[str, list[str]] = {name: [] for name, _ in GROUP_KEYWORDS}
    groups[OTHER_GROUP] = []
    for label in labels:
        words = f"_{normalize_label(label)}_"
        group = next((name for name, keys in GROUP_KEYWORDS if any(f"_{k}_" in words for k in keys)), OTHER_GROUP)
        groups[group].append(label)
    return {name: tuple(members) for name, members in groups.items() if members}


def _signature(
    task: TaskLike, outputs: dict[str, tuple[Any, str]], instructions: str, feedback: bool = False
) -> type[dspy.Signature]:
    fields: dict[str, Any] = {name: (str, dspy.InputField()) for name in task.input_fields}
    if feedback:
        fields["feedback"] = (str, dspy.InputField(desc="why earlier answers were rejected"))
    fields.update({name: (kind, dspy.OutputField(desc=desc)) for name, (kind, desc) in outputs.items()})
    return dspy.Signature(fields, instructions)


def _choose(predictor: dspy.Module, output: str, labels: Sequence[str], inputs: dict[str, Any], record: Record) -> str:
    """One LM call whose answer must be one of `labels`; raises LabelError (or UnreadableOutput) otherwise."""
    record.steps += 1
    value, note = ask(predictor, output, inputs, record)
    label = check_label(str(value), labels)
    record.note(note)
    return label


class IntentClassifier(dspy.Module):
    """Query → label in one call (Predict), or after a reasoning field (ChainOfThought)."""

    def __init__(self, task: TaskLike, reasoning: bool = False):
        super().__init__()
        self.inputs, self.output, self.labels = tuple(task.input_fields), task.answer_field, tuple(task.labels)
        signature = _signature(task, {self.output: (Literal[self.labels], "the intent label")}, CLASSIFY)
        self.classify = dspy.ChainOfThought(signature) if reasoning else dspy.Predict(signature)

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        record = Record()
        inputs = {name: kwargs[name] for name in self.inputs}
        label = None
        with step("classify"):
            try:
                label = _choose(self.classify, self.output, self.labels, inputs, record)
            except (LabelError, UnreadableOutput) as e:
                record.fail(f"classify: {e}")
        return record.prediction(**{self.output: label})


class IntentChain(dspy.Module):
    """Two stages, so a small model picks from ~10 options twice instead of from 77 once.

    `group` picks a topic group; `fine['<group>']` picks the label within it (a one-label group needs no
    call). There is one fine predictor per group, each with its own Literal, so optimizers see them as
    named predictors and save/load keeps each group's instructions and demos apart. When a stage's answer
    fails the label check, `retry` picks from all labels, told why the earlier answers were rejected;
    the feedback grows with each rejection, so no retry repeats the same input (and cached output).
    """

    def __init__(self, task: TaskLike, max_retries: int = 2):
        super().__init__()
        self.inputs, self.output, self.labels = tuple(task.input_fields), task.answer_field, tuple(task.labels)
        self.groups = derive_groups(self.labels)
        self.max_retries = max_retries
        self.group = dspy.Predict(
            _signature(
                task, {"group": (Literal[tuple(self.groups)], "the topic of the request")},
                "Choose the topic group of the customer request.",
            )
        )
        self.fine = {
            name: dspy.Predict(_signature(task, {self.output: (Literal[members], "the intent label")}, CLASSIFY))
            for name, members in self.groups.items()
            if len(members) > 1
        }
        self.retry = dspy.Predict(
            _signature(
                task, {self.output: (Literal[self.labels], "the intent label")},
                f"{CLASSIFY} Earlier answers were rejected for the reasons given in feedback.",
                feedback=True,
            )
        )

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        record = Record()
        inputs = {name: kwargs[name] for name in self.inputs}
        rejections: list[str] = []
        group = label = None
        try:
            with step("group"):
                group = _choose(self.group, "group", list(self.groups), inputs, record)
            members = self.groups[group]
            if len(members) == 1:
                label = members[0]
            else:
                with step("label"):
                    label = _choose(self.fine[group], self.output, members, inputs, record)
        except (LabelError, UnreadableOutput) as e:
            stage = "group" if group is None else f"label in group {group}"
            rejections.append(f"{stage}: {e}")
            record.fail(rejections[-1])
        while label is None and record.retries < self.max_retries:
            record.retries += 1
            with step("label.retry"):
                try:
                    feedback = "\n".join(rejections)
                    label = _choose(self.retry, self.output, self.labels, {**inputs, "feedback": feedback}, record)
                except (LabelError, UnreadableOutput) as e:
                    rejections.append(f"retry {record.retries}: {e}")
                    record.fail(rejections[-1])
        return record.prediction(**{self.output: label, "group": group})


def _label_metric(task: TaskLike) -> LabelMatch:
    return LabelMatch(task.answer_field)


def _chain_metric(task: TaskLike) -> LabelMatch:
    return LabelMatch(task.answer_field, groups=derive_groups(tuple(task.labels)))


SPECS = (
    ProgramSpec("intent.predict", "intent", "one call: request → label", IntentClassifier, _label_metric),
    ProgramSpec(
        "intent.cot", "intent", "one call with reasoning before the label",
        lambda task: IntentClassifier(task, reasoning=True), _label_metric,
    ),
    ProgramSpec(
        "intent.chain", "intent", "topic group, then the label within it; validated, with retries",
        IntentChain, _chain_metric, settings={"max_retries": 2},
    ),
)
