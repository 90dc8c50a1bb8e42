"""Everything spent, and what it costs per successful chain. The cost formula lives in `summarize`.

Metering: the engine calls `record()` after every LM call. What it records lands in every open
`Tally` of the calling thread (a chain, a compile phase, a whole run), so one call is counted once
per scope that asked. Programs label their steps with `step("name")` to get tokens per step.
"""

from __future__ import annotations

import contextvars
import math
import threading
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Iterator

from optimize.errors import BudgetExceeded


@dataclass
class Usage:
    """Counters of one LM call or of many, added together."""

    input_computed: int = 0
    input_reused: int = 0
    output: int = 0
    calls: int = 0
    seconds: float = 0.0

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


@dataclass
class Tally:
    """Usage gathered in one scope, with an optional hard token ceiling."""

    label: str = ""
    limit: int | None = None
    usage: Usage = field(default_factory=Usage)
    by_step: dict[str, Usage] = field(default_factory=lambda: defaultdict(Usage))
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, call: Usage, step_name: str) -> None:
        with self._lock:
            self.usage = self.usage + call
            self.by_step[step_name] = self.by_step[step_name] + call

    def check(self) -> None:
        if self.limit is not None and self.usage.tokens >= self.limit:
            raise BudgetExceeded(self.label or "chain", self.limit, self.usage.tokens)


_scopes: contextvars.ContextVar[tuple[Tally, ...]] = contextvars.ContextVar("chainopt_scopes", default=())
_step: contextvars.ContextVar[str] = contextvars.ContextVar("chainopt_step", default="predict")
_shared: list[Tally] = []  # scopes that see calls from every thread (a run, a compile phase)
_shared_lock = threading.Lock()


@contextmanager
def metered(label: str = "", limit: int | None = None, *, all_threads: bool = False) -> Iterator[Tally]:
    """Count every LM call made inside the block (by this thread, or by any thread when all_threads)."""
    tally = Tally(label=label, limit=limit)
    if all_threads:
        with _shared_lock:
            _shared.append(tally)
        try:
            yield tally
        finally:
            with _shared_lock:
                _shared.remove(tally)
        return
    token = _scopes.set(_scopes.get() + (tally,))
    try:
        yield tally
    finally:
        _scopes.reset(token)


@contextmanager
def step(name: str) -> Iterator[None]:
    """Label the LM calls made inside the block as one step of a chain."""
    token = _step.set(name)
    try:
        yield
    finally:
        _step.reset(token)


def _open_scopes() -> list[Tally]:
    with _shared_lock:
        return [*_scopes.get(), *_shared]


def check_budgets() -> None:
    """Called by the engine before a call: raise BudgetExceeded if any open scope is at its ceiling."""
    for tally in _open_scopes():
        tally.check()


def record(call: Usage) -> None:
    """Called by the engine after every LM call."""
    name = _step.get()
    for tally in _open_scopes():
        tally.add(call, name)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]
