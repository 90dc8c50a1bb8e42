"""The Ray backend: a sweep's trials on a Ray cluster's workers, this process (the driver) recording them.

Ray core, not Tune: long-lived workers (actors), each loading the sweep's models once, llama.cpp running on
the worker's own CPUs. A trial compiles on one worker; the compiled program comes back as DSPy's JSON state
(never a pickle) and its evaluation is cut into contiguous shards, one per worker, each rebuilding the
program from that state. Records, spends and outcomes travel as plain data; the driver merges the shards'
records in example order and computes the metrics with the same `chain_metrics` as the local backend.
Nothing here writes MLflow: the caller records each outcome as it is yielded, so resume by config hash
works as it does locally. Ray is imported only when this backend runs: the base install does without it.

Faults: a worker whose process dies is restarted by Ray and the task it was running is run again
(max_restarts, max_task_retries); a trial is yielded once, when all of it is back, so nothing is recorded
twice. A worker that cannot load a model, or finds another file than the driver's (by sha256) at its spec,
fails the run with one line naming its node and the model file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from collections import Counter, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import dspy

from optimize import cost
from optimize.config import ExecutionConfig, Trial
from optimize.data import Splits
from optimize.errors import ChainoptError, ClusterError, ModelError
from optimize.evaluate import ChainRecord, EvalResult
from optimize.llm.engine import build_lm
from optimize.llm.models import describe
from optimize.llm.settings import ModelConfig
from optimize.progress import EvalProgress
from optimize.trial import (Compiled, Outcome, adapter, compile_trial, eval_metrics, load_models, prices, rebuild,
                            run_trial, score_shard)

Progress = Callable[[str], None]
# Set in every worker (and in the driver, before Ray starts): no usage reports, no telemetry, no tqdm bars.
WORKER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true", "TQDM_DISABLE": "1"}
# A local cluster's node is 127.0.0.1, so all its servers listen there only (by default Ray takes the machine's
# outward address and listens on it); Ray reads this when imported.
LOOPBACK = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
RESTARTS = 3  # how often a dead worker is restarted, and its task run again, before the run fails


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ClusterError('[execution] backend = "ray" needs Ray: pip install -e ".[ray]" '
                           '(scripts/install.sh installs it)') from None
    return ray


@contextmanager
def cluster(cfg: ExecutionConfig) -> Iterator[None]:
    """Join the Ray cluster at `cfg.address`, or start a local one (on 127.0.0.1) for this run and stop it after.
    A Ray already started in this process (a test's cluster) is used as it is."""
    for key, value in {**WORKER_ENV, **({} if cfg.address else LOOPBACK)}.items():
        os.environ.setdefault(key, value)  # before Ray is imported: it reads them then
    ray = _ray()
    if cfg.address and cfg.address != "auto":
        _reachable(cfg.address)
    if ray.is_initialized():
        yield
        return
    try:
        ray.init(address=cfg.address, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    except Exception as exc:  # Ray raises ConnectionError, RuntimeError or ValueError, by address kind
        where = f"at {cfg.address}" if cfg.address else "on this machine (a local one)"
        raise ClusterError(f"cannot reach the Ray cluster {where}: {_first_line(exc)}") from None
    try:
        yield
    finally:
        ray.shutdown()


def _reachable(address: str) -> None:
    """Fail in seconds, naming the address, where nothing listens: Ray itself waits minutes for a GCS."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=5).close()
    except ValueError:
        raise ClusterError(f"[execution] address {address!r} is not auto, HOST:PORT or ray://HOST:PORT") from None
    except OSError as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def whole(trial: Trial) -> str:
    """Why a trial runs whole on one worker rather than sharded ("" when it is sharded): a run token budget
    is one ceiling over compile and all examples."""
    if trial.budget.run_tokens is not None:
        return "budget.run_tokens is one ceiling for the whole trial"
    return ""


class Worker:
    """One Ray worker: loads the sweep's models once (llama.cpp on its `cpus` threads), then compiles trials,
    scores shards of evaluations, or runs a trial whole. What it returns is plain data."""

    def __init__(self, models: dict[ModelConfig, str], cpus: int):
        import ray

        self.cpus = cpus
        node_id = ray.get_runtime_context().get_node_id()
        ip = next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)
        self.node = f"{ip} (node {node_id[:12]})"
        self.error = ""
        for model, sha256 in models.items():  # each with the sha256 of the driver's file: the runs' identity
            try:
                build_lm(model.model_copy(update={"n_threads": model.n_threads or cpus}))
                info = describe(model.spec)
                if info.sha256 != sha256:
                    raise ModelError(f"{info.path} has sha256 {info.sha256[:12]}…, the driver's {sha256[:12]}…")
            except Exception as exc:
                self.error = f"the Ray worker on {self.node} cannot load model {model.spec}: {_first_line(exc)}"
                break

    def where(self) -> tuple[str, int]:
        """Its node and process id; the model load's failure, if any, as a ClusterError."""
        if self.error:
            raise ClusterError(self.error)
        return self.node, os.getpid()

    def compile(self, trial: Trial, splits: Splits) -> Compiled:
        models = load_models(trial, n_threads=self.cpus)
        with dspy.context(lm=models.lm, adapter=adapter()), cost.metered("run", all_threads=True) as run_tally:
            compiled = compile_trial(trial, splits, models, run_tally)
        return dataclasses.replace(compiled, program=None)

    def score(self, trial: Trial, splits: Splits, state: dict[str, Any], start: int,
              stop: int) -> tuple[list[ChainRecord], cost.Spend]:
        return score_shard(trial, splits, state, start, stop, load_models(trial, n_threads=self.cpus))

    def run(self, trial: Trial, splits: Splits) -> Outcome:
        return dataclasses.replace(run_trial(trial, splits, live=False, n_threads=self.cpus), program=None)


def sweep_models(trials: list[Trial]) -> dict[ModelConfig, str]:
    """Every model the trials call (task models, teachers, cascades), each once, with its file's sha256 here:
    what a worker loads, and must find the same file for."""
    models = [m for t in trials for m in (t.model, *(t.cascade.models if t.cascade else ()),
                                          *((t.optimizer.teacher,) if t.optimizer.teacher else ()))]
    return {m: describe(m.spec).sha256 for m in dict.fromkeys(models)}


@dataclass
class _Job:
    """One trial in flight: its splits (in Ray's object store once) and the shards back so far."""

    number: int
    trial: Trial
    splits: Splits
    splits_ref: Any
    compiled: Compiled | None = None
    shards: dict[int, tuple[list[ChainRecord], cost.Spend]] = field(default_factory=dict)
    planned: int = 0
    started: float = 0.0
    bar: EvalProgress | None = None


@dataclass
class _Task:
    kind: str  # "compile", "score" or "run"
    job: _Job
    start: int = 0
    stop: int = 0


def run_trials(cfg: ExecutionConfig, work: list[tuple[int, Trial, Splits]], total: int,
               progress: Progress = lambda s: None) -> Iterator[tuple[int, Outcome]]:
    """Run `work` ((number in the sweep, trial, its splits)) on the cluster's workers; yield (number, outcome)
    as each trial is complete."""
    ray = _ray()
    cpus = cfg.cpus_per_worker
    count = cfg.workers or max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus)
    actor = ray.remote(Worker).options(num_cpus=cpus, max_restarts=RESTARTS, max_task_retries=RESTARTS,
                                       scheduling_strategy="SPREAD", runtime_env={"env_vars": WORKER_ENV})
    workers = [actor.remote(sweep_models([t for _, t, _ in work]), cpus) for _ in range(count)]
    try:
        yield from _schedule(ray, workers, cpus, work, total, progress)
    finally:  # their CPUs go back to the cluster at once, not when the handles are collected
        for worker in workers:
            ray.kill(worker)


def _schedule(ray: Any, workers: list[Any], cpus: int, work: list[tuple[int, Trial, Splits]], total: int,
              progress: Progress) -> Iterator[tuple[int, Outcome]]:
    """Feed the workers: compiles (or whole trials) in sweep order, each compiled trial's shards first."""
    count = len(workers)
    nodes = [node for node, _ in _get(ray, [w.where.remote() for w in workers], "starting the workers")]
    per_node = ", ".join(f"{node} x{n}" for node, n in Counter(nodes).items())
    progress(f"ray: {count} workers ({cpus} CPU each) on {len(set(nodes))} node(s): {per_node}")
    queue = deque(_Task("run" if whole(trial) else "compile", _Job(number, trial, splits, ray.put(splits)))
                  for number, trial, splits in work)
    idle, running = list(range(count)), {}
    while queue or running:
        while idle and queue:
            task, w = queue.popleft(), idle.pop(0)
            running[_submit(workers[w], task)] = (w, task)
            if task.kind != "score":
                how = f"running whole ({whole(task.job.trial)})" if task.kind == "run" else "compiling"
                progress(f"[{task.job.number}/{total}] {task.job.trial.run_name}: {how} on worker {w + 1}, {nodes[w]}")
        (ref,), _ = ray.wait(list(running), num_returns=1)
        w, task = running.pop(ref)
        idle.append(w)
        job, result = task.job, _get(ray, ref, f"{task.kind} of {task.job.trial.run_name} on {nodes[w]}")
        name = f"[{job.number}/{total}] {job.trial.run_name}"
        if task.kind == "run":
            yield job.number, result
        elif task.kind == "compile":
            job.compiled = result
            if result.state is None:
                progress(f"{name}: run token budget reached while compiling: not evaluated")
                yield job.number, result.unevaluated()
                continue
            examples = len(getattr(job.splits, job.trial.eval.split))
            bounds = [(examples * k // count, examples * (k + 1) // count) for k in range(count)]
            shards = [_Task("score", job, a, b) for a, b in bounds if b > a]
            job.planned, job.started = len(shards), time.perf_counter()
            job.bar = EvalProgress(examples, f"evaluating {job.trial.eval.split} in {len(shards)} shards on "
                                   f"{count} workers", report=lambda s, name=name: progress(f"{name}: {s}"), live=False)
            queue.extendleft(reversed(shards))
            if not shards:
                yield job.number, _merged(job)
        else:
            job.shards[task.start] = result
            for record in result[0]:
                job.bar.record(record)
            if len(job.shards) == job.planned:
                yield job.number, _merged(job)


def _submit(worker: Any, task: _Task) -> Any:
    job = task.job
    if task.kind == "score":
        return worker.score.remote(job.trial, job.splits_ref, job.compiled.state, task.start, task.stop)
    return getattr(worker, task.kind).remote(job.trial, job.splits_ref)


def _get(ray: Any, refs: Any, doing: str) -> Any:
    """ray.get, with a project error raised on a worker shown as itself (one line) and a worker that kept
    dying as a ClusterError naming what it was doing."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, ChainoptError):
            raise type(exc.cause)(str(exc.cause)) from None
        raise
    except ray.exceptions.RayActorError as exc:
        raise ClusterError(f"a Ray worker died {RESTARTS + 1} times ({doing}): {_first_line(exc)}") from None


def _merged(job: _Job) -> Outcome:
    """The trial's outcome from its shards: records in example order, spends summed (wall time: the driver's)."""
    job.bar.close()
    records = [r for start in sorted(job.shards) for r in job.shards[start][0]]
    spends = [spend for _, spend in job.shards.values()]
    usage = sum((s.usage for s in spends), cost.Usage())
    wall = time.perf_counter() - job.started
    spend = cost.Spend(usage, wall, sum(s.cpu_seconds for s in spends), sum(s.joules for s in spends),
                       all(s.energy_measured for s in spends))
    result = EvalResult(records, len(records), len(getattr(job.splits, job.trial.eval.split)), False, wall,
                        spend.cpu_seconds)
    metrics = eval_metrics(records, result, spend, prices(job.trial), job.splits.task)
    compiled = job.compiled
    # A cascade's metrics read its (tuned) thresholds off the program: rebuilt here from its JSON state.
    program = rebuild(job.trial, job.splits, compiled.state) if job.trial.cascade else None
    return compiled.scored(metrics, records, False, program)
