"""What the inference layer speaks: completion jobs, their results, the backend contract, usage counters.

Everything above this package (the pipeline, the bench) talks to a backend through these types, and hears
what each LM call spent through `observe`: the engine reports usage per call, metering is the caller's.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, fields
from typing import Callable, Literal, Protocol


@dataclass(frozen=True)
class Generation:
    """One completion job, independent of how a backend decodes it."""

    tokens: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0
    seed: int = 0
    grammar: str | None = None  # GBNF text
    top_p: float = 1.0
    top_k: int = 0
    # The answer's last field when it is a choice from a fixed set: (field name, choices). A backend may
    # stop decoding once one choice alone fits, the rest being forced by the grammar (see settle_choice).
    choice: tuple[str, tuple[str, ...]] | None = None


@dataclass(frozen=True)
class Completion:
    text: str
    n_prompt: int
    n_reused: int
    n_output: int
    finish_reason: Literal["stop", "length"]
    # How sure the model was of the choice field's label (optimize.llm.confidence): probability, margin.
    confidence: dict | None = None


class Backend(Protocol):
    def generate(self, job: Generation) -> Completion: ...

    def close(self) -> None: ...




@dataclass
class Usage:
    """Counters of one LM call or of many, added together."""

    input_computed: int = 0
    input_reused: int = 0
    output: int = 0
    calls: int = 0
    seconds: float = 0.0
    cached: int = 0  # calls answered by DSPy's response cache, their usage replayed from the computing call

    @property
    def input_tokens(self) -> int:
        return self.input_computed + self.input_reused

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Observer:
    """Told about every LM call: `before` may refuse it by raising; `after` gets what it spent and the name
    of the model that answered (and may raise too: a ceiling crossed by this very call); `heard`, if set,
    gets a choice's confidence."""

    before: Callable[[], None]
    after: Callable[[Usage, str], None]
    # Told, in the calling thread, how sure the model was of a choice it answered (a computed or a cached call).
    heard: Callable[[dict], None] | None = None


_observers: list[Observer] = []
_observers_lock = threading.Lock()


def observe(observer: Observer) -> None:
    """Register `observer` for every LM call of this process (once: registering it again does nothing)."""
    with _observers_lock:
        if observer not in _observers:
            _observers.append(observer)


def observers() -> list[Observer]:
    with _observers_lock:
        return list(_observers)


_PLAIN = re.compile(r'[^"\\\x00-\x1f\x7f-\uffff]*')  # a choice JSON writes as is (no escapes)


def final_choice(schema: dict) -> tuple[str, tuple[str, ...]] | None:
    """(field, choices) when the schema's last property is a required string enum of plain choices: the
    field JSON decoding writes last, whose value the grammar forces once its start fits one choice."""
    props = schema.get("properties") or {}
    if schema.get("type", "object") != "object" or not props:
        return None
    field, spec = list(props.items())[-1]
    choices = spec.get("enum")
    if (field not in schema.get("required", ()) or not choices or not _PLAIN.fullmatch(field)
            or not all(isinstance(c, str) and _PLAIN.fullmatch(c) for c in choices)):
        return None
    return field, tuple(choices)


def settle_choice(text: str, field: str, choices: tuple[str, ...]) -> str | None:
    """What completes `text`, a JSON answer decoded under the grammar, once it is inside the last field's
    value and only one choice starts with what was decoded of it: the rest of that choice and the
    closing brace (the grammar allows nothing else but whitespace). None while two choices still fit.

    Decoding the rest token by token would give the same value: at temperature 0 this is exact."""
    match = re.search(rf'(?<!\\)"{re.escape(field)}"\s*:\s*"([^"\\]*)$', text)
    if match is None:
        return None
    partial = match.group(1)
    fits = [c for c in choices if c.startswith(partial)]
    return fits[0][len(partial):] + '"}' if len(fits) == 1 else None
