"""One self-contained HTML report of an experiment's latest parent run, to read or mail without MLflow.

Everything is inline (CSS, the Pareto plot as base64 PNG): the file opens offline and fetches nothing.
The data is gathered first (`gather`), then rendered with Jinja2 from templates/report.html.j2 (`render`).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import jinja2

from optimize import tracking
from optimize.cost import UNITS
from optimize.errors import ChainoptError
from optimize.tables import number

UNIT_LABELS = {"tokens": "tokens", "seconds": "seconds", "joules": "joules", "usd": "USD"}


def resolve(target: str) -> tuple[str, str | None]:
    """An experiment TOML file (its tracking section decides name and store) or an experiment name."""
    if target.endswith(".toml"):
        from optimize.config import load_experiment

        exp = load_experiment(target)
        return exp.tracking.experiment or exp.name, exp.tracking.uri
    return target, None


def default_path(experiment: str) -> Path:
    return Path("reports") / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', experiment)}.html"


def best_run(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The best LLM program: highest accuracy, then lowest cost per success. A classical baseline is never
    it (it has no DSPy program to show or export; the report sets it against the baselines instead), nor is
    a FAILED run (mostly chain errors)."""
    scored = [r for r in rows if r["accuracy"] is not None and not r.get("baseline") and r.get("status") != "FAILED"]
    cost = lambda r: math.inf if r["cost"] is None else r["cost"]
    return min(scored, key=lambda r: (-r["accuracy"], cost(r)), default=None)


def program_state(run_id: str) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Each predictor's instructions, fields and demos, and the program's own settings and retrieval pool
    (a retrieval step chooses demos per query: its pool and k say what the prompt holds), from program.json."""
    local = tracking.download(run_id, "program.json")
    if local is None:
        return [], None
    state = json.loads(local.read_text(encoding="utf-8"))
    pools = [v for v in state.values() if isinstance(v, dict) and "examples" in v and "embedder" in v]
    settings = next((v for k, v in state.items() if k == "settings" and isinstance(v, dict)), None)
    retrieval = ({"pool": len(pools[0]["examples"]), "embedder": pools[0]["embedder"], "settings": settings or {}}
                 if pools else None)
    return [{"name": name, "instructions": value.get("signature", {}).get("instructions", ""),
             "fields": [f.get("prefix", "") for f in value.get("signature", {}).get("fields", [])],
             "demos": value.get("demos", []),
             "demo_fields": list(dict.fromkeys(k for demo in value.get("demos", []) for k in demo))}
            for name, value in state.items() if isinstance(value, dict) and "signature" in value], retrieval


def knn_demos(run: dict[str, Any]) -> dict[str, int] | None:
    """For a KNNFewShot run, how many demos each query gets and from how large a training pool: its demos
    are picked per input at call time, so program.json holds none and would read as zero-shot."""
    if run["optimizer"] != "knn_fewshot":
        return None
    params = run["params"]
    return {"k": int(params.get("optimizer.resolved.k", 0)), "pool": int(params.get("data.train_size", 0))}


def priced(rows: list[dict[str, Any]]) -> bool:
    """Whether any run had a price: with none set ([cost] defaults to 0) every USD figure is 0, which the
    report says once rather than showing $0 as if it were measured."""
    return any((r["metrics"].get(key) or 0) > 0 for r in rows for key in ("usd_total", "compile_usd"))


def pareto_png(parent_id: str, rows: list[dict[str, Any]], unit: str) -> bytes:
    """The plot logged with the parent run; drawn afresh for another unit or when it is missing."""
    logged = tracking.download(parent_id, "pareto.png") if unit == "seconds" else None
    if logged is not None:
        return logged.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        path = tracking.pareto_plot(rows, Path(tmp) / "pareto.png", f"{UNIT_LABELS[unit]} per successful chain")
        return path.read_bytes()


def gather(experiment: str, uri: str | None = None, unit: str = "seconds") -> dict[str, Any]:
    """What the report shows, as plain data."""
    experiment_id, parent = tracking.runs_of(experiment, uri)
    parent_id = parent.info.run_id
    rows = tracking.child_rows(experiment_id, parent_id, f"{unit}_per_success")
    best = best_run(rows)
    predictors, retrieval = program_state(best["run_id"]) if best else ([], None)
    return {"experiment": experiment, "tracking_uri": tracking.tracking_uri(uri), "parent_run_id": parent_id,
            "started": dt.datetime.fromtimestamp(parent.info.start_time / 1000).isoformat(timespec="seconds"),
            "status": parent.info.status, "unit": unit,
            "versions": {k: v for k, v in parent.data.tags.items() if k.endswith((".version", ".commit"))},
            "runs": [{**{k: r[k] for k in ("run_id", "name", "status", "stopped", "program", "optimizer", "model",
                                           "seed", "accuracy", "cost", "pareto", "metrics", "baseline", "cascade")},
                      "break_even": {u: r["metrics"][f"break_even_queries_{u}"] for u in UNITS
                                     if f"break_even_queries_{u}" in r["metrics"]}} for r in rows],
            "priced": priced(rows), "best_run_id": best["run_id"] if best else None,
            "best_knn": knn_demos(best) if best else None,
            "best_program": predictors, "best_retrieval": retrieval,
            "pareto_png": pareto_png(parent_id, rows, unit)}


# -- rendering ------------------------------------------------------------------------------------
# Autoescape on: run names, instructions, demos and labels are arbitrary text, never markup.
ENV = jinja2.Environment(loader=jinja2.PackageLoader("optimize", "templates"), autoescape=True,
                         undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
ENV.filters["num"] = functools.partial(number, infinite="never")


def render(data: dict[str, Any]) -> str:
    """The page, from `gather`'s data and templates/report.html.j2."""
    best = next((r for r in data["runs"] if r["run_id"] == data["best_run_id"]), None)
    return ENV.get_template("report.html.j2").render(
        data, best=best, pareto_base64=base64.b64encode(data["pareto_png"]).decode(), units=UNITS,
        unit_labels=UNIT_LABELS)


def write_report(target: str, output: Path | None = None, unit: str = "seconds") -> tuple[Path, dict[str, Any]]:
    """Gather, render and write the report; returns its path and the gathered data."""
    if unit not in UNITS:
        raise ChainoptError(f"unknown cost unit {unit!r}; choose from {', '.join(UNITS)}")
    experiment, uri = resolve(target)
    data = gather(experiment, uri, unit)
    path = output or default_path(experiment)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(data), encoding="utf-8")
    return path, data
