"""A cascade: the same program on a cheap model first, on the next model only when the cheap answer is in doubt.

The wrapped program runs under the first model. Its answer is in doubt when

  - it has none, or its validator rejected an answer on the way (a failure the program recorded),
  - the model's confidence in the chosen label is low: `probability` < `min_probability` or `margin` <
    `min_margin` (the engine's confidence for a choice field, heard through `programs.contract.listening`),
  - the samples agree too little: `agreement` < `min_agreement` (a program that votes, math.expr).

Then the next model answers instead, and so on; the last model's answer stands. An answer that needed no LM
call (intent.retrieve when the neighbours agree) is never in doubt: another model would give the same one.
The thresholds are `Tunable` settings, so `settings_search` tunes them on the dev split, and a saved
program keeps them. The models are given by the runner (programs import nothing of it) and never copied
or saved: `dspy.LM`s of the runner's engines, one process serving all of them.

Each Prediction says which model answered (`answered_by`), why the first escalated (`escalation`, "" when it
did not) and what every model tried said (`cascade`: model, answer, doubt, probability, margin, agreement).
"""

from __future__ import annotations

from typing import Any, Sequence

import dspy

from programs.contract import ProgramError, listening, stage
from programs.registry import Tunable

THRESHOLDS = ("min_probability", "min_margin", "min_agreement")


class _Models:
    """The (name, LM) pairs in escalation order: shared by copies of a cascade, never deep-copied or saved."""

    def __init__(self, models: Sequence[tuple[str, Any]]):
        self.models = list(models)

    def __deepcopy__(self, memo: dict[int, Any]) -> "_Models":
        return self


class Cascade(dspy.Module):
    """`program` on `models` in order, escalating on doubt (see the module docstring)."""

    def __init__(self, program: dspy.Module, models: Sequence[tuple[str, Any]], answer_field: str,
                 min_probability: float = 0.0, min_margin: float = 0.0, min_agreement: float = 0.0):
        super().__init__()
        if len(models) < 2:
            raise ProgramError(f"a cascade needs at least two models, got {len(models)}")
        self.program = program
        self.models = _Models(models)
        self.output = answer_field
        self.settings = Tunable(min_probability=min_probability, min_margin=min_margin, min_agreement=min_agreement)

    def doubt(self, pred: dspy.Prediction, heard: list[dict]) -> tuple[str | None, dict]:
        """Why this answer is in doubt (None when it is not), and the confidence it was judged on."""
        answer = pred.get(self.output)
        confidence = next((c for c in reversed(heard) if c.get("field") == self.output and c.get("label") == str(answer)),
                          None)
        seen = {"probability": confidence["probability"] if confidence else None,
                "margin": confidence["margin"] if confidence else None, "agreement": pred.get("agreement")}
        if int(pred.get("validator_failures", 0) or 0):
            notes = pred.get("trace_notes") or []
            return "validator: " + (notes[0] if notes else "an answer was rejected"), seen
        if answer is None:
            return "no answer", seen
        agreement = seen["agreement"]
        if agreement is not None and agreement < self.settings["min_agreement"]:
            return f"agreement {agreement:.2f} < {self.settings['min_agreement']}", seen
        if confidence is not None:
            if confidence["probability"] < self.settings["min_probability"]:
                return f"probability {confidence['probability']:.3f} < {self.settings['min_probability']}", seen
            if confidence["margin"] < self.settings["min_margin"]:
                return f"margin {confidence['margin']:.3f} < {self.settings['min_margin']}", seen
        return None, seen

    def forward(self, **inputs: Any) -> dspy.Prediction:
        tried: list[dict[str, Any]] = []
        totals = {"steps": 0, "validator_failures": 0, "retries": 0, "parse_failures": 0}
        notes: list[str] = []
        models = self.models.models
        for n, (name, lm) in enumerate(models):
            with dspy.context(lm=lm), stage(name), listening() as heard:
                pred = self.program(**inputs)
            reason, seen = self.doubt(pred, heard)
            tried.append({"model": name, "answer": pred.get(self.output), "doubt": reason or "", **seen})
            for key in totals:
                totals[key] += int(pred.get(key, 0) or 0)
            notes += [f"{name}: {note}" for note in pred.get("trace_notes") or []]
            if reason is None or n == len(models) - 1:  # the last model's answer stands, in doubt or not
                break
            notes.append(f"{name}: in doubt ({reason}): escalated to {models[n + 1][0]}")
        outputs = {key: value for key, value in pred.items() if key not in (*totals, "trace_notes")}
        return dspy.Prediction(**outputs, **totals, trace_notes=notes, answered_by=tried[-1]["model"],
                               escalation=tried[0]["doubt"] if len(tried) > 1 else "", cascade=tried)
