"""The contract every program keeps: what a task looks like, how a program is declared, what it reports."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Mapping, Protocol

import dspy
from dspy.predict.parameter import Parameter
from dspy.utils.exceptions import AdapterParseError

from programs.contract import ProgramError, judge

TaskKind = Literal["intent", "multilabel", "math", "qa"]
Metric = Callable[..., Any]  # metric(gold, pred, trace=None, pred_name=None, pred_trace=None)


class TaskLike(Protocol):
    """The fields of `optimize.data.Task` that programs read (duck-typed, so programs do not depend on data)."""

    name: str
    kind: str
    input_fields: tuple[str, ...]
    answer_field: str
    labels: tuple[str, ...] | None


@dataclass(frozen=True)
class ProgramSpec:
    """A named program: which tasks it fits, how to build it, how to score it, which settings it takes."""

    name: str
    kind: TaskKind
    description: str
    builder: Callable[..., dspy.Module] = field(repr=False)
    metric_for: Callable[[TaskLike], Metric] = field(repr=False)
    settings: Mapping[str, int | str] = field(default_factory=dict)  # allowed settings and their defaults

    def build(self, task: TaskLike, **settings: Any) -> dspy.Module:
        """A fresh module for `task`; unknown or invalid settings raise ProgramError naming what is allowed."""
        if task.kind != self.kind:
            raise ProgramError(f"program {self.name} is for {self.kind} tasks, but task {task.name} is {task.kind}")
        if self.kind in ("intent", "multilabel") and not task.labels:
            raise ProgramError(f"program {self.name} needs the label set of task {task.name}, which has none")
        unknown = sorted(set(settings) - set(self.settings))
        if unknown:
            allowed = ", ".join(self.settings) or "none"
            raise ProgramError(f"program {self.name} has no setting {', '.join(unknown)}; allowed: {allowed}")
        for key, value in settings.items():
            if isinstance(self.settings[key], str):
                if not isinstance(value, str):
                    raise ProgramError(f"program setting {key} must be text, got {value!r}")
            elif type(value) is not int or value < 0:
                raise ProgramError(f"program setting {key} must be a whole number >= 0, got {value!r}")
        return self.builder(task, **{**self.settings, **settings})

    def metric(self, task: TaskLike) -> Metric:
        """The metric for this program on `task` (usable by Evaluate, BootstrapFewShot, MIPROv2 and GEPA)."""
        return self.metric_for(task)


class Tunable(Parameter):
    """A program's own settings, read at call time and saved with its state: a search over program
    settings changes them on a copy of the built program, and an exported program keeps the chosen ones."""

    def __init__(self, **values: int | str):
        self.values = dict(values)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def reset(self) -> None:
        """Not learned by demo or instruction optimizers: kept when they reset a copy."""

    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        return dict(self.values)

    def load_state(self, state: dict[str, Any]) -> "Tunable":
        self.values.update(state)
        return self


@dataclass
class Record:
    """What one program call did, returned on its Prediction next to the answer."""

    steps: int = 0  # LM calls made
    validator_failures: int = 0
    retries: int = 0
    parse_failures: int = 0  # answers the adapter could not parse (recovered from raw text or not)
    trace_notes: list[str] = field(default_factory=list)
    _rejected: dict[str, Any] | None = field(default=None, repr=False)  # the last rejection, until retried

    def note(self, text: str | None) -> None:
        if text:
            self.trace_notes.append(text)

    def accept(self, validator: str, value: Any) -> None:
        """`validator` passed `value`: reported to the runner (programs.contract.judge) for the chain's trace."""
        judge(validator, True, value)

    def fail(self, text: str, validator: str, value: Any = None) -> None:
        """`validator` rejected `value` for the reason `text`: counted, noted, and reported to the runner."""
        self.validator_failures += 1
        self.trace_notes.append(text)
        self._rejected = judge(validator, False, value, text)

    def retry(self) -> None:
        """Count a retry; the last rejection's reported verdict (the same dict the runner holds) says that a
        retry followed it."""
        self.retries += 1
        if self._rejected is not None:
            self._rejected["retry"] = True
            self._rejected = None

    def prediction(self, **outputs: Any) -> dspy.Prediction:
        return dspy.Prediction(
            **outputs,
            steps=self.steps,
            validator_failures=self.validator_failures,
            retries=self.retries,
            parse_failures=self.parse_failures,
            trace_notes=list(self.trace_notes),
        )


class UnreadableOutput(ValueError):
    """An LM answer that the adapter could not parse and that holds no value for the wanted field."""

    value = None  # what a validator's error holds of the rejected answer (LabelError.value): nothing here


def ask(predictor: dspy.Module, output: str, inputs: Mapping[str, Any], record: Record) -> tuple[Any, str | None]:
    """The `output` value of one predictor call, and a note when it had to be read from an unparsed answer.

    A typed field (a Literal label, a float) makes the adapter reject near misses such as `"Card Arrival"`
    or `"72 apples"`; the raw text is handed back instead, so that the validators can normalise it.
    """
    try:
        return getattr(predictor(**inputs), output), None
    except AdapterParseError as e:
        record.parse_failures += 1
        raw = _raw_field(e, output)
        if raw is None:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UnreadableOutput(f"the answer could not be read: {first_line}") from None
        return raw, f"{output} read from an unparsed answer: {raw!r}"


def _raw_field(error: AdapterParseError, output: str) -> str | None:
    if isinstance(error.parsed_result, dict) and error.parsed_result.get(output) is not None:
        return str(error.parsed_result[output])
    match = re.search(rf"\[\[ ## {re.escape(output)} ## \]\]\s*(.*?)\s*(?:\[\[ ## |$)", str(error.lm_response), re.S)
    return match.group(1) if match and match.group(1) else None
