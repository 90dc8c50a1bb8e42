"""Math word problems: one-shot, with reasoning, and a decomposed chain whose arithmetic a calculator does."""

from __future__ import annotations

from typing import Any

import dspy
import pydantic

from programs.contract import step
from programs.metrics import NumericMatch
from programs.registry import ProgramSpec, Record, TaskLike, UnreadableOutput, ask
from programs.validators import CalculatorError, Number, evaluate_steps, format_number, parse_number

NO_FEEDBACK = "none"  # the planner's feedback on a first try; a constant, so demos and cache stay stable


def _inputs(task: TaskLike) -> dict[str, Any]:
    return {name: (str, dspy.InputField()) for name in task.input_fields}


class MathSolver(dspy.Module):
    """Question → number in one call (Predict), or after a reasoning field (ChainOfThought)."""

    def __init__(self, task: TaskLike, reasoning: bool = False):
        super().__init__()
        self.inputs, self.output = tuple(task.input_fields), task.answer_field
        signature = dspy.Signature(
            {**_inputs(task), self.output: (float, dspy.OutputField(desc="the final answer as a number"))},
            "Solve the math word problem.",
        )
        self.solve = dspy.ChainOfThought(signature) if reasoning else dspy.Predict(signature)

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        record = Record(steps=1)
        answer = None
        with step("solve"):
            try:
                value, note = ask(self.solve, self.output, {name: kwargs[name] for name in self.inputs}, record)
                answer = parse_number(value)
                record.note(note)
            except ValueError as e:  # UnreadableOutput, or no number in the raw answer
                record.fail(f"solve: {e}")
        return record.prediction(**{self.output: answer})


class Step(pydantic.BaseModel):  # the GSM8K socratic shape; the docstring goes into the JSON schema, so it is short
    """A sub-question and the arithmetic that answers it."""

    question: str = pydantic.Field(description="a small sub-question")
    expression: str = pydantic.Field(description="arithmetic that answers it, e.g. 16 - 3 - 4 or #1 * 2")


class MathChain(dspy.Module):
    """The model plans, the calculator computes: a tiny model is better at splitting a problem than at sums.

    `plan` emits a list of steps, each a sub-question and an arithmetic expression that may use earlier
    results as `#1`, `#2`…; every expression is computed by `validators.calculate` and the answer is the
    last result, so no LM call does arithmetic. When the plan is unreadable, empty, or an expression fails,
    the plan is asked again with the calculator's errors in `feedback`, up to `max_retries` times; the
    feedback grows with each failure, so a retry never repeats an input (and its cached output).
    """

    def __init__(self, task: TaskLike, max_retries: int = 2):
        super().__init__()
        self.inputs, self.output = tuple(task.input_fields), task.answer_field
        self.max_retries = max_retries
        self.plan = dspy.Predict(
            dspy.Signature(
                {
                    **_inputs(task),
                    "feedback": (str, dspy.InputField(desc="errors in earlier steps to fix, or none")),
                    "steps": (list[Step], dspy.OutputField(desc="the steps; the last one answers the question")),
                },
                "Break the math word problem into small steps. For each step ask a sub-question and write one "
                "arithmetic expression that answers it, with numbers from the problem or earlier results as #1, #2.",
            )
        )

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        record = Record()
        inputs = {name: kwargs[name] for name in self.inputs}
        errors: list[str] = []
        answer: Number | None = None
        while answer is None and (not errors or record.retries < self.max_retries):
            if errors:
                record.retries += 1
            feedback = "\n".join(errors) if errors else NO_FEEDBACK
            record.steps += 1
            with step("plan" if not errors else "plan.retry"):
                try:
                    steps, note = ask(self.plan, "steps", {**inputs, "feedback": feedback}, record)
                    record.note(note)
                    answer = self._compute(steps, record)
                except (CalculatorError, UnreadableOutput) as e:
                    errors.append(f"attempt {len(errors) + 1}: {e}")
                    record.fail(errors[-1])
        return record.prediction(**{self.output: answer})

    @staticmethod
    def _compute(steps: Any, record: Record) -> Number:
        if not isinstance(steps, list):
            raise CalculatorError(f"the steps are not a list: {str(steps)[:80]!r}")
        expressions = [_expression(s) for s in steps]
        results = evaluate_steps(expressions)
        for number, (expression, result) in enumerate(zip(expressions, results), start=1):
            record.note(f"#{number}: {expression} = {format_number(result)}")
        return results[-1]


def _expression(item: Any) -> str:
    """A step's expression, also from the raw dicts of a plan that failed to parse as `Step`s."""
    if isinstance(item, Step):
        return item.expression
    return str(item.get("expression", "")) if isinstance(item, dict) else str(item)


def _numeric_metric(task: TaskLike) -> NumericMatch:
    return NumericMatch(task.answer_field)


SPECS = (
    ProgramSpec("math.predict", "math", "one call: question → number", MathSolver, _numeric_metric),
    ProgramSpec(
        "math.cot", "math", "one call with reasoning before the number",
        lambda task: MathSolver(task, reasoning=True), _numeric_metric,
    ),
    ProgramSpec(
        "math.chain", "math", "sub-questions with expressions, computed by a calculator; retried on errors",
        MathChain, _numeric_metric, settings={"max_retries": 2},
    ),
)
