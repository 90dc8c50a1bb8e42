"""Everything that touches MLflow: the store, parent/child runs, recording a trial's outcome, break-even,
the Pareto front and plot, artifacts for the report and export, the model registry.

The only module that imports `mlflow` (besides optimize/serving.py, the pyfunc model MLflow loads).
One parent run per experiment, one child run per sweep combination. Children carry their trial's
identity (optimize.trial.identity), so a re-run recognises finished work and does not recompute it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sqlite3
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline by design: no usage pings

import mlflow
from filelock import FileLock
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.logging_utils import disable_logging, enable_logging

import optimize
from optimize import cost
from optimize.errors import ChainoptError
from optimize.interrupts import held

if TYPE_CHECKING:
    from optimize.config import Experiment, Trial
    from optimize.evaluate import ChainRecord
    from optimize.trial import Outcome

TAG_KIND = "chainopt.kind"  # "parent" | "child"
TAG_HASH = "chainopt.config_hash"
TAG_EXPERIMENT_HASH = "chainopt.experiment_hash"
TAG_STOPPED = "chainopt.stopped"
TAG_FAILED = "chainopt.failed"
TAG_PARETO = "chainopt.pareto"
TAG_BASELINE = "chainopt.baseline"  # on a classical baseline's child: its name (optimize.baselines)
TAG_MODEL_ID = "chainopt.model_id"  # on a child: the id of its logged model (the compiled program)
MODEL_NAME = "program"  # the logged model's name within its run
# Metrics also logged against the logged model (and the evaluated dataset), so the model page shows them.
MODEL_METRICS = ("accuracy", "f1", "tokens_per_success", "seconds_per_success", "joules_per_success",
                 "usd_per_success")


@dataclass
class TrialResult:
    """A trial as the store holds it: its run, its metrics, and whether this run reused it."""

    trial: "Trial"
    run_id: str
    metrics: dict[str, float]
    reused: bool = False
    stopped: str = ""
    failed: str = ""
    records: list["ChainRecord"] = field(default_factory=list)


def default_uri(root: Path | None = None) -> str:
    """The project's own store: SQLite beside the project, artifacts in ./mlruns."""
    return f"sqlite:///{(root or Path.cwd()).resolve() / 'mlflow.db'}"


