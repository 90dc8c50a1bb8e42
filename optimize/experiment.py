"""Running an experiment, top to bottom like a recipe:

  check -> (each combination: load splits -> run the trial -> record it) -> (each classical baseline:
  fit, score, record it) -> break-even -> Pareto front

One MLflow parent run per experiment, one child per combination of the sweep and per baseline. A child whose trial
identity (resolved config, model sha256, data hash) already finished in this experiment's parent is not
recomputed (resume after a kill). The trials run in optimize.trial; the records go through optimize.tracking.
"""

from __future__ import annotations

import hashlib
import json
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

from optimize import baselines, export, scale, tracking
from optimize.tracking import TrialResult
from optimize.config import Experiment, Trial
from optimize.data import Splits, Task, load_splits, split_source
from optimize.errors import ChainoptError, ConfigError
from optimize.interrupts import held, stop_on
from optimize.llm.engine import closed_on_interrupt, count_tokens
from optimize.llm.models import ModelInfo, describe
from optimize.llm.settings import ModelConfig
from optimize.optimizers import get_optimizer, resolve_settings, searchable
from optimize.trial import Outcome, build_program, get_program, identity, program_settings, run_trial
from programs.cascade import Cascade
from programs.retrieval import retrievers

Progress = Callable[[str], None]
T = TypeVar("T")


@dataclass
class ExperimentResult:
    experiment: Experiment
    experiment_id: str
    parent_run_id: str
    trials: list[TrialResult]
    tracking_uri: str


def experiment_hash(exp: Experiment) -> str:
    # An experiment with no baselines (no cascade) hashes as it did before the key existed: its parent resumes.
    # Where it runs ([execution]) is not what it is: a sweep resumes on either backend.
    dump = exp.model_dump(mode="json", exclude={"execution"} | (set() if exp.baselines else {"baselines"})
                          | (set() if exp.cascade else {"cascade"}))
    return hashlib.sha256(json.dumps(dump, sort_keys=True).encode()).hexdigest()[:16]


def check(exp: Experiment, source: Path | None = None) -> None:
    """Fail before anything runs: every program (with its settings, on the data's task), optimizer
    setting, model, dataset and baseline (on the data's task) must resolve, and an intent task's labels must
    fit each model's context. Every miss is reported at once, one per line, as the schema's errors are; with
    `source`, each line starts with the experiment file's name."""
    problems: list[ChainoptError] = []

    def attempt(step: Callable[..., T], *args: Any) -> T | None:
        try:
            return step(*args)
        except ChainoptError as exc:
            problems.append(exc)
            return None

    infos: dict[ModelConfig, ModelInfo | None] = {model: attempt(describe, model.spec) for model in exp.models}
    for opt in exp.optimizers:
        optimizer = attempt(get_optimizer, opt.name)
        if optimizer is not None:
            attempt(resolve_settings, optimizer, opt.settings)
        if opt.teacher is not None:
            infos[opt.teacher] = attempt(describe, opt.teacher.spec)
    splits = attempt(load_splits, exp.data)
    if splits is not None and splits.task.labels:
        for model, info in infos.items():
            if info is not None:
                attempt(labels_fit, splits.task, model, info)
    for trial in exp.combinations():
        spec = attempt(get_program, trial.program.name)
        if spec is not None and splits is not None:
            student = attempt(build_program, spec, splits.task, program_settings(trial, spec))
            if student is not None and trial.cascade:  # its thresholds are what settings_search may tune
                student = Cascade(student, [(m.spec, None) for m in trial.cascade.models], splits.task.answer_field,
                                  **trial.cascade.thresholds())
            if student is not None and retrievers(student) and not splits.train:
                problems.append(ConfigError(f"program {trial.program.name} retrieves from the training split, "
                                            f"which is empty: set [data] train (chainopt eval: --train N)"))
            if student is not None and trial.optimizer.name == "settings_search":
                space = {**get_optimizer("settings_search").defaults, **trial.optimizer.settings}["space"]
                attempt(searchable, student, space)
    for name in exp.baselines:
        baseline = attempt(baselines.get_baseline, name)
        if baseline is not None and splits is not None:
            attempt(baselines.check_baseline, baseline, splits)
    if problems:
        lines = dict.fromkeys(line if source is None else f"{source}: {line}"
                              for exc in problems for line in str(exc).splitlines())
        kinds = {type(exc) for exc in problems}
        raise (kinds.pop() if len(kinds) == 1 else ConfigError)("\n".join(lines))


def labels_fit(task: Task, model: ModelConfig, info: ModelInfo) -> None:
    """An intent prompt lists every label (intent.chain's retry too): a list the model's context cannot hold
    would fail every chain, so it is refused before anything runs, with the numbers."""
    listed = count_tokens(info, json.dumps(list(task.labels)))
    if listed + model.max_tokens > model.n_ctx:
        raise ConfigError(f"the {len(task.labels):,} labels of {task.name!r} take {listed:,} prompt tokens by "
                          f"{info.name}'s tokenizer, {listed + model.max_tokens:,} with max_tokens = "
                          f"{model.max_tokens} for the answer, over n_ctx = {model.n_ctx:,} of {model.spec}; "
                          f"raise n_ctx or use fewer labels")


