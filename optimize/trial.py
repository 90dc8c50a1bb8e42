"""One combination of a sweep, run: compile, evaluate, cost. It returns an outcome and touches no store.

Recording an outcome is a separate step (optimize.tracking), so a trial runs wherever its model does
(a worker with no MLflow in reach, a benchmark child, `chainopt predict`). `run`, `eval`, `predict`
and `bench` all come through here: `run_trial` for a whole combination (a bench path brings its own LM
and adapter), `score` for a program that is already built (an export).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import dspy

from optimize import cost
from optimize.config import Trial
from optimize.data import Splits, Task, data_digest
from optimize.errors import BudgetExceeded, ConfigError
from optimize.evaluate import ChainRecord, EvalResult, evaluate, find_cause
from optimize.llm.adapter import CacheFriendlyAdapter
from optimize.llm.engine import build_lm
from optimize.llm.models import describe
from optimize.llm.settings import ModelConfig
from optimize.llm.types import Observer, observe
from optimize.optimizers import (CompileInputs, compile_program, get_optimizer, knn_program, resolve_settings,
                                 trajectory)
from optimize.progress import EvalProgress
from optimize.progress import phase as timed
from optimize.registry import Registry
from programs import PROGRAMS as _PROGRAMS
from programs import ProgramSpec
from programs.cascade import Cascade
from programs.contract import ProgramError, hear
from programs.retrieval import fill_retrievers

Progress = Callable[[str], None]
PROGRAMS: Registry[ProgramSpec] = Registry("program", _PROGRAMS)
STOPPED_BY_BUDGET = "run_token_budget"

# A choice's confidence, as the engine reports it, reaches the program that asked (a cascade listens for it).
observe(Observer(before=lambda: None, after=lambda call, model: None, heard=hear))


def get_program(name: str) -> ProgramSpec:
    return PROGRAMS.get(name)


def build_program(spec: ProgramSpec, task: Task, settings: dict[str, Any]) -> dspy.Module:
    """A fresh module of `spec` for `task`; a setting or task it cannot take is the user's ConfigError."""
    try:
        return spec.build(task, **settings)
    except ProgramError as exc:
        raise ConfigError(str(exc)) from None


def program_settings(trial: Trial, spec: ProgramSpec) -> dict[str, Any]:
    """The program's settings, with `budget.max_retries` for a program that retries and sets none itself."""
    settings = dict(trial.program.settings)
    if "max_retries" in spec.settings:
        settings.setdefault("max_retries", trial.budget.max_retries)
    return settings


def adapter() -> dspy.Adapter:
    """Cache-friendly JSON prompts: static parts first, so the engine shares the prefix across calls."""
    return CacheFriendlyAdapter()


def prices(trial: Trial) -> dict[str, float]:
    c = trial.cost
    return {"usd_per_hour": c.usd_per_hour, "usd_per_m_input": c.usd_per_m_input, "usd_per_m_output": c.usd_per_m_output}


