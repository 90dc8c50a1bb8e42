"""Running an experiment, top to bottom like a recipe:

  load splits -> build the program -> compile -> score -> log -> (all combinations) -> Pareto plot

One MLflow parent run per experiment, one child per combination of the sweep. A child whose resolved
config hash already finished in this experiment's parent is not recomputed (resume after a kill).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import dspy
import mlflow
from mlflow.tracking import MlflowClient

from optimize import cost, tracking
from optimize.adapter import CacheFriendlyAdapter
from optimize.config import Experiment, Trial
from optimize.data import Splits, load_splits
from optimize.engine import build_lm
from optimize.errors import ChainoptError
from optimize.evaluate import ChainRecord, evaluate
from optimize.models import describe
from optimize.progress import EvalProgress
from optimize.progress import phase as timed
from optimize.optimizers import CompileInputs, compile_program, get_optimizer, resolve_settings, trajectory

Progress = Callable[[str], None]


@dataclass
class TrialResult:
    trial: Trial
    run_id: str
    metrics: dict[str, float]
    reused: bool = False
    stopped: str = ""
    records: list[ChainRecord] = field(default_factory=list)


@dataclass
class ExperimentResult:
    experiment: Experiment
    experiment_id: str
    parent_run_id: str
    trials: list[TrialResult]
    tracking_uri: str


def adapter() -> dspy.Adapter:
    """Cache-friendly JSON prompts: static parts first, so the engine shares the prefix across calls."""
    return CacheFriendlyAdapter()


def experiment_hash(exp: Experiment) -> str:
    return hashlib.sha256(json.dumps(exp.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def check(exp: Experiment, source: Path | None = None) -> None:
    """Fail before anything runs: every program, optimizer setting, model and dataset must resolve.
    With `source`, an error starts with the experiment file's name, as the schema's errors do."""
    from programs import get_program

    try:
        for model in exp.models:
            describe(model.spec)
        for program in exp.programs:
            get_program(program.name)
        for opt in exp.optimizers:
            resolve_settings(get_optimizer(opt.name), opt.settings)
            if opt.teacher is not None:
                describe(opt.teacher.spec)
        load_splits(exp.data)
    except ChainoptError as exc:
        if source is None:
            raise
        raise type(exc)(f"{source}: {exc}") from None


def prices(trial: Trial) -> dict[str, float]:
    c = trial.cost
    return {"usd_per_hour": c.usd_per_hour, "usd_per_m_input": c.usd_per_m_input, "usd_per_m_output": c.usd_per_m_output}


def run_trial(trial: Trial, splits: Splits, progress: Progress = lambda s: None, live: bool | None = None) -> TrialResult:
    """Compile and score one combination inside the active (child) MLflow run."""
    from programs import get_program

    spec = get_program(trial.program.name)
    opt_spec = get_optimizer(trial.optimizer.name)
    opt_settings = resolve_settings(opt_spec, trial.optimizer.settings)
    model_cfg = trial.model.model_copy(update={"seed": trial.seed})
    with timed(f"loading {model_cfg.spec}", progress, live=live):
        lm = build_lm(model_cfg)
        teacher = build_lm(trial.optimizer.teacher) if trial.optimizer.teacher else lm
    info = describe(model_cfg.spec)
    tracking.log_params({**trial.flat_params(), **info.as_params(), "config_hash": trial.config_hash(),
                         **{f"optimizer.resolved.{k}": v for k, v in opt_settings.items()},
                         "data.task": splits.task.name, "data.train_size": len(splits.train),
                         "data.dev_size": len(splits.dev), "data.test_size": len(splits.test)})
    student = spec.build(splits.task, **trial.program.settings)
    metric = spec.metric(splits.task)
    watts = trial.cost.watts_per_core
    metrics: dict[str, float] = {}
    with dspy.context(lm=lm, adapter=adapter()), \
            cost.metered("run", trial.budget.run_tokens, all_threads=True) as run_tally:
        with timed(f"compiling with {opt_spec.name}", progress, live=live), cost.spending(watts) as phase:
            ctx = CompileInputs(metric=metric, trainset=splits.train, valset=splits.dev, teacher_lm=teacher,
                                seed=trial.seed, threads=trial.eval.threads, input_fields=splits.task.input_fields)
            compiled, teleprompter = compile_program(opt_spec, dict(opt_settings), student, ctx)
        compile_units = cost.spend_units(phase["spend"], prices(trial))
        metrics.update({f"compile_{unit}": value for unit, value in compile_units.items()})
        examples = getattr(splits, trial.eval.split)
        with cost.spending(watts) as phase, EvalProgress(len(examples), f"evaluating {trial.eval.split}",
                                                         report=progress, live=live) as bar:
            result = evaluate(compiled, examples, metric, splits.task.answer_field, threads=trial.eval.threads,
                              chain_tokens=trial.budget.chain_tokens, run_tally=run_tally, on_record=bar.record)
    records = result.records
    metrics.update(cost.summarize([r.success for r in records], [r.seconds for r in records], phase["spend"],
                                  prices(trial)))
    metrics.update({"parse_failures": sum(r.parse_failure for r in records),
                    "validator_failures": sum(r.validator_failures for r in records),
                    "retries": sum(r.retries for r in records), "steps": sum(r.steps for r in records),
                    "budget_exceeded_chains": sum(r.budget_exceeded for r in records),
                    "errors": sum(r.error is not None for r in records),
                    "attempted": result.attempted, "planned": result.total})
    tracking.log_metrics(metrics)
    tracking.log_table([r.row() for r in records], "predictions.json")
    tracking.log_program(compiled)
    tracking.log_json(trial.model_dump(mode="json"), "trial.json")
    tracking.log_json(dataclasses.asdict(splits.task), "task.json")
    tracking.log_json({"optimizer": opt_spec.name, "steps": trajectory(compiled, teleprompter)}, "trajectory.json")
    stopped = "run_token_budget" if result.stopped_by_budget else ""
    if stopped:
        mlflow.set_tag(tracking.TAG_STOPPED, stopped)
    return TrialResult(trial, mlflow.active_run().info.run_id, metrics, stopped=stopped, records=records)


def _baseline_for(result: TrialResult, results: list[TrialResult]) -> TrialResult | None:
    t = result.trial
    for other in results:
        o = other.trial
        if o.optimizer.name == "none" and (o.model, o.program, o.seed) == (t.model, t.program, t.seed):
            return other
    return None


def log_break_even(results: list[TrialResult]) -> None:
    """Queries until each compile is repaid by its lower cost per success against the zero-shot baseline."""
    client = MlflowClient()
    for res in results:
        base = _baseline_for(res, results)
        if base is None or base is res:
            continue
        for unit in cost.UNITS:
            value = cost.break_even(res.metrics.get(f"compile_{unit}", 0.0),
                                    base.metrics.get(f"{unit}_per_success", math.inf),
                                    res.metrics.get(f"{unit}_per_success", math.inf))
            res.metrics[f"break_even_queries_{unit}"] = value
            client.log_metric(res.run_id, f"break_even_queries_{unit}", value)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, turned into the same clean stop as Ctrl-C."""