def tracking_uri(configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """One process at a time opens a local SQLite store: two runs started together would otherwise both
    create a new store's tables ("table ... already exists") or the same experiment."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fails at once where the store cannot be written, not after MLflow's ~100 s of retries meant for servers.
    sqlite3.connect(path).execute("pragma user_version").connection.close()
    # A lock file of its own: independent of the byte-range locks SQLite takes on the store itself.
    with FileLock(str(path) + ".lock"):
        yield


def setup(experiment: str, uri: str | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    try:
        with store_lock(uri):
            client = MlflowClient()  # opening a SQLite store creates its folder and tables: it fails here
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                return found.experiment_id
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
            # Tagged as a model-development experiment, so the MLflow UI opens on its runs table, not GenAI pages.
            try:
                return client.create_experiment(experiment, artifact_location=location,
                                                tags={"mlflow.experimentKind": "custom_model_development"})
            except MlflowException as exc:
                # On a server store no lock is held: another process (a teammate's run) created it meanwhile.
                found = client.get_experiment_by_name(experiment)
                if exc.error_code != "RESOURCE_ALREADY_EXISTS" or found is None:
                    raise
                return found.experiment_id
    except Exception as exc:
        raise ChainoptError(f"cannot use the MLflow store at {uri}: {str(exc).splitlines()[0]}") from exc


def versions() -> dict[str, str]:
    import dspy
    import llama_cpp

    return {"chainopt.version": optimize.__version__, "dspy.version": dspy.__version__,
            "mlflow.version": mlflow.__version__, "llama_cpp.version": llama_cpp.__version__,
            "git.commit": git_commit()}


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def find_parent(experiment_id: str, experiment_hash: str) -> Run | None:
    """The latest parent run of this exact experiment config, to resume into."""
    runs = MlflowClient().search_runs(
        [experiment_id], f"tags.`{TAG_KIND}` = 'parent' and tags.`{TAG_EXPERIMENT_HASH}` = '{experiment_hash}'",
        order_by=["attribute.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def children(experiment_id: str, parent_id: str) -> list[Run]:
    return MlflowClient().search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", order_by=["attribute.start_time ASC"],
        max_results=5000)


def finished_child(runs: list[Run], config_hash: str) -> Run | None:
    """The child of this identity that finished; a FAILED one (an exception, or too many chain errors) is not."""
    for run in runs:
        if run.data.tags.get(TAG_HASH) == config_hash and run.info.status == "FINISHED":
            return run
    return None


@contextlib.contextmanager
def _run(**kwargs: Any) -> Iterator[mlflow.ActiveRun]:
    """`mlflow.start_run`, its start and its end (FINISHED, or FAILED if the block raised) each written
    whole: a stop signal waits for them (interrupts.held), the block between stays interruptible."""
    with held():
        active = mlflow.start_run(**kwargs)
    try:
        yield active
    except BaseException as exc:
        with held():
            active.__exit__(type(exc), exc, exc.__traceback__)
        raise
    with held():
        active.__exit__(None, None, None)


@held()
def mark_killed(runs: list[Run]) -> None:
    """Runs left RUNNING by a killed process (SIGKILL gives no chance to say so) are marked KILLED."""
    client = MlflowClient()
    for run in runs:
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status="KILLED")


@contextlib.contextmanager
def parent_run(experiment_id: str, exp: "Experiment", experiment_hash: str, resume: Run | None,
               source: Path | None) -> Iterator[str]:
    """The experiment's parent run, new or resumed; yields its id."""
    with _run(run_id=resume.info.run_id if resume else None, experiment_id=experiment_id,
              run_name=exp.name, tags={TAG_KIND: "parent", TAG_EXPERIMENT_HASH: experiment_hash,
                                       **versions()}) as run:
        if resume is None:
            with held():
                mlflow.log_dict(exp.model_dump(mode="json"), "experiment.json")
                if source is not None:
                    mlflow.log_text(source.read_text(encoding="utf-8"), f"config/{source.name}")
        yield run.info.run_id


@contextlib.contextmanager
def child_run(experiment_id: str, name: str, identity: str, baseline: str = "") -> Iterator[str]:
    """A child run for one trial (or the classical `baseline` of that name), nested in the active parent;
    FAILED if the block raises."""
    tags = {TAG_KIND: "child", TAG_HASH: identity, **versions(), **({TAG_BASELINE: baseline} if baseline else {})}
    with _run(run_name=name, nested=True, experiment_id=experiment_id, tags=tags) as run:
        yield run.info.run_id


@held()
def record_trial(outcome: "Outcome") -> None:
    """Write one trial's outcome into the active child run, and end it FAILED (with the reason as a tag) when
    its chains mostly ended in an error: such a run is no result, and a re-run does it again."""
    log_params(outcome.params)
    log_metrics(outcome.metrics)
    log_table([r.row() for r in outcome.records], "predictions.json")
    if outcome.program_state is not None:
        mlflow.log_dict(outcome.program_state, "program.json")
    for name, value in outcome.artifacts.items():
        mlflow.log_dict(value, name)
    if outcome.stopped:
        mlflow.set_tag(TAG_STOPPED, outcome.stopped)
    if outcome.failed:
        mlflow.set_tag(TAG_FAILED, outcome.failed)
        mlflow.end_run(status="FAILED")


@dataclass
class DataSlice:
    """One slice of data a child run read: its rows (plain dicts), where they came from, and its role."""

    name: str  # e.g. "banking77.train"
    rows: list[dict[str, Any]]
    source: str  # a file path (or hf:<dataset>)
    context: str  # MLflow's input context: "training", "validation", "eval", "retrieval"
    targets: str | None = None  # the gold answer's column


@held()
def log_datasets(slices: list[DataSlice]) -> dict[str, Any]:
    """Log each non-empty slice as an MLflow dataset input of the active run (name, digest of its content,
    source, schema, context), so the runs table's Datasets column and the run page show the data. Returns
    the logged MLflow datasets by context."""
    import pandas as pd

    logged = {}
    for piece in slices:
        if not piece.rows:
            continue
        frame = pd.DataFrame(piece.rows)
        with warnings_quiet():  # "source can be interpreted in multiple ways": a local file, either way
            try:
                dataset = mlflow.data.from_pandas(frame, source=piece.source, name=piece.name, targets=piece.targets)
            except Exception:  # a column MLflow cannot type (mixed values): recorded as JSON text
                frame = frame.map(lambda v: v if isinstance(v, str) else json.dumps(v, default=str))
                dataset = mlflow.data.from_pandas(frame, source=piece.source, name=piece.name,
                                                  targets=piece.targets)
        try:
            mlflow.log_input(dataset, context=piece.context)
        except MlflowException:  # on a shared store another run created the same dataset at the same moment
            mlflow.log_input(dataset, context=piece.context)  # (a unique key): now it exists and is reused
        logged[piece.context] = dataset
    return logged


def predictor_prompts(program_state: dict[str, Any]) -> dict[str, str]:
    """Each predictor's final instruction and a summary of its demos, from DSPy's JSON state of the compiled
    program (a predictor's entry holds `signature.instructions` and `demos`), as one text per predictor."""
    prompts = {}
    for name, value in program_state.items():
        if not isinstance(value, dict) or not isinstance(value.get("signature"), dict):
            continue
        text = str(value["signature"].get("instructions", "")).strip()
        demos = value.get("demos") or []
        if demos:
            lines = []
            for demo in demos[:8]:
                shown = "; ".join(f"{k}: {json.dumps(v, default=str)[:80]}" for k, v in demo.items()
                                  if k != "id" and not k.startswith(("augmented", "dspy_")))
                lines.append(f"- {shown}")
            more = f"\n... and {len(demos) - 8} more" if len(demos) > 8 else ""
            text += f"\n\nDemos ({len(demos)}):\n" + "\n".join(lines) + more
        prompts[name] = text
    return prompts


def prompt_name(experiment: str, program: str, predictor: str) -> str:
    """A registry name: letters, digits, '-', '_' and '.' only."""
    raw = f"chainopt-{experiment}-{program}-{predictor}"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in raw)


