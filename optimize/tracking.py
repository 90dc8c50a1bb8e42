"""Everything that touches MLflow: the store, parent/child runs, params, metrics, artifacts, Pareto plot.

One parent run per experiment, one child run per sweep combination. Children carry the hash of their
resolved config, so a re-run recognises finished work and does not recompute it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import sqlite3
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

import optimize
from optimize.errors import ChainoptError

TAG_KIND = "chainopt.kind"  # "parent" | "child"
TAG_HASH = "chainopt.config_hash"
TAG_EXPERIMENT_HASH = "chainopt.experiment_hash"
TAG_STOPPED = "chainopt.stopped"
TAG_PARETO = "chainopt.pareto"


def default_uri(root: Path | None = None) -> str:
    """The project's own store: SQLite beside the project, artifacts in ./mlruns."""
    return f"sqlite:///{(root or Path.cwd()).resolve() / 'mlflow.db'}"


def tracking_uri(configured: str | None = None) -> str:
    return configured or os.environ.get("MLFLOW_TRACKING_URI") or default_uri()


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """One process at a time opens a local SQLite store: two runs started together would otherwise both
    create a new store's tables ("table ... already exists") or the same experiment."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    path = Path(uri.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fails at once where the store cannot be written, not after MLflow's ~100 s of retries meant for servers.
    sqlite3.connect(path).execute("pragma user_version").connection.close()
    with path.open("ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # flock: independent of the fcntl() byte locks SQLite itself takes
        yield


def setup(experiment: str, uri: str | None = None) -> str:
    """Point MLflow at the store and make sure the experiment exists; returns its id."""
    uri = tracking_uri(uri)
    mlflow.set_tracking_uri(uri)
    try:
        with _store_lock(uri):
            client = MlflowClient()  # opening a SQLite store creates its folder and tables: it fails here
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                return found.experiment_id
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
            # Tagged as a model-development experiment, so the MLflow UI opens on its runs table, not GenAI pages.
            return client.create_experiment(experiment, artifact_location=location,
                                            tags={"mlflow.experimentKind": "custom_model_development"})
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
    for run in runs:
        if run.data.tags.get(TAG_HASH) == config_hash and run.info.status == "FINISHED":
            return run
    return None


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


def log_json(obj: Any, artifact_file: str) -> None:
    mlflow.log_dict(obj, artifact_file)


def log_table(rows: list[dict[str, Any]], artifact_file: str) -> None:
    if rows:
        import pandas as pd

        frame = pd.DataFrame([{k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in r.items()} for r in rows])
        mlflow.log_table(frame, artifact_file=artifact_file)


def log_program(program, artifact_file: str = "program.json") -> None:
    """The compiled program's DSPy JSON state (never a pickle)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        program.save(str(path))
        mlflow.log_artifact(str(path), artifact_path=str(Path(artifact_file).parent) if "/" in artifact_file else None)


def pareto_front(points: list[tuple[str, float, float]]) -> set[str]:
    """Runs not dominated on (higher accuracy, lower cost per success)."""
    front = set()
    for rid, acc, cost in points:
        dominated = any((a >= acc and c <= cost) and (a > acc or c < cost) for other, a, c in points if other != rid)
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
                     "model": p.get("model.spec"), "seed": p.get("seed"),
                     "accuracy": m.get("accuracy"), "cost": m.get(cost_metric), "metrics": m,
                     "stopped": run.data.tags.get(TAG_STOPPED, "")})
    # A run with no success has no cost per success to trade against accuracy: it is never on the front.
    scored = [(r["run_id"], r["accuracy"], r["cost"]) for r in rows
              if r["accuracy"] is not None and r["cost"] is not None and math.isfinite(r["cost"])]
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
    for r in finite:
        ax.scatter(r["cost"], r["accuracy"], s=70 if r["pareto"] else 35,
                   c="tab:red" if r["pareto"] else "tab:blue", zorder=3)
        label = r["optimizer"] if len({x["program"] for x in rows}) == 1 else f"{r['program']}+{r['optimizer']}"
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