def _on_sigterm(signum, frame):
    raise Interrupted()


def run_experiment(exp: Experiment, source: Path | None = None, progress: Progress = lambda s: None,
                   live: bool | None = None) -> ExperimentResult:
    """Run (or resume) every combination of the sweep and record it in MLflow; `live` forces the progress bar."""
    check(exp, source)
    experiment_id = tracking.setup(exp.tracking.experiment or exp.name, exp.tracking.uri)
    ehash = experiment_hash(exp)
    parent = tracking.find_parent(experiment_id, ehash)
    previous = tracking.children(experiment_id, parent.info.run_id) if parent else []
    client = MlflowClient()
    for run in previous:  # a run left RUNNING was killed without a chance to say so (SIGKILL)
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")
    old_handler = signal.signal(signal.SIGTERM, _on_sigterm) if _main_thread() else None
    results: list[TrialResult] = []
    try:
        with mlflow.start_run(run_id=parent.info.run_id if parent else None, experiment_id=experiment_id,
                              run_name=exp.name, tags={tracking.TAG_KIND: "parent",
                                                       tracking.TAG_EXPERIMENT_HASH: ehash,
                                                       **tracking.versions()}) as parent_run:
            if parent is None:
                mlflow.log_dict(exp.model_dump(mode="json"), "experiment.json")
                if source is not None:
                    mlflow.log_text(source.read_text(encoding="utf-8"), f"config/{source.name}")
            trials = exp.combinations()
            for number, trial in enumerate(trials, 1):
                name = f"{trial.program.name}+{trial.optimizer.name}+{trial.model.spec}+s{trial.seed}"
                done = tracking.finished_child(previous, trial.config_hash())
                if done is not None:
                    progress(f"[{number}/{len(trials)}] {name}: finished earlier, reused")
                    results.append(TrialResult(trial, done.info.run_id, tracking.read_metrics(done), reused=True,
                                               stopped=done.data.tags.get(tracking.TAG_STOPPED, "")))
                    continue
                progress(f"[{number}/{len(trials)}] {name}")
                splits = load_splits(trial.data)
                with mlflow.start_run(run_name=name, nested=True, experiment_id=experiment_id,
                                      tags={tracking.TAG_KIND: "child", tracking.TAG_HASH: trial.config_hash(),
                                            **tracking.versions()}):
                    results.append(run_trial(trial, splits, lambda s: progress(f"    {s}"), live))
            log_break_even(results)
            rows = tracking.child_rows(experiment_id, parent_run.info.run_id)
            for row in rows:
                client.set_tag(row["run_id"], tracking.TAG_PARETO, str(row["pareto"]).lower())
            with tempfile.TemporaryDirectory() as tmp:
                mlflow.log_artifact(str(tracking.pareto_plot(rows, Path(tmp) / "pareto.png")))
            return ExperimentResult(exp, experiment_id, parent_run.info.run_id, results, tracking.tracking_uri(exp.tracking.uri))
    finally:
        if old_handler is not None:
            signal.signal(signal.SIGTERM, old_handler)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