def register_prompts(texts: dict[str, str], experiment: str, program: str, run_id: str) -> list[Any]:
    """Register each predictor's text in MLflow's Prompt Registry (a new version only when the text differs
    from the latest version's) and link each version to the run; returns the prompt versions."""
    client = MlflowClient()
    versions = []
    for predictor, text in texts.items():
        name = prompt_name(experiment, program, predictor)
        latest = None
        with contextlib.suppress(Exception):  # no prompt of that name yet
            latest = client.load_prompt(f"prompts:/{name}@latest")
        if latest is None or latest.template != text:
            latest = mlflow.genai.register_prompt(
                name=name, template=text, commit_message=f"run {run_id}",
                tags={"chainopt.program": program, "chainopt.predictor": predictor, "chainopt.run_id": run_id})
        client.link_prompt_version_to_run(run_id, latest)
        versions.append(latest)
    return versions


def log_program_model(folder: Path, serving: Path, examples: list[dict[str, Any]], answers: list[Any],
                      requirements: list[str], metrics: dict[str, float], prompts: list[Any] = (),
                      eval_dataset: Any = None, model_file: Path | None = None) -> str:
    """Log the compiled program with the active run as an MLflow 3 logged model, pyfunc flavor built from
    code (optimize/serving.py, nothing pickled): `folder` (an export folder) is its artifact, its signature
    and input example come from evaluated `examples` and their `answers` (no model call at logging time), it
    is linked to the prompt versions, and `metrics` are logged against it. The GGUF is named in the folder's
    manifest by sha256; its file is copied into the model only when `model_file` is given. Returns the
    model's id (also the run's chainopt.model_id tag)."""
    import pandas as pd
    from mlflow.models import infer_signature

    frame = pd.DataFrame(examples)
    artifacts = {"export": str(folder), **({"gguf": str(model_file)} if model_file else {})}
    with warnings_quiet():
        # mlflow.pyfunc.log_model, less its check of the input example, which would load the GGUF and run the
        # program on it once more (6-18 s for the first run of a process here); the run has just scored it.
        logged = mlflow.models.Model.log(
            artifact_path=None, name=MODEL_NAME, flavor=_UncheckedPyfunc, flavor_name="pyfunc.ModelFromCode",
            python_model=str(serving), artifacts=artifacts, signature=infer_signature(frame, list(answers)),
            input_example=frame, pip_requirements=requirements, prompts=list(prompts) or None,
            validate_serving_input=False)
    for key in MODEL_METRICS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            mlflow.log_metric(key, float(value), model_id=logged.model_id, dataset=eval_dataset)
    mlflow.set_tag(TAG_MODEL_ID, logged.model_id)
    return logged.model_id