def identity(trial: Trial) -> str:
    """What makes two trials the same work: the resolved config, the model file's sha256 and the data's
    content hash. A changed GGUF or data file at the same path is a new trial, never a reused one."""
    blob = {"config": trial.config_hash(), "model": describe(trial.model.spec).sha256,
            "teacher": describe(trial.optimizer.teacher.spec).sha256 if trial.optimizer.teacher else None,
            "data": data_digest(trial.data)}
    if trial.cascade:  # every model of a cascade, by content
        blob["cascade"] = [describe(m.spec).sha256 for m in trial.cascade.models]
    blob = json.dumps(blob, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class Outcome:
    """Everything one trial produced: what a store records, and what a caller reads back."""

    trial: Trial
    metrics: dict[str, float]
    records: list[ChainRecord] = field(default_factory=list)
    params: dict[str, Any] = field(default_factory=dict)
    program_state: dict[str, Any] | None = None  # DSPy's JSON state of the compiled program (never a pickle)
    artifacts: dict[str, Any] = field(default_factory=dict)  # JSON artifacts by file name
    stopped: str = ""  # why the trial stopped early ("" when it ran to the end)
    failed: str = ""  # why the trial is no result: too many chains ended in an error ("" when it is one)
    program: dspy.Module | None = None  # the compiled module itself, for callers in this process


def program_state(program: dspy.Module) -> dict[str, Any]:
    """The module's JSON state, as `program.save("x.json")` writes it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "program.json"
        program.save(str(path))
        return json.loads(path.read_text())


def chain_metrics(records: list[ChainRecord], result: EvalResult, spend: cost.Spend,
                  price: dict[str, float]) -> dict[str, float]:
    """Accuracy, cost per success and the chains' failure counts, from one evaluation."""
    metrics = cost.summarize([r.success for r in records], [r.seconds for r in records], spend, price)
    metrics.update({"parse_failures": sum(r.parse_failure for r in records),
                    "validator_failures": sum(r.validator_failures for r in records),
                    "retries": sum(r.retries for r in records), "steps": sum(r.steps for r in records),
                    "budget_exceeded_chains": sum(r.budget_exceeded for r in records),
                    "errors": sum(r.error is not None for r in records),
                    "error_rate": error_rate(records),
                    "attempted": result.attempted, "planned": result.total})
    return metrics


def error_rate(records: list[ChainRecord]) -> float:
    """The share of chains that ended in an error (an exception or a budget), not in a wrong answer."""
    return sum(r.error is not None for r in records) / len(records) if records else 0.0


def too_many_errors(records: list[ChainRecord], max_error_rate: float) -> str:
    """Why chains that mostly failed to run are no result, in one line with their most common error;
    "" when the error rate is within `max_error_rate`."""
    rate = error_rate(records)
    if rate <= max_error_rate:
        return ""
    (common, count), = Counter(r.error for r in records if r.error is not None).most_common(1)
    return (f"{rate:.0%} of {len(records)} chains ended in an error (over eval.max_error_rate = {max_error_rate}); "
            f"most common ({count}x): {common}")


def score(program: dspy.Module, examples: list[dspy.Example], metric: Callable, task: Task, *,
          lm: dspy.LM, adapter_: dspy.Adapter | None = None, threads: int = 8, chain_tokens: int | None = None,
          run_tally: cost.Tally | None = None, watts_per_core: float = 0.0, price: dict[str, float] | None = None,
          progress: Progress = lambda s: None, live: bool | None = False,
          label: str = "evaluating") -> tuple[dict[str, float], EvalResult]:
    """Evaluate a built program on `examples` with `lm`: its metrics and per-chain records."""
    with dspy.context(lm=lm, adapter=adapter_ or adapter()), cost.spending(watts_per_core) as phase, \
            EvalProgress(len(examples), label, report=progress, live=live) as bar:
        result = evaluate(program, examples, metric, task.answer_field, threads=threads, chain_tokens=chain_tokens,
                          run_tally=run_tally, on_record=bar.record)
    return eval_metrics(result.records, result, phase["spend"], price or {}, task), result


def eval_metrics(records: list[ChainRecord], result: EvalResult, spend: cost.Spend, price: dict[str, float],
                 task: Task) -> dict[str, float]:
    """An evaluation's metrics from its records (in example order), whichever process scored them."""
    metrics = chain_metrics(records, result, spend, price)
    if task.kind == "multilabel":  # the score is per-example F1 (accuracy is exact-set accuracy): its mean
        metrics["f1"] = mean_score(records)
    return metrics


def mean_score(records: list[ChainRecord]) -> float:
    """The mean metric score of the chains, a chain that ended in an error counting 0."""
    return sum(r.score for r in records) / len(records) if records else 0.0


@dataclass
class Models:
    """The LMs one trial calls: its model, the optimizer's teacher, and a cascade's further models."""

    lm: dspy.LM
    teacher: dspy.LM
    cascade: list[tuple[str, dspy.LM]] = field(default_factory=list)


def load_models(trial: Trial, progress: Progress = lambda s: None, live: bool | None = None, *,
                lm: dspy.LM | None = None, n_threads: int | None = None) -> Models:
    """Load the trial's models (once per process: the engine caches them). `n_threads`, for a model that sets
    none, is llama.cpp's thread count (a Ray worker's CPUs); the trial's config and identity stay as written."""
    def cfg(model: ModelConfig) -> ModelConfig:
        return model.model_copy(update={"seed": trial.seed, "n_threads": model.n_threads or n_threads})

    cascade_lms: list[tuple[str, dspy.LM]] = []
    for model in trial.cascade.models[1:] if trial.cascade else ():
        with timed(f"loading {model.spec}", progress, live=live):
            cascade_lms.append((model.spec, build_lm(cfg(model))))
    with timed(f"loading {trial.model.spec}", progress, live=live):
        lm = lm or build_lm(cfg(trial.model))
        teacher_cfg = trial.optimizer.teacher
        teacher = build_lm(teacher_cfg.model_copy(update={"n_threads": teacher_cfg.n_threads or n_threads})) \
            if teacher_cfg else lm
    return Models(lm, teacher, cascade_lms)


def student(trial: Trial, splits: Splits, models: Models | None) -> dspy.Module:
    """The trial's program before compiling (a cascade over its models; with no `models`, a cascade without
    LMs, enough to read its settings), its retrievers filled from the whole training split."""
    spec = get_program(trial.program.name)
    program = build_program(spec, splits.task, program_settings(trial, spec))
    if trial.cascade:
        lms = [(trial.model.spec, models.lm), *models.cascade] if models else \
            [(m.spec, None) for m in trial.cascade.models]
        program = Cascade(program, lms, splits.task.answer_field, **trial.cascade.thresholds())
    fill_retrievers(program, splits.train)  # retrieval sees the whole training split
    return program


def rebuild(trial: Trial, splits: Splits, state: dict[str, Any], models: Models | None = None) -> dspy.Module:
    """The compiled program again, from its JSON state: how it reaches a Ray worker (and comes back). A
    `knn_fewshot` program gets its KNN demos back from the whole training split, as it was compiled."""
    program = student(trial, splits, models)
    program.load_state(state)
    if trial.optimizer.name == "knn_fewshot":
        metric = get_program(trial.program.name).metric(splits.task)
        program = knn_program(program, trial.optimizer.settings, splits.train, metric, splits.task.input_fields)
    return program


@dataclass
class Compiled:
    """The compile phase's result, all plain data but `program`: what the score phase and the store need."""

    trial: Trial
    params: dict[str, Any]
    metrics: dict[str, float]  # skipped rows and the compile's costs
    artifacts: dict[str, Any]
    state: dict[str, Any] | None  # None: the run's token budget stopped the compile (nothing to evaluate)
    program: dspy.Module | None = None  # the compiled module, in the process that compiled it

    def scored(self, metrics: dict[str, float], records: list[ChainRecord], stopped_by_budget: bool,
               program: dspy.Module | None) -> Outcome:
        """The trial's outcome from its evaluation's metrics and records (in example order)."""
        metrics = {**self.metrics, **metrics}
        if self.trial.cascade and program is not None:
            metrics.update(cascade_metrics(self.trial, records, program))
        return Outcome(self.trial, metrics, records, self.params, self.state, self.artifacts,
                       stopped=STOPPED_BY_BUDGET if stopped_by_budget else "",
                       failed=too_many_errors(records, self.trial.eval.max_error_rate), program=program)

    def unevaluated(self) -> Outcome:
        """The outcome of a compile the run's token budget stopped."""
        return Outcome(self.trial, dict(self.metrics), [], self.params, None, self.artifacts,
                       stopped=STOPPED_BY_BUDGET)


def compile_trial(trial: Trial, splits: Splits, models: Models, run_tally: cost.Tally,
                  progress: Progress = lambda s: None, live: bool | None = None) -> Compiled:
    """Compile the trial's program (inside the caller's dspy.context and run tally) and say what it cost."""
    spec = get_program(trial.program.name)
    opt_spec = get_optimizer(trial.optimizer.name)
    opt_settings = resolve_settings(opt_spec, trial.optimizer.settings)
    settings = program_settings(trial, spec)
    info = describe(trial.model.spec)
    params = {**trial.flat_params(), **info.as_params(), "config_hash": identity(trial),
              "data.digest": data_digest(trial.data),  # the data measured on: export checks it is unchanged
              **{f"optimizer.resolved.{k}": v for k, v in opt_settings.items()},
              **{f"program.resolved.{k}": v for k, v in settings.items()},
              "data.task": splits.task.name, "data.train_size": len(splits.train),
              "data.dev_size": len(splits.dev), "data.test_size": len(splits.test),
              "data.skipped_rows": splits.skipped}
    if trial.optimizer.teacher:
        params.update({f"teacher.{k.removeprefix('model.')}": v for k, v in describe(trial.optimizer.teacher.spec)
                       .as_params().items()})
    if trial.cascade:
        params.update(cascade_params(trial))
    program = student(trial, splits, models)
    metrics: dict[str, float] = {"skipped_rows": splits.skipped}
    compiled, teleprompter = program, None
    with timed(f"compiling with {opt_spec.name}", progress, live=live), cost.spending(trial.cost.watts_per_core) as phase:
        ctx = CompileInputs(metric=spec.metric(splits.task), trainset=splits.train[:trial.data.compile_train],
                            valset=splits.dev, teacher_lm=models.teacher, seed=trial.seed, threads=trial.eval.threads,
                            input_fields=splits.task.input_fields, pool=splits.train)
        try:
            compiled, teleprompter = compile_program(opt_spec, dict(opt_settings), program, ctx)
        except Exception as exc:
            if not _budget_error(exc, run_tally):
                raise
    metrics.update({f"compile_{unit}": value for unit, value in cost.spend_units(phase["spend"], prices(trial)).items()})
    artifacts = {"trial.json": trial.model_dump(mode="json"), "task.json": dataclasses.asdict(splits.task),
                 "trajectory.json": {"optimizer": opt_spec.name, "steps": trajectory(compiled, teleprompter)}}
    # An optimizer may swallow the refused calls as failed examples and finish: the tally still knows.
    if run_tally.full:
        progress(f"run token budget reached while compiling ({run_tally.usage.tokens} of "
                 f"{run_tally.limit} tokens): not evaluated")
        return Compiled(trial, params, metrics, artifacts, None)
    return Compiled(trial, params, metrics, artifacts, program_state(compiled), compiled)


def score_shard(trial: Trial, splits: Splits, state: dict[str, Any], start: int, stop: int,
                models: Models) -> tuple[list[ChainRecord], cost.Spend]:
    """Evaluate examples [start, stop) of the trial's eval split with the program rebuilt from `state`:
    one Ray worker's share of an evaluation. Records keep their index in the whole split."""
    program = rebuild(trial, splits, state, models)
    examples = getattr(splits, trial.eval.split)[start:stop]
    metric = get_program(trial.program.name).metric(splits.task)
    with dspy.context(lm=models.lm, adapter=adapter()), cost.spending(trial.cost.watts_per_core) as phase:
        result = evaluate(program, examples, metric, splits.task.answer_field, threads=trial.eval.threads,
                          chain_tokens=trial.budget.chain_tokens, start=start)
    return result.records, phase["spend"]


def run_trial(trial: Trial, splits: Splits, progress: Progress = lambda s: None, live: bool | None = None,
              *, lm: dspy.LM | None = None, adapter_: dspy.Adapter | None = None,
              n_threads: int | None = None) -> Outcome:
    """Compile and score one combination in this process. `lm`/`adapter_` replace the trial's model and
    chainopt's adapter (the bench's stock paths); by default the trial's model runs on chainopt's engine."""
    models = load_models(trial, progress, live, lm=lm, n_threads=n_threads)
    with dspy.context(lm=models.lm, adapter=adapter_ or adapter()), \
            cost.metered("run", trial.budget.run_tokens, all_threads=True) as run_tally:
        compiled = compile_trial(trial, splits, models, run_tally, progress, live)
        if compiled.program is None:
            return compiled.unevaluated()
        examples = getattr(splits, trial.eval.split)
        evaluated, result = score(compiled.program, examples, get_program(trial.program.name).metric(splits.task),
                                  splits.task, lm=models.lm, adapter_=adapter_, threads=trial.eval.threads,
                                  chain_tokens=trial.budget.chain_tokens, run_tally=run_tally,
                                  watts_per_core=trial.cost.watts_per_core, price=prices(trial), progress=progress,
                                  live=live, label=f"evaluating {trial.eval.split}")
        return compiled.scored(evaluated, result.records, result.stopped_by_budget, compiled.program)


def cascade_params(trial: Trial) -> dict[str, Any]:
    """What names a cascade's models in its run: `cascade` (the run's model, as the report shows it) and each
    model's spec and file."""
    assert trial.cascade is not None
    params: dict[str, Any] = {"cascade": trial.cascade.name}
    for n, cfg in enumerate(trial.cascade.models, 1):
        info = describe(cfg.spec)
        params.update({f"cascade.model{n}.spec": cfg.spec, f"cascade.model{n}.sha256": info.sha256,
                       f"cascade.model{n}.quantization": info.quantization})
    return params


def cascade_metrics(trial: Trial, records: list[ChainRecord], program: dspy.Module) -> dict[str, float]:
    """How a cascade did: its escalation rate, the thresholds it ran with (tuned ones included), and per model
    (1 = the cheapest) its answers, LM calls, tokens and LM seconds; for the first model, its accuracy and
    LM seconds per success alone on the same examples (it answers every one of them first)."""
    assert trial.cascade is not None
    n = len(records) or 1
    escalated = [r for r in records if r.escalation]
    metrics: dict[str, float] = {"escalated": len(escalated), "escalation_rate": len(escalated) / n,
                                 **{f"cascade.{k}": float(v) for k, v in program.settings.values.items()}}
    if escalated:
        metrics["escalated_accuracy"] = sum(r.success for r in escalated) / len(escalated)
        metrics["escalated_first_accuracy"] = sum(bool(r.first_success) for r in escalated) / len(escalated)
    for k, cfg in enumerate(trial.cascade.models, 1):
        used = [u for r in records for key, u in r.by_step.items() if key.startswith(cfg.spec + "/")]
        seconds = sum(u.seconds for u in used)
        metrics.update({f"model{k}.answered": sum(r.answered_by == cfg.spec for r in records),
                        f"model{k}.lm_calls": sum(u.calls for u in used),
                        f"model{k}.tokens": sum(u.tokens for u in used), f"model{k}.lm_seconds": seconds})
        if k == 1:
            wins = sum(bool(r.first_success) for r in records)
            metrics.update({"model1.accuracy_alone": wins / n,
                            "model1.lm_seconds_per_success_alone": cost.per_success(seconds, wins)})
    metrics["lm_seconds_per_success"] = cost.per_success(sum(r.usage.seconds for r in records),
                                                         sum(r.success for r in records))
    return metrics


def _budget_error(exc: BaseException, run_tally: cost.Tally) -> bool:
    """Whether `exc` (as DSPy wraps it) is the run's budget stopping a compile."""
    return find_cause(exc, BudgetExceeded) is not None and run_tally.full
