"""What programs share with whatever runs them, owned here so that programs import nothing of `optimize/`.

- `step("name")` labels the LM calls made inside it as one step of a chain; a runner reads the label
  of each call with `current_step()` to count tokens per step.
- `ProgramError`: a program asked for with settings or a task it cannot take; a runner shows its message.
- `PER_CALL_CHOICES`: the extra a program sets on a `Literal` output field whose choices it narrows on
  every call, so that a prompt-formatting adapter puts them after the call's inputs, not in the shared
  system message (optimize.llm.adapter reads it by this name).
- `listening()` gathers, for the LM calls made inside it, how sure the model was of each choice it answered
  (`hear` is what a runner calls with each call's confidence: field, label, probability, margin); a cascade
  reads it to decide whether to escalate. `stage("model")` prefixes the step labels inside it, so a runner
  counts a cascade's tokens per model.
- `judging(sink)` hands a runner every validator verdict reported inside it (`judge`, which
  `programs.registry.Record` calls when a check accepts or rejects an answer), as plain data, for a trace.
- `OUTPUT_SCHEMA`: the extra a program sets on an output field to hold JSON-schema keywords for it (a
  string's `pattern`, a list's `maxItems`); DSPy builds the response schema from the bare type and drops
  pydantic constraints, so a JSON adapter adds these to the field's schema, and the decoding grammar
  enforces them.
"""

from __future__ import annotations

import contextvars
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

PER_CALL_CHOICES = "per_call_choices"
OUTPUT_SCHEMA = "output_schema"

_step: contextvars.ContextVar[str] = contextvars.ContextVar("chainopt_step", default="predict")
_stage: contextvars.ContextVar[str] = contextvars.ContextVar("chainopt_stage", default="")
_heard: contextvars.ContextVar[list[dict] | None] = contextvars.ContextVar("chainopt_heard", default=None)
_judged: contextvars.ContextVar[Callable[[dict[str, Any]], None] | None] = contextvars.ContextVar(
    "chainopt_judged", default=None)
MAX_VALUE_CHARS = 500  # a checked value longer than this (a long plan) is cut in its verdict


@contextmanager
def step(name: str) -> Iterator[None]:
    """Label the LM calls made inside the block as one step of a chain."""
    token = _step.set(name)
    try:
        yield
    finally:
        _step.reset(token)


def current_step() -> str:
    """The label of the step the calling code is in ("predict" outside any), after its stage and a slash
    inside a `stage`."""
    return f"{_stage.get()}/{_step.get()}" if _stage.get() else _step.get()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Prefix the step labels of the LM calls made inside the block (a cascade: the model answering)."""
    token = _stage.set(name)
    try:
        yield
    finally:
        _stage.reset(token)


@contextmanager
def listening() -> Iterator[list[dict]]:
    """The confidences of the choices answered by the LM calls made inside the block, in call order."""
    heard: list[dict] = []
    token = _heard.set(heard)
    try:
        yield heard
    finally:
        _heard.reset(token)


def hear(confidence: dict) -> None:
    """A runner tells the innermost `listening` block how sure the model was of a choice it answered."""
    heard = _heard.get()
    if heard is not None:
        heard.append(confidence)


@contextmanager
def judging(sink: Callable[[dict[str, Any]], None]) -> Iterator[None]:
    """Hand `sink` every validator verdict reported by this thread inside the block."""
    token = _judged.set(sink)
    try:
        yield
    finally:
        _judged.reset(token)


def judge(validator: str, accepted: bool, value: Any, reason: str = "") -> dict[str, Any]:
    """Report one verdict to the innermost `judging` block, and return it: plain data (JSON and pickle as it
    is), timed in epoch nanoseconds, with the step it was given in; `retry` is set by the one who retries."""
    shown = value if value is None or isinstance(value, (bool, int, float)) else str(value)[:MAX_VALUE_CHARS]
    verdict = {"kind": "verdict", "step": current_step(), "validator": validator, "accepted": accepted,
               "reason": reason, "value": shown, "retry": False, "time_ns": time.time_ns()}
    sink = _judged.get()
    if sink is not None:
        sink(verdict)
    return verdict


class ProgramError(ValueError):
    """A program cannot be built as asked (unknown program or setting, wrong task kind): the message says why."""