class _UncheckedPyfunc:
    """mlflow.pyfunc as the flavor `mlflow.models.Model.log` saves with, taking Model.log's own
    `validate_serving_input` switch (which mlflow.pyfunc.save_model refuses as an unknown argument)."""

    __name__ = "mlflow.pyfunc"

    @staticmethod
    def save_model(validate_serving_input: bool = True, **kwargs: Any) -> Any:
        return mlflow.pyfunc.save_model(**kwargs)


@contextlib.contextmanager
def warnings_quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def requirements() -> list[str]:
    """What installs the logged model's code: chainopt itself, with the versions this run used of what it
    runs on."""
    v = versions()
    return [f"chainopt=={v['chainopt.version']}", f"dspy=={v['dspy.version']}", f"mlflow=={v['mlflow.version']}",
            f"llama-cpp-python=={v['llama_cpp.version']}"]


def log_chain_traces(records: list["ChainRecord"], sample: int, program: str) -> int:
    """One MLflow trace per evaluated chain for the first `sample` examples (by index), in the active run's
    Traces tab, written from each chain's record once the evaluation is over (the chains run untraced, so
    their measured costs hold no tracing): a root CHAIN span with the chain's inputs, answer, gold answer,
    verdict (success, score, validator failures, retries, parse failure, error) and token totals; under it,
    in the order they happened and at their recorded times, one LLM span per LM call (step, model, tokens
    computed, reused and generated, cached or not) and one GUARDRAIL span per validator verdict, named
    by the validator and the verdict ("check_label: rejected, retried"; ERROR when it rejected, with the
    reason, the value checked and whether a retry followed). Returns how many were written.

    The model is an attribute of chainopt's own, not MLflow's `mlflow.llm.model`: with that set, MLflow
    prices each span through litellm, whose import fetches a price list over the network."""
    from mlflow.entities import SpanStatus, SpanStatusCode, SpanType
    from mlflow.tracing.constant import SpanAttributeKey

    experiment_id = mlflow.active_run().info.experiment_id  # the run's, not MLflow's default experiment
    written = 0
    for record in sorted(records, key=lambda r: r.index)[:sample]:
        verdict = {"chainopt.success": record.success, "chainopt.score": record.score,
                   "chainopt.gold": json.dumps(record.gold, default=str), "chainopt.steps": record.steps,
                   "chainopt.validator_failures": record.validator_failures, "chainopt.retries": record.retries,
                   "chainopt.parse_failure": record.parse_failure, "chainopt.error": record.error or "",
                   "chainopt.lm_calls": record.usage.calls,
                   "chainopt.input_tokens_computed": record.usage.input_computed,
                   "chainopt.input_tokens_reused": record.usage.input_reused,
                   "chainopt.output_tokens": record.usage.output}
        root = mlflow.start_span_no_context(f"{program} {record.example_id}", span_type=SpanType.CHAIN,
                                            inputs=record.inputs, attributes=verdict,
                                            start_time_ns=record.start_ns, experiment_id=experiment_id)
        for event in record.events:
            if event["kind"] == "lm":
                inputs = event["input_computed"] + event["input_reused"]
                usage = {"input_tokens": inputs, "output_tokens": event["output"],
                         "total_tokens": inputs + event["output"], "cache_read_input_tokens": event["input_reused"]}
                span = mlflow.start_span_no_context(
                    event["step"], span_type=SpanType.LLM, parent_span=root, start_time_ns=event["start_ns"],
                    attributes={"chainopt.model": event["model"], "chainopt.cached": event["cached"],
                                "chainopt.input_tokens_computed": event["input_computed"],
                                "chainopt.input_tokens_reused": event["input_reused"],
                                "chainopt.output_tokens": event["output"], SpanAttributeKey.CHAT_USAGE: usage})
                span.end(end_time_ns=event["end_ns"])
            else:
                said = "accepted" if event["accepted"] else "rejected, retried" if event["retry"] else "rejected"
                span = mlflow.start_span_no_context(
                    f"{event['validator']}: {said}", span_type=SpanType.GUARDRAIL, parent_span=root,
                    inputs={"value": event["value"]}, start_time_ns=event["time_ns"],
                    attributes={"chainopt.step": event["step"], "chainopt.accepted": event["accepted"],
                                "chainopt.retry": event["retry"]})
                span.end(outputs={"accepted": event["accepted"], "reason": event["reason"],
                                  "retry": event["retry"]},
                         status=SpanStatus(SpanStatusCode.OK) if event["accepted"]
                         else SpanStatus(SpanStatusCode.ERROR, event["reason"]), end_time_ns=event["time_ns"])
        root.end(outputs={"answer": record.predicted, "success": record.success},
                 status=SpanStatusCode.ERROR if record.error else SpanStatusCode.OK,
                 end_time_ns=record.start_ns + int(record.seconds * 1e9))
        written += 1
    mlflow.flush_trace_async_logging()  # in the store before the run ends
    return written


