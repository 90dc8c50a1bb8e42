"""Run a program over examples and keep one record per chain: answer, success, steps, checks, usage, time.

DSPy's Evaluate gives a score; chainopt also needs what each chain spent and why it failed, so this
loop meters every chain and keeps its record. Budgets: a chain over its ceiling counts as failed; a
run over its ceiling stops cleanly (the rest is not attempted) and says so.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import dspy
from dspy.utils.exceptions import AdapterParseError
from dspy.utils.parallelizer import ParallelExecutor

from optimize import cost
from optimize.errors import BudgetExceeded
from programs.contract import judging


@dataclass
class ChainRecord:
    """What one example's chain did and spent.

    `events` is what the chain did, in order, as plain dicts (JSON and pickle as they are; times in epoch
    nanoseconds): each LM call (`kind` "lm": step, model, start_ns, end_ns, input_computed, input_reused,
    output, cached; optimize.cost.lm_event) and each validator verdict (`kind` "verdict": step, validator,
    accepted, reason, value, retry, time_ns; programs.contract.judge). They are the calls counted in `usage`
    and the rejections counted in `validator_failures`, recorded where those are counted; a trace is
    written from them (optimize.tracking.log_chain_traces)."""

    index: int
    example_id: str
    inputs: dict[str, Any]
    gold: Any
    predicted: Any = None
    success: bool = False
    score: float = 0.0
    steps: int = 0
    validator_failures: int = 0
    retries: int = 0
    parse_failure: bool = False
    budget_exceeded: bool = False
    error: str | None = None
    usage: cost.Usage = field(default_factory=cost.Usage)
    by_step: dict[str, cost.Usage] = field(default_factory=dict)
    seconds: float = 0.0
    start_ns: int = 0  # when the chain started, epoch nanoseconds
    events: list[dict[str, Any]] = field(default_factory=list)
    # A cascade's chain (programs/cascade.py): the model that answered, why the first was escalated ("" when
    # it was not), what each model tried said, and whether the first model's own answer was right.
    answered_by: str = ""
    escalation: str = ""
    cascade: list[dict[str, Any]] = field(default_factory=list)
    first_success: bool | None = None

    def row(self) -> dict[str, Any]:
        """A flat row for the predictions table."""
        return {"index": self.index, "id": self.example_id, **{f"input.{k}": str(v) for k, v in self.inputs.items()},
                "gold": str(self.gold), "predicted": "" if self.predicted is None else str(self.predicted),
                "success": self.success, "score": self.score, "steps": self.steps,
                "validator_failures": self.validator_failures, "retries": self.retries,
                "parse_failure": self.parse_failure, "budget_exceeded": self.budget_exceeded,
                "error": self.error or "", "input_tokens_computed": self.usage.input_computed,
                "input_tokens_reused": self.usage.input_reused, "output_tokens": self.usage.output,
                "lm_calls": self.usage.calls, "seconds": round(self.seconds, 4),
                "tokens_by_step": {k: v.tokens for k, v in self.by_step.items()},
                **({"answered_by": self.answered_by, "escalation": self.escalation,
                    "first_success": self.first_success,
                    "cascade": [{k: v if v is None or isinstance(v, (int, float, bool)) else str(v)
                                 for k, v in tried.items()} for tried in self.cascade]}
                   if self.answered_by else {})}


@dataclass
class EvalResult:
    records: list[ChainRecord]
    attempted: int
    total: int
    stopped_by_budget: bool
    wall_seconds: float
    cpu_seconds: float


def find_cause(exc: BaseException | None, kind: type) -> BaseException | None:
    """DSPy wraps engine errors; look through the cause chain for ours."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, kind):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def score_of(value: Any) -> float:
    """Metrics may return bool, float, or GEPA's Prediction(score, feedback)."""
    if hasattr(value, "score"):
        value = value.score
    return float(value or 0.0)


def evaluate(program: dspy.Module, examples: list[dspy.Example], metric: Callable, answer_field: str, *,
             threads: int = 8, chain_tokens: int | None = None, run_tally: cost.Tally | None = None,
             on_record: Callable[[ChainRecord], None] | None = None, start: int = 0) -> EvalResult:
    """Score `program` on `examples`, metering each chain; `run_tally` (if given) carries the run's ceiling.
    `start` is the index of the first example in its whole split (a Ray shard's records keep their place)."""
    stop = threading.Event()
    cpu0, wall0 = time.process_time(), time.perf_counter()

    def run_one(item: tuple[int, dspy.Example]) -> ChainRecord | None:
        index, example = item
        if stop.is_set():
            return None
        inputs = dict(example.inputs())
        record = ChainRecord(index=index, example_id=str(example.get("id", index)), inputs=inputs,
                             gold=example.get(answer_field))
        start, record.start_ns = time.perf_counter(), time.time_ns()
        with cost.metered(f"chain {record.example_id}", chain_tokens, events=True) as tally, judging(tally.log):
            try:
                pred = program(**inputs)
                record.predicted = pred.get(answer_field)
                record.steps = int(pred.get("steps", 1) or 1)
                record.validator_failures = int(pred.get("validator_failures", 0) or 0)
                record.retries = int(pred.get("retries", 0) or 0)
                record.parse_failure = bool(pred.get("parse_failures", 0))
                if record.gold is not None:  # a new input without its answer (chainopt predict): nothing to grade
                    record.score = score_of(metric(example, pred))
                    record.success = record.score >= 1.0
                if pred.get("cascade"):
                    record.answered_by, record.escalation = str(pred.get("answered_by")), str(pred.get("escalation"))
                    record.cascade = list(pred.get("cascade"))
                    if record.gold is not None:
                        first = dspy.Prediction(**{answer_field: record.cascade[0]["answer"]})
                        record.first_success = score_of(metric(example, first)) >= 1.0
            except Exception as exc:  # one chain's failure is a data point, not a crash
                budget = find_cause(exc, BudgetExceeded)
                record.budget_exceeded = budget is not None
                record.parse_failure = find_cause(exc, AdapterParseError) is not None
                record.error = str(budget or exc).splitlines()[0][:300] if str(budget or exc) else type(exc).__name__
                if budget is not None and budget.scope == "run":
                    stop.set()
        if tally.over and not record.budget_exceeded:  # a program that caught the refusal still spent too much
            record.success, record.budget_exceeded = False, True
            record.error = str(BudgetExceeded(tally.label, tally.limit, tally.usage.tokens))
        record.seconds = time.perf_counter() - start
        record.usage, record.by_step, record.events = tally.usage, dict(tally.by_step), tally.events
        if on_record:
            on_record(record)
        return record

    executor = ParallelExecutor(num_threads=threads, max_errors=len(examples) + 1, disable_progress_bar=True,
                                provide_traceback=False, timeout=0)
    results = executor.execute(run_one, list(enumerate(examples, start)))
    records = [r for r in results if r is not None]
    return EvalResult(records=records, attempted=len(records), total=len(examples),
                      stopped_by_budget=stop.is_set() or bool(run_tally and run_tally.full),
                      wall_seconds=time.perf_counter() - wall0, cpu_seconds=time.process_time() - cpu0)