def run_experiment(exp: Experiment, source: Path | None = None, progress: Progress = lambda s: None,
                   live: bool | None = None) -> ExperimentResult:
    """Run (or resume) every combination of the sweep and each baseline, and record them in MLflow; `live`
    forces the progress bar."""
    check(exp, source)
    experiment_id = tracking.setup(exp.tracking.experiment or exp.name, exp.tracking.uri)
    ehash = experiment_hash(exp)
    parent = tracking.find_parent(experiment_id, ehash)
    previous = tracking.children(experiment_id, parent.info.run_id) if parent else []
    tracking.mark_killed(previous)  # a run left RUNNING was killed without a chance to say so (SIGKILL)
    results: list[TrialResult] = []
    source_text = source.read_text(encoding="utf-8") if source is not None else None
    with stop_on(signal.SIGTERM), tracking.parent_run(experiment_id, exp, ehash, parent, source) as parent_id, \
            closed_on_interrupt():
        # (trial, baseline name): the sweep's combinations, then each classical baseline ("" for none)
        work = [(trial, "") for trial in exp.combinations()]
        work += [(baselines.baseline_trial(exp, name), name) for name in exp.baselines]
        total = len(work)
        remote: dict[int, Splits] = {}  # the sweep's combinations left to the Ray backend, by number

        def record(number: int, splits: Splits, compute: Callable[[], Outcome]) -> TrialResult:
            """Open the child run, compute (or take) the outcome and record it: only this process writes MLflow."""
            trial, baseline = work[number - 1]
            name = trial.program.name if baseline else trial.run_name
            key = baselines.identity(trial) if baseline else identity(trial)
            with tracking.child_run(experiment_id, name, key, baseline) as run_id:
                pool = not baseline and retrieves(trial, splits)
                datasets = tracking.log_datasets(data_slices(trial, splits, retrieves=pool))
                outcome = compute()
                with held():  # the outcome is recorded whole, or (a second signal) the run ends FAILED
                    if exp.tracking.traces and not baseline:
                        tracking.log_chain_traces(outcome.records, exp.tracking.trace_examples, trial.program.name)
                    tracking.record_trial(outcome)
                    if not baseline and not outcome.failed:
                        export.log_run_model(outcome, splits, run_id, experiment_file=source_text,
                                             eval_dataset=datasets.get("eval"),
                                             copy_model_file=exp.tracking.model_file)
            if outcome.failed:
                progress(f"    FAILED: {outcome.failed}")
            return TrialResult(trial, run_id, outcome.metrics, stopped=outcome.stopped, failed=outcome.failed,
                               records=outcome.records)

        done_by_number: dict[int, TrialResult] = {}
        for number, (trial, baseline) in enumerate(work, 1):
            name = trial.program.name if baseline else trial.run_name
            done = tracking.finished_child(previous, baselines.identity(trial) if baseline else identity(trial))
            if done is not None:
                progress(f"[{number}/{total}] {name}: finished earlier, reused")
                done_by_number[number] = TrialResult(trial, done.info.run_id, tracking.read_metrics(done), reused=True,
                                                     stopped=done.data.tags.get(tracking.TAG_STOPPED, ""))
                continue
            on_ray = exp.execution.backend == "ray" and not baseline  # baselines fit here, in seconds
            if not on_ray:
                progress(f"[{number}/{total}] {name}")
            splits = load_splits(trial.data)
            if splits.skipped:
                progress(f"    {splits.skipped} malformed row(s) skipped (data.skip_malformed)")
            if on_ray:
                remote[number] = splits
                continue
            done_by_number[number] = record(number, splits, lambda: baselines.run_baseline(trial, splits) if baseline
                                            else run_trial(trial, splits, lambda s: progress(f"    {s}"), live))
        if remote:
            with scale.cluster(exp.execution):
                trials = [(number, work[number - 1][0], splits) for number, splits in remote.items()]
                for number, outcome in scale.run_trials(exp.execution, trials, total, progress):
                    done_by_number[number] = record(number, remote[number], lambda: outcome)
        results.extend(done_by_number[number] for number in sorted(done_by_number))
        for result in results:
            result.metrics.update(tracking.log_break_even(result, results))
        tracking.mark_pareto(experiment_id, parent_id)
        return ExperimentResult(exp, experiment_id, parent_id, results, tracking.tracking_uri(exp.tracking.uri))


CONTEXTS = {"train": "training", "dev": "validation", "test": "test"}


def data_slices(trial: Trial, splits: Splits, *, retrieves: bool = False) -> list[tracking.DataSlice]:
    """The slices a trial reads, for the run's dataset inputs: the examples optimizers compile on
    (`training`), the other splits (`validation`, `test`; the one scored is `eval`) and, for a program that
    retrieves (or KNN demos), the whole training split it retrieves from (`retrieval`)."""
    cfg, name = trial.data, splits.task.name
    compile_train = splits.train[:cfg.compile_train] if cfg.compile_train else splits.train
    parts = [("train", compile_train), ("dev", splits.dev), ("test", splits.test)]
    slices = [tracking.DataSlice(f"{name}.{split}", [dict(ex) for ex in rows], split_source(cfg, split),
                                 "eval" if split == trial.eval.split else CONTEXTS[split], splits.task.answer_field)
              for split, rows in parts]
    if retrieves:
        slices.append(tracking.DataSlice(f"{name}.train.pool", [dict(ex) for ex in splits.train],
                                         split_source(cfg, "train"), "retrieval", splits.task.answer_field))
    return slices


def retrieves(trial: Trial, splits: Splits) -> bool:
    """Whether the trial's program retrieves from the training split (a retrieval step, or KNN demos)."""
    if trial.optimizer.name == "knn_fewshot":
        return True
    spec = get_program(trial.program.name)
    try:
        return bool(retrievers(build_program(spec, splits.task, program_settings(trial, spec))))
    except ChainoptError:
        return False
