"""Registered DSPy programs: `PROGRAMS[name].build(task)` gives a module, `.metric(task)` its metric.

Each program returns a `dspy.Prediction` with the task's answer field and a per-example record:
`steps` (LM calls), `validator_failures`, `retries` and `trace_notes` (what the validators found).
"""

from programs import intent, math, multilabel
from programs.registry import ProgramSpec, TaskLike

PROGRAMS: dict[str, ProgramSpec] = {spec.name: spec for spec in (*intent.SPECS, *multilabel.SPECS, *math.SPECS)}


def list_programs(kind: str | None = None) -> list[ProgramSpec]:
    """All programs, or those for one task kind, sorted by name."""
    return [spec for name, spec in sorted(PROGRAMS.items()) if kind is None or spec.kind == kind]


__all__ = ["PROGRAMS", "ProgramSpec", "TaskLike", "list_programs"]
