"""Export a compiled program to use elsewhere, and run an exported program on new inputs.

An export is a folder: `program.json` (DSPy's JSON state, never a pickle), `manifest.json` (program,
task, model identity, the data read and its content hash, measured metrics, versions), `eval.jsonl` (the
exact slice it was scored on, so `chainopt predict` can show the accuracy is reproduced) and, for a
`knn_fewshot` program, `pool.jsonl` (the training pool its demos are retrieved from): loading it never
reads the dataset. The same folder is the artifact of the pyfunc model (built from code, optimize/serving.py)
that each run logs (`log_run_model`); `chainopt export` registers that model in the MLflow model registry,
with the metrics as tags.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dspy

from optimize import tracking
from optimize.config import ModelConfig, Trial
from optimize.data import Row, Splits, Task, data_digest, load_splits
from optimize.errors import ChainoptError, DataError, ModelError
from optimize.llm.models import describe

if TYPE_CHECKING:
    from optimize.trial import Outcome

MANIFEST = "manifest.json"
PROGRAM = "program.json"
EVAL_SLICE = "eval.jsonl"
POOL = "pool.jsonl"  # a KNN program's training pool, written by export, read back by load
FILE_KEYS = ("path", "train_path", "test_path")  # where a user's data comes from (optimize.config.DataConfig)
REPORTED = ("accuracy", "f1", "successes", "n", "tokens_per_success", "seconds_per_success", "joules_per_success",
            "usd_per_success", "latency_p50", "latency_p95")


def export_run(run_id: str, out: Path, *, register: bool = True, uri: str | None = None) -> dict[str, Any]:
    """Write the export folder for a finished child run and register it; returns the manifest."""
    run = tracking.finished_trial(run_id, uri)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ChainoptError(f"export folder {out} exists and is not empty")
    with tempfile.TemporaryDirectory() as tmp:
        staging = Path(tmp) / "export"
        staging.mkdir()
        for name in (PROGRAM, "trial.json", "task.json"):
            if tracking.download(run_id, name, staging) is None:
                raise ChainoptError(f"run {run_id} has no {name}: it was not recorded completely")
        trial = Trial.model_validate_json((staging / "trial.json").read_text())
        if trial.cascade:
            raise ChainoptError(f"run {run_id} is a cascade over {len(trial.cascade.models)} models; an export holds "
                                "one program on one model: export the single-model run of its program instead")
        task = json.loads((staging / "task.json").read_text())
        digest = unchanged_digest(trial, run.data.params.get("data.digest"), run_id)
        (staging / "trial.json").unlink()
        (staging / "task.json").unlink()
        manifest = write_folder(staging, trial, task, load_splits(trial.data), run_id=run_id, digest=digest,
                                metrics=tracking.read_metrics(run), tags=run.data.tags,
                                experiment_file=tracking.experiment_file(run))
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(staging, out, dirs_exist_ok=True)
    if register:
        manifest["registered"] = tracking.register_export(out, manifest, SERVING,
                                                          run.data.tags.get(tracking.TAG_MODEL_ID))
        (out / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return manifest


SERVING = Path(__file__).with_name("serving.py")  # the pyfunc model, defined as code


def write_folder(folder: Path, trial: Trial, task: dict[str, Any], splits: Splits, *, run_id: str, digest: str,
                 metrics: dict[str, float], tags: dict[str, str], experiment_file: str | None,
                 program_state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fill an export folder (program.json, unless `program_state` is given, is there already): the slice
    scored, a KNN program's pool, and the manifest, which it returns."""
    if program_state is not None:
        (folder / PROGRAM).write_text(json.dumps(program_state, indent=1, default=str))
    info = describe(trial.model.spec)
    examples = getattr(splits, trial.eval.split)
    write_jsonl(folder / EVAL_SLICE, examples)
    if trial.optimizer.name == "knn_fewshot":
        write_jsonl(folder / POOL, splits.train)  # the pool its demos are retrieved from (trial.run_trial)
    manifest = {
        "program": trial.program.model_dump(), "task": task, "model": {**trial.model.model_dump(),
                                                                      "name": info.name, "sha256": info.sha256,
                                                                      "quantization": info.quantization,
                                                                      "size_bytes": info.size_bytes},
        "optimizer": trial.optimizer.model_dump(exclude={"teacher"}),
        "data": data_section(trial, len(examples), digest=digest, given=given_paths(experiment_file)),
        "metrics": {k: v for k, v in metrics.items() if k in REPORTED},
        "run_id": run_id, "experiment": trial.experiment, "config_hash": trial.config_hash(),
        "versions": {k: v for k, v in tags.items() if k.endswith(".version") or k == "git.commit"},
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return manifest


def log_run_model(outcome: "Outcome", splits: Splits, run_id: str, *, experiment_file: str | None = None,
                  eval_dataset: Any = None, copy_model_file: bool = False) -> str | None:
    """Record a finished trial's compiled program with its (active) run: each predictor's instruction and
    demos in the Prompt Registry, and the program as an MLflow logged model (pyfunc) whose artifact is the
    same folder `chainopt export` writes, linked to those prompts. Returns the model id (None when the
    trial compiled nothing)."""
    if outcome.program_state is None:
        return None
    trial = outcome.trial
    prompts = tracking.register_prompts(tracking.predictor_prompts(outcome.program_state), trial.experiment,
                                        trial.program.name, run_id)
    examples = getattr(splits, trial.eval.split)[:2]
    if not examples:
        return None
    inputs = [{field: ex[field] for field in splits.task.input_fields} for ex in examples]
    answers = [ex[splits.task.answer_field] for ex in examples]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "export"
        folder.mkdir()
        write_folder(folder, trial, outcome.artifacts.get("task.json") or dataclasses.asdict(splits.task), splits,
                     run_id=run_id, digest=outcome.params.get("data.digest") or data_digest(trial.data),
                     metrics=outcome.metrics, tags=tracking.versions(), experiment_file=experiment_file,
                     program_state=outcome.program_state)
        model_file = describe(trial.model.spec).path if copy_model_file else None
        return tracking.log_program_model(folder, SERVING, inputs, answers, tracking.requirements(),
                                          outcome.metrics, prompts, eval_dataset, model_file)


def pick_run(run: str, experiment: str | None = None) -> tuple[str, str | None]:
    """The run `chainopt export` means, and its store: `best` of the experiment (file or name; the report's
    rule, optimize.report.best_run), or a run id or a unique start of one (compare shows the ids). A given
    experiment's [tracking] store is searched; otherwise the default one."""
    from optimize.report import best_run, resolve

    name, uri = resolve(experiment) if experiment else (None, None)
    if run != "best":
        return tracking.run_by_prefix(run, uri), uri
    if name is None:
        raise ChainoptError("`export best` needs the experiment: chainopt export best --experiment FILE.toml --out DIR")
    experiment_id, parent = tracking.runs_of(name, uri)
    best = best_run([r for r in tracking.child_rows(experiment_id, parent.info.run_id) if not r.get("cascade")])
    if best is None:
        raise ChainoptError(f"experiment {name!r} has no scored LLM run to export (baselines and FAILED runs are "
                            "never exported)")
    return best["run_id"], uri


def unchanged_digest(trial: Trial, recorded: str | None, run_id: str) -> str:
    """The data's content hash now, which must be the one the run recorded: the export writes its slice (and
    a KNN pool) from the data as it is now, and names it in the manifest as the data the run measured."""
    digest = data_digest(trial.data)
    if recorded and recorded != digest:
        where = ", ".join(trial.data.files()) or f"dataset {trial.data.dataset}"
        raise DataError(f"{where} changed since run {run_id} (content hash {recorded[:12]}… then, {digest[:12]}… "
                        "now): the export would carry other data than the run was measured on")
    return digest


def write_jsonl(path: Path, examples: list[dspy.Example]) -> None:
    with path.open("w", encoding="utf-8") as handle:
        for example in examples:
            handle.write(json.dumps(dict(example)) + "\n")


def given_paths(experiment_file: str | None) -> dict[str, str]:
    """The data paths as the experiment file wrote them (the run records them resolved against its folder)."""
    if experiment_file is None:
        return {}
    data = tomllib.loads(experiment_file).get("data", {})
    return {key: data[key] for key in FILE_KEYS if isinstance(data.get(key), str)}


def data_section(trial: Trial, examples: int, *, digest: str, given: dict[str, str] | None = None) -> dict[str, Any]:
    """The manifest's data, naming what was actually read: a named dataset by its name, a user's file by its
    path as given and as resolved; either with its content hash (optimize.data.data_digest; for a Hub
    dataset its name and split). Then the sizes, seed and column mapping (predict reads new files by
    it), the slice scored and how many examples it had."""
    cfg = trial.data
    if cfg.files():
        source: dict[str, Any] = {}
        for key in FILE_KEYS:
            if value := getattr(cfg, key):
                source[key] = (given or {}).get(key, value)
                if not value.startswith("hf:"):
                    source[f"{key}_resolved"] = value
        rest = cfg.model_dump(exclude={"dataset", *FILE_KEYS})
    else:
        source = {"dataset": cfg.dataset}
        rest = cfg.model_dump(include={"train", "compile_train", "dev", "test", "seed"})
    return {**source, "digest": digest, **rest, "eval_split": trial.eval.split, "examples": examples}


@dataclass
class Exported:
    """An export folder loaded back: the program ready to run, and what it was measured at."""

    program: dspy.Module
    task: Task
    model: ModelConfig
    manifest: dict[str, Any]


def load_export(folder: Path, *, model_spec: str | None = None, force: bool = False) -> Exported:
    """Rebuild the program and check the model file is the one it was measured with (sha256)."""
    from optimize.trial import build_program, get_program

    folder = Path(folder)
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise ChainoptError(f"{folder} is not a chainopt export (no readable {MANIFEST})") from exc
    model_cfg = ModelConfig.model_validate({k: v for k, v in manifest["model"].items() if k in ModelConfig.model_fields})
    if model_spec:
        model_cfg = model_cfg.model_copy(update={"spec": model_spec})
    info = describe(model_cfg.spec)
    if info.sha256 != manifest["model"]["sha256"] and not force:
        raise ModelError(f"model file {info.path} has sha256 {info.sha256[:12]}…, but the export was measured with "
                         f"{manifest['model']['sha256'][:12]}…; use --force to run it anyway")
    task_data = manifest["task"]
    task = Task(**{**task_data, "input_fields": tuple(task_data["input_fields"]),
                   "labels": tuple(task_data["labels"]) if task_data.get("labels") else None})
    spec = get_program(manifest["program"]["name"])
    program = build_program(spec, task, manifest["program"]["settings"])
    program.load(str(folder / PROGRAM))
    if manifest["optimizer"]["name"] == "knn_fewshot":
        program = _rebuild_knn(program, task, manifest, spec.metric(task), folder)
    return Exported(program, task, model_cfg, manifest)


def _rebuild_knn(program: dspy.Module, task: Task, manifest: dict[str, Any], metric, folder: Path) -> dspy.Module:
    """KNNFewShot picks demos per input at call time, so its state is the training pool, not a JSON field:
    rebuild the retriever from the pool the export carries (the dataset may be nowhere near)."""
    from optimize.optimizers import knn_program

    try:
        lines = (folder / POOL).read_text(encoding="utf-8").splitlines()
    except OSError:
        raise ChainoptError(f"{folder} has no {POOL}, the training pool its KNN demos come from: it was exported "
                            "before exports carried it; export the run again") from None
    pool = [dspy.Example(**json.loads(line)).with_inputs(*task.input_fields) for line in lines if line.strip()]
    return knn_program(program, manifest["optimizer"]["settings"], pool, metric, tuple(task.input_fields))


def input_columns(data: dict[str, Any], task: Task) -> dict[str, str]:
    """Program field -> the column of the user's file the run read it from (the manifest's data section:
    `[data] inputs` and `answer`), so that predict takes the same file layout the experiment did."""
    return {**(data.get("inputs") or {}), **({task.answer_field: data["answer"]} if data.get("answer") else {})}


def read_inputs(path: Path, task: Task, columns: dict[str, str]) -> tuple[list[Row], list[dspy.Example]]:
    """JSONL rows holding the task's input fields (and optionally the gold answer), each under the user's
    column of `columns` or under the program's own field name; returns the rows as read and their examples."""
    rows, examples = [], []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}: line {number}: invalid JSON ({exc.msg})") from None
        row = row if isinstance(row, dict) else {}
        found = {field: next((c for c in (columns.get(field, field), field) if c in row), None)
                 for field in (*task.input_fields, task.answer_field)}
        fields = {field: row[column] for field, column in found.items() if column is not None}
        missing = [field for field in task.input_fields if field not in fields]
        if missing:
            names = ", ".join(repr(columns.get(f, f)) + (f" (or {f!r})" if columns.get(f, f) != f else "")
                              for f in missing)
            raise DataError(f"{path}: line {number}: missing input column(s) {names}")
        rows.append(row)
        examples.append(dspy.Example(**{**row, **fields}).with_inputs(*task.input_fields))
    if not examples:
        raise DataError(f"{path}: no input rows")
    return rows, examples