@held()
def log_break_even(result: TrialResult, results: list[TrialResult]) -> dict[str, float]:
    """Queries until `result`'s compile is repaid by its lower cost per success against the zero-shot run of
    the same model, program and seed; logged to its run and returned ({} when it has no such baseline)."""
    t = result.trial
    base = next((o for o in results if o.trial.optimizer.name == "none"
                 and (o.trial.model, o.trial.program, o.trial.seed) == (t.model, t.program, t.seed)), None)
    if base is None or base is result:
        return {}
    values = {f"break_even_queries_{unit}": cost.break_even(result.metrics.get(f"compile_{unit}", 0.0),
                                                            base.metrics.get(f"{unit}_per_success", math.inf),
                                                            result.metrics.get(f"{unit}_per_success", math.inf))
              for unit in cost.UNITS}
    client = MlflowClient()
    for key, value in values.items():
        client.log_metric(result.run_id, key, value)
    return values


@held()
def mark_pareto(experiment_id: str, parent_id: str) -> None:
    """Tag each child on or off the Pareto front, and log the plot with the parent."""
    rows = child_rows(experiment_id, parent_id)
    client = MlflowClient()
    for row in rows:
        client.set_tag(row["run_id"], TAG_PARETO, str(row["pareto"]).lower())
    with tempfile.TemporaryDirectory() as tmp:
        client.log_artifact(parent_id, str(pareto_plot(rows, Path(tmp) / "pareto.png")))


def download(run_id: str, path: str, dst: Path | None = None) -> Path | None:
    """A run's artifact as a local file, or None when the run never logged it (killed before it could)."""
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=path,
                                                        dst_path=str(dst) if dst else None))
    except Exception:
        return None


def finished_trial(run_id: str, uri: str | None = None) -> Run:
    """A finished child run, for export; ChainoptError naming the run and the store otherwise."""
    mlflow.set_tracking_uri(tracking_uri(uri))
    try:
        run = MlflowClient().get_run(run_id)
    except Exception as exc:
        raise ChainoptError(f"no MLflow run {run_id!r} in {mlflow.get_tracking_uri()}") from exc
    if run.data.tags.get(TAG_KIND) != "child" or run.info.status != "FINISHED":
        raise ChainoptError(f"run {run_id} is not a finished chainopt trial (status {run.info.status})")
    if TAG_BASELINE in run.data.tags:
        raise ChainoptError(f"run {run_id} is the classical baseline {run.data.tags[TAG_BASELINE]}: "
                            "it has no DSPy program to export")
    return run


