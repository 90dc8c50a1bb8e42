"""One self-contained HTML report of an experiment's latest parent run, to read or mail without MLflow.

Everything is inline (CSS, the Pareto plot as base64 PNG): the file opens offline and fetches nothing.
The data is gathered first (`gather`, also what --json prints), then rendered (`render`).
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

from optimize import tracking
from optimize.cost import UNITS
from optimize.errors import ChainoptError

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
    """Highest accuracy, then lowest cost per success."""
    scored = [r for r in rows if r["accuracy"] is not None]
    cost = lambda r: math.inf if r["cost"] is None else r["cost"]
    return min(scored, key=lambda r: (-r["accuracy"], cost(r)), default=None)


def program_state(run_id: str) -> list[dict[str, Any]]:
    """Each predictor's instructions, fields and demos, from the run's DSPy program.json."""
    local = tracking.download(run_id, "program.json")
    if local is None:
        return []
    state = json.loads(local.read_text(encoding="utf-8"))
    return [{"name": name, "instructions": value.get("signature", {}).get("instructions", ""),
             "fields": [f.get("prefix", "") for f in value.get("signature", {}).get("fields", [])],
             "demos": value.get("demos", [])}
            for name, value in state.items() if isinstance(value, dict) and "signature" in value]


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
    return {"experiment": experiment, "tracking_uri": tracking.tracking_uri(uri), "parent_run_id": parent_id,
            "started": dt.datetime.fromtimestamp(parent.info.start_time / 1000).isoformat(timespec="seconds"),
            "status": parent.info.status, "unit": unit,
            "versions": {k: v for k, v in parent.data.tags.items() if k.endswith((".version", ".commit"))},
            "runs": [{k: r[k] for k in ("run_id", "name", "status", "stopped", "program", "optimizer", "model",
                                        "seed", "accuracy", "cost", "pareto", "metrics")} for r in rows],
            "best_run_id": best["run_id"] if best else None,
            "best_program": program_state(best["run_id"]) if best else [],
            "pareto_png": pareto_png(parent_id, rows, unit)}


# -- rendering ------------------------------------------------------------------------------------
def num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "never" if value > 0 else "-inf"
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return html.escape(str(value))


def _table(headers: list[str], rows: list[list[str]], cls: str = "", text_columns: int = 1) -> str:
    """Cells are HTML already; the first `text_columns` are left-aligned text, the rest numbers."""
    align = lambda i: ' class="t"' if i < text_columns else ""
    head = "".join(f"<th{align(i)}>{html.escape(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{align(i)}>{c}</td>" for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _runs_table(data: dict[str, Any]) -> str:
    rows = []
    for r in data["runs"]:
        m = r["metrics"]
        mark = '<span class="pareto" title="Pareto-optimal">&#9733;</span>' if r["pareto"] else ""
        best = ' <span class="best">best</span>' if r["run_id"] == data["best_run_id"] else ""
        rows.append([mark, html.escape(r["name"] or r["run_id"]) + best, num(r["accuracy"]),
                     f"{num(m.get('successes'))}/{num(m.get('n'))}",
                     *(num(m.get(f"{u}_per_success")) for u in UNITS),
                     num(m.get("latency_p50")), num(m.get("latency_p95")), num(m.get("parse_failures")),
                     html.escape(r["stopped"] or r["status"])])
    return _table(["Pareto", "run", "accuracy", "ok/n", "tokens / success", "seconds / success",
                   "joules / success", "USD / success", "latency p50 (s)", "latency p95 (s)", "parse failures",
                   "status"], rows, "runs", text_columns=2)


def _cost_table(data: dict[str, Any]) -> str:
    rows = []
    for r in data["runs"]:
        m = r["metrics"]
        energy = "measured (RAPL)" if m.get("energy_measured") else "estimated (CPU-s x W)"
        rows.append([html.escape(r["name"] or r["run_id"]), num(m.get("compile_tokens")),
                     num(m.get("compile_seconds")), num(m.get("compile_joules")), num(m.get("compile_usd")),
                     num(m.get("input_tokens_computed")), num(m.get("input_tokens_reused")),
                     num(m.get("output_tokens")), num(m.get("tokens_total")), num(m.get("seconds_total")),
                     num(m.get("energy_joules")) + f' <span class="note">{energy}</span>', num(m.get("usd_total"))])
    return _table(["run", "compile tokens", "compile s", "compile J", "compile USD", "eval input computed",
                   "eval input reused", "eval output", "eval tokens", "eval s", "eval J", "eval USD"], rows, "cost")


def _break_even(data: dict[str, Any]) -> str:
    rows = [[html.escape(r["name"] or r["run_id"]), *(num(r["metrics"].get(f"break_even_queries_{u}")) for u in UNITS)]
            for r in data["runs"] if any(f"break_even_queries_{u}" in r["metrics"] for u in UNITS)]
    if not rows:
        return "<p>No compiled run has a zero-shot baseline with the same model, program and seed.</p>"
    return ("<p>Queries after which a compile has paid for itself through a lower cost per success than the "
            "zero-shot baseline; <em>never</em>: not cheaper per success, <em>0</em>: compiling cost nothing.</p>"
            + _table(["run", *(f"in {UNIT_LABELS[u]}" for u in UNITS)], rows, "break-even"))


def _program(data: dict[str, Any]) -> str:
    best = next((r for r in data["runs"] if r["run_id"] == data["best_run_id"]), None)
    if best is None:
        return "<p>No finished run.</p>"
    parts = [f"<p>Run <b>{html.escape(best['name'] or best['run_id'])}</b> "
             f"(accuracy {num(best['accuracy'])}, {UNIT_LABELS[data['unit']]} per success {num(best['cost'])}).</p>"]
    if not data["best_program"]:
        parts.append("<p>Its program.json artifact is missing.</p>")
    for pred in data["best_program"]:
        parts.append(f"<h3>Predictor <code>{html.escape(pred['name'])}</code></h3>"
                     f"<p class=\"label\">Instructions</p><pre>{html.escape(pred['instructions'])}</pre>"
                     f"<p class=\"label\">Fields: {html.escape(' '.join(pred['fields']))}</p>")
        demos = pred["demos"]
        if demos:
            keys = list(dict.fromkeys(k for d in demos for k in d))
            parts.append(f"<p class=\"label\">{len(demos)} demo(s)</p>"
                         + _table(keys, [[html.escape(str(d.get(k, ""))) for k in keys] for d in demos], "demos",
                                len(keys)))
        else:
            parts.append('<p class="label">No demos (zero-shot).</p>')
    return "".join(parts)


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;
color:#222}
h1{margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.meta{color:#666;font-size:.9rem}table{border-collapse:collapse;margin:.5rem 0;font-size:.88rem}
th,td{border:1px solid #ddd;padding:.3rem .5rem;text-align:right;vertical-align:top}
th{background:#f4f4f4}th.t,td.t{text-align:left}.pareto{color:#c0392b;font-size:1.1rem}
.best{background:#27ae60;color:#fff;border-radius:3px;padding:0 .3rem;font-size:.75rem}
.note{color:#888;font-size:.75rem}pre{background:#f7f7f7;padding:.5rem;white-space:pre-wrap}
.label{color:#555;margin:.3rem 0}img{max-width:100%;border:1px solid #eee}
"""