def predict_file(folder: Path, input_path: Path, output_path: Path, *, model_spec: str | None = None,
                 force: bool = False, threads: int = 8) -> dict[str, Any]:
    """Run an exported program over a JSONL file; write one JSON line per input with its answer and record."""
    from optimize.llm.engine import build_lm, closed_on_interrupt
    from optimize.trial import get_program, mean_score, score

    exported = load_export(folder, model_spec=model_spec, force=force)
    rows, examples = read_inputs(input_path, exported.task, input_columns(exported.manifest["data"], exported.task))
    answer = exported.task.answer_field
    metric = get_program(exported.manifest["program"]["name"]).metric(exported.task)
    with closed_on_interrupt():
        _, result = score(exported.program, examples, metric, exported.task, lm=build_lm(exported.model),
                          threads=threads, label="predicting")
    records = sorted(result.records, key=lambda r: r.index)
    tmp = Path(output_path).with_suffix(".partial")
    with tmp.open("w") as handle:
        for row, record in zip(rows, records):
            handle.write(json.dumps({**row, answer: record.predicted, "gold": record.gold,
                                     "success": record.success if record.gold is not None else None,
                                     "error": record.error, "steps": record.steps,
                                     "tokens": record.usage.tokens}, default=str) + "\n")
    tmp.replace(output_path)
    graded = [r for r in records if r.gold is not None]
    summary = {"n": len(records), "output": str(output_path),
               "exported_accuracy": exported.manifest["metrics"].get("accuracy")}
    if graded:
        summary["accuracy"] = sum(r.success for r in graded) / len(graded)
    if graded and exported.task.kind == "multilabel":  # accuracy above is exact-set accuracy
        summary.update(f1=mean_score(graded), exported_f1=exported.manifest["metrics"].get("f1"))
    return summary