def run_by_prefix(prefix: str, uri: str | None = None) -> str:
    """The id of the one run whose id starts with `prefix`, so a few characters of compare's run id column
    will do; ChainoptError in one line listing the candidates when none or several start so."""
    mlflow.set_tracking_uri(tracking_uri(uri))
    prefix = prefix.lower()
    if not prefix or any(c not in "0123456789abcdef" for c in prefix):
        raise ChainoptError(f"{prefix!r} is not a run id: a run id, or the start of one, is hexadecimal "
                            "(see chainopt compare)")
    found = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=10,
                               filter_string=f"attributes.run_id LIKE '{prefix}%'")
    if len(found) == 1:
        return found[0].info.run_id
    shown = lambda runs: ", ".join(f"{r.info.run_id[:max(8, len(prefix) + 2)]} ({r.info.run_name})" for r in runs)
    if found:
        raise ChainoptError(f"run id {prefix!r} is ambiguous: it starts {shown(found)}; give more of it")
    latest = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=5,
                                filter_string=f"tags.`{TAG_KIND}` = 'child'", order_by=["attributes.start_time DESC"])
    raise ChainoptError(f"no run id starts with {prefix!r} in {mlflow.get_tracking_uri()}"
                        + (f"; latest trials: {shown(latest)}" if latest else ""))


def experiment_file(run: Run) -> str | None:
    """The experiment file a child run's parent was started from (logged under config/), or None (a run
    started from Python)."""
    parent = run.data.tags.get("mlflow.parentRunId")
    logged = [f.path for f in MlflowClient().list_artifacts(parent, "config") if f.path.endswith(".toml")] \
        if parent else []
    local = download(parent, logged[0]) if logged else None
    return local.read_text(encoding="utf-8") if local else None


def show_mlflow_chatter(shown: bool) -> None:
    """Turn on or off what MLflow prints to a stderr stream of its own (registry notices, its loggers'
    warnings): chainopt reports results itself, and `-v` shows the rest."""
    (enable_logging if shown else disable_logging)()


def register_export(folder: Path, manifest: dict[str, Any], serving: Path,
                    model_id: str | None = None) -> dict[str, str]:
    """Register an export in the model registry as a model version, its metrics (accuracy, cost per success)
    as tags. The version is the run's own logged model (`model_id`, logged when the run was recorded);
    a run recorded before runs logged one gets a pyfunc model logged now (from code, no pickle) whose
    artifact is the whole export folder: a KNN program's pool.jsonl with it."""
    name = f"chainopt-{manifest['experiment']}-{manifest['program']['name']}".replace(".", "-")
    if model_id is None:
        with mlflow.start_run(run_id=manifest["run_id"]), warnings_quiet():
            logged = mlflow.pyfunc.log_model(name=MODEL_NAME, python_model=str(serving),
                                             artifacts={"export": str(folder)}, pip_requirements=requirements())
        model_id = logged.model_id
    with warnings_quiet():
        version = mlflow.register_model(f"models:/{model_id}", name)
    client = MlflowClient()
    for key, value in {**manifest["metrics"], "model.sha256": manifest["model"]["sha256"],
                       "program": manifest["program"]["name"], "run_id": manifest["run_id"],
                       "model_id": model_id}.items():
        client.set_model_version_tag(name, version.version, key, str(value))
    return {"name": name, "version": str(version.version), "model_id": model_id}


def log_params(params: dict[str, Any]) -> None:
    """MLflow params are strings of at most 6000 chars; log in batches."""
    items = {k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v))[:6000] for k, v in params.items()}
    keys = list(items)
    for i in range(0, len(keys), 90):
        mlflow.log_params({k: items[k] for k in keys[i:i + 90]})


def log_metrics(metrics: dict[str, float], prefix: str = "") -> None:
    """Infinite costs (no successes) are legitimate results; MLflow stores them as +inf."""
    clean = {f"{prefix}{k}": float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v))}
    mlflow.log_metrics(clean)


def read_metrics(run: Run) -> dict[str, float]:
    """A run's metrics, with the +inf that SQLite stores as the largest float turned back into inf."""
    return {k: (math.inf if v >= 1.7e308 else -math.inf if v <= -1.7e308 else v) for k, v in run.data.metrics.items()}