def render(data: dict[str, Any]) -> str:
    png = base64.b64encode(data["pareto_png"]).decode()
    versions = ", ".join(f"{html.escape(k)} {html.escape(v)}" for k, v in sorted(data["versions"].items()))
    unit = UNIT_LABELS[data["unit"]]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>chainopt report: {html.escape(data['experiment'])}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(data['experiment'])}</h1>
<p class="meta">Parent run {html.escape(data['parent_run_id'])} ({html.escape(data['status'])}), started
{html.escape(data['started'])}, store {html.escape(data['tracking_uri'])}<br>{versions}</p>
<h2>Accuracy against cost per success</h2>
<img id="pareto" alt="Pareto plot: accuracy against {unit} per successful chain" src="data:image/png;base64,{png}">
<h2>Runs</h2>
{_runs_table(data)}
<p class="note">&#9733; Pareto-optimal on {unit} per success: no other run is both more accurate and cheaper.
Costs count failed chains too; <em>never</em>: no chain succeeded.</p>
<h2>Best program</h2>
{_program(data)}
<h2>Cost breakdown</h2>
<p>Compile (optimizer) versus evaluation; evaluation input tokens split into computed and reused from
the prompt cache.</p>
{_cost_table(data)}
<h2>Break-even</h2>
{_break_even(data)}
</body></html>
"""


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
