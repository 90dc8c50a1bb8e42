"""What programs share with whatever runs them, owned here so that programs import nothing of `optimize/`.

- `step("name")` labels the LM calls made inside it as one step of a chain; a runner reads the label
  of each call with `current_step()` to count tokens per step.
- `ProgramError`: a program asked for with settings or a task it cannot take; a runner shows its message.
- `PER_CALL_CHOICES`: the extra a program sets on a `Literal` output field whose choices it narrows on
  every call, so that a prompt-formatting adapter puts them after the call's inputs, not in the shared
  system message (optimize.llm.adapter reads it by this name).
- `OUTPUT_SCHEMA`: the extra a program sets on an output field to hold JSON-schema keywords for it (a
  string's `pattern`, a list's `maxItems`); DSPy builds the response schema from the bare type and drops
  pydantic constraints, so a JSON adapter adds these to the field's schema, and the decoding grammar
  enforces them.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from typing import Iterator

PER_CALL_CHOICES = "per_call_choices"
OUTPUT_SCHEMA = "output_schema"

_step: contextvars.ContextVar[str] = contextvars.ContextVar("chainopt_step", default="predict")


@contextmanager
def step(name: str) -> Iterator[None]:
    """Label the LM calls made inside the block as one step of a chain."""
    token = _step.set(name)
    try:
        yield
    finally:
        _step.reset(token)


def current_step() -> str:
    """The label of the step the calling code is in ("predict" outside any)."""
    return _step.get()


class ProgramError(ValueError):
    """A program cannot be built as asked (unknown program or setting, wrong task kind): the message says why."""