def log_table(rows: list[dict[str, Any]], artifact_file: str) -> None:
    if rows:
        import pandas as pd

        frame = pd.DataFrame([{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows])
        mlflow.log_table(frame, artifact_file=artifact_file)


def pareto_front(points: list[tuple[str, float, float]]) -> set[str]:
    """Runs not dominated on (higher accuracy, lower cost per success)."""
    front = set()
    for rid, acc, price in points:
        dominated = any((a >= acc and c <= price) and (a > acc or c < price) for other, a, c in points if other != rid)
        if not dominated:
            front.add(rid)
    return front


def child_rows(experiment_id: str, parent_id: str, cost_metric: str = "seconds_per_success") -> list[dict[str, Any]]:
    """One row per child run, for the compare table, the Pareto plot and the report."""
    rows = []
    for run in children(experiment_id, parent_id):
        m, p = read_metrics(run), run.data.params
        rows.append({"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
                     "program": p.get("program.name"), "optimizer": p.get("optimizer.name"),
                     # a cascade (optimize.trial.cascade_params) stands for its models, as one point
                     "model": p.get("cascade") or p.get("model.spec"), "cascade": bool(p.get("cascade")),
                     "seed": p.get("seed"),
                     "accuracy": m.get("accuracy"), "cost": m.get(cost_metric), "metrics": m, "params": p,
                     "stopped": run.data.tags.get(TAG_STOPPED, ""), "failed": run.data.tags.get(TAG_FAILED, ""),
                     "baseline": run.data.tags.get(TAG_BASELINE, "")})
    # A run with no success has no cost per success to trade against accuracy: it is never on the front.
    # Nor is a run answered partly from DSPy's response cache: its tokens are replayed, but its time (and so
    # its joules and dollars) is not what computing the answers takes. Nor is a FAILED run: it is no result.
    scored = [(r["run_id"], r["accuracy"], r["cost"]) for r in rows
              if r["accuracy"] is not None and r["cost"] is not None and math.isfinite(r["cost"])
              and not r["metrics"].get("cache_hits") and r["status"] != "FAILED"]
    front = pareto_front(scored)
    for r in rows:
        r["pareto"] = r["run_id"] in front
    return sorted(rows, key=lambda r: (math.inf if r["cost"] is None else r["cost"], -(r["accuracy"] or 0)))


def pareto_plot(rows: list[dict[str, Any]], path: Path, cost_label: str = "seconds per successful chain") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    finite = [r for r in rows if r["cost"] is not None and math.isfinite(r["cost"]) and r["accuracy"] is not None]
    one_program = len({x["program"] for x in rows if not x.get("baseline")}) == 1
    models = {x["model"] for x in rows if not x.get("baseline") and not x.get("cascade")}
    for r in finite:
        # A classical baseline is a square named by itself, so the LLM programs' points are read against it; a
        # cascade is a diamond named "cascade", beside its models' own points (named by model when several).
        ax.scatter(r["cost"], r["accuracy"], s=70 if r["pareto"] else 35,
                   marker="s" if r.get("baseline") else "D" if r.get("cascade") else "o",
                   c="tab:red" if r["pareto"] else "tab:gray" if r.get("baseline") else
                   "tab:purple" if r.get("cascade") else "tab:blue", zorder=3)
        label = (r["program"] if r.get("baseline") else r["optimizer"] if one_program
                 else f"{r['program']}+{r['optimizer']}")
        if r.get("cascade"):
            label = f"cascade {label}"
        elif len(models) > 1 and not r.get("baseline"):
            label = f"{r['model'].rsplit('/', 1)[-1]} {label}"
        ax.annotate(label, (r["cost"], r["accuracy"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    front = sorted((r for r in finite if r["pareto"]), key=lambda r: r["cost"])
    if front:
        ax.step([r["cost"] for r in front], [r["accuracy"] for r in front], where="post", c="tab:red", alpha=.5,
                label="Pareto front")
        ax.legend(loc="lower right")
    ax.margins(x=0.2, y=0.15)
    unsolved = len(rows) - len(finite)
    ax.set_xlabel(cost_label + (f"  ({unsolved} run(s) with no success not shown)" if unsolved else ""))
    ax.set_ylabel("accuracy")
    ax.set_title("accuracy against cost per success")
    ax.grid(alpha=.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def runs_of(experiment: str, uri: str | None = None) -> tuple[str, Run]:
    """The experiment's latest parent run, for compare/report."""
    experiment_id = setup(experiment, uri)
    runs = MlflowClient().search_runs([experiment_id], f"tags.`{TAG_KIND}` = 'parent'",
                                      order_by=["attribute.start_time DESC"], max_results=1)
    if not runs:
        raise ChainoptError(f"no runs recorded for experiment {experiment!r} in {tracking_uri(uri)}")
    return experiment_id, runs[0]
