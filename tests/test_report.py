"""The HTML report: self-contained, and it shows what a person needs to pick a program.

The store is built directly with MLflow (no model): child runs shaped like `chainopt run`'s.
The browser test renders a report of a real experiment.
"""

import base64
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from optimize import report as report_module
from optimize import tracking
from optimize.cli import main
from optimize.report import ENV, best_run, default_path, priced, render, resolve, write_report
from optimize.tables import fmt

NAME = "report-synthetic"
DEMO_QUERY = "Where is the card I ordered last week?"


class Page(HTMLParser):
    """A page as a browser's parser reads it: every start tag with its attributes, the text, and the cells of
    each table by its class (header row first)."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._cell: list[str] | None = None
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "table":
            self._rows = self.tables.setdefault(dict(attrs).get("class") or "", [])
        elif tag == "tr":
            self._rows.append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._rows[-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def _metrics(acc: float, per_success: float, compile_seconds: float) -> dict[str, float]:
    n, wins = 4, int(acc * 4)
    m = {"accuracy": acc, "n": n, "successes": wins, "latency_p50": 0.5, "latency_p95": 0.9, "parse_failures": 1,
         "input_tokens_computed": 900, "input_tokens_reused": 300, "output_tokens": 40, "tokens_total": 1240,
         "seconds_total": per_success * wins, "energy_joules": 30.0, "energy_measured": 0.0, "usd_total": 1e-4,
         "compile_tokens": 0.0, "compile_seconds": compile_seconds, "compile_joules": compile_seconds * 15,
         "compile_usd": 0.0}
    m.update({"tokens_per_success": 1240 / wins, "seconds_per_success": per_success,
              "joules_per_success": 30.0 / wins, "usd_per_success": 1e-4 / wins})
    return m


def _state(instructions: str, demos: list[dict]) -> dict:
    return {"classify": {"traces": [], "train": [], "demos": demos, "lm": None,
                         "signature": {"instructions": instructions,
                                       "fields": [{"prefix": "Query:"}, {"prefix": "Intent:"}]}},
            "metadata": {"dependency_versions": {"dspy": "3.4.1"}}}


RUNS = [  # name, optimizer, metrics, program state, break-even (queries) in every unit or None
    ("zero", "none", _metrics(0.5, 2.0, 0.0), _state("Classify the customer request.", []), None),
    ("fewshot", "labeled_fewshot", _metrics(0.75, 1.5, 3.0),
     _state("Classify the customer request.", [{"query": DEMO_QUERY, "intent": "card_arrival"}]), 6.0),
    # compile J 1429.5: a value that %g would write as 1.43e+03 beside the table's 1,240 tokens
    ("bootstrap", "bootstrap_fewshot", _metrics(0.75, 3.0, 95.3), _state("Pick one intent label.", []), math.inf),
]


def _record(experiment: str, runs: list[tuple], tmp: Path, parent_tags: dict[str, str] | None = None,
            stopped: str = "") -> str:
    """An experiment shaped like `chainopt run`'s, in the test session's MLflow store."""
    experiment_id = tracking.setup(experiment)
    with mlflow.start_run(experiment_id=experiment_id, run_name=experiment,
                          tags={tracking.TAG_KIND: "parent", "dspy.version": "3.4.1", **(parent_tags or {})}) as parent:
        for name, optimizer, metrics, state, break_even in runs:
            tags = {tracking.TAG_KIND: "child", **({tracking.TAG_STOPPED: stopped} if stopped else {})}
            with mlflow.start_run(run_name=name, nested=True, experiment_id=experiment_id, tags=tags):
                mlflow.log_params({"program.name": "intent.predict", "optimizer.name": optimizer,
                                   "model.spec": "smollm2-135m", "seed": 0})
                units = {} if break_even is None else {f"break_even_queries_{u}": break_even
                                                       for u in ("tokens", "seconds", "joules", "usd")}
                tracking.log_metrics({**metrics, **units})
                mlflow.log_dict(state, "program.json")
        rows = tracking.child_rows(experiment_id, parent.info.run_id)
        mlflow.log_artifact(str(tracking.pareto_plot(rows, tmp / "pareto.png")))
    return experiment


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> str:
    return _record(NAME, RUNS, tmp_path_factory.mktemp("plot"))


@pytest.fixture(scope="module")
def report(experiment, tmp_path_factory) -> tuple[str, dict]:
    path, data = write_report(experiment, tmp_path_factory.mktemp("report") / "r.html")
    return path.read_text(encoding="utf-8"), data


@pytest.mark.parametrize("rows, expected", [
    ([], None),
    ([{"run_id": "a", "accuracy": 0.5, "cost": 1.0}, {"run_id": "b", "accuracy": 0.7, "cost": 9.0}], "b"),
    ([{"run_id": "a", "accuracy": 0.7, "cost": 2.0}, {"run_id": "b", "accuracy": 0.7, "cost": 1.0}], "b"),
    ([{"run_id": "a", "accuracy": 0.0, "cost": math.inf}, {"run_id": "b", "accuracy": None, "cost": None}], "a"),
    ([{"run_id": "a", "accuracy": 0.7, "cost": None}, {"run_id": "b", "accuracy": 0.7, "cost": 5.0}], "b"),
])
def test_best_run_is_most_accurate_then_cheapest(rows, expected):
    best = best_run(rows)
    assert (best["run_id"] if best else None) == expected


def test_default_path_is_reports_folder_with_a_safe_name():
    assert default_path("banking77-fewshot") == Path("reports/banking77-fewshot.html")
    assert default_path("a/b c") == Path("reports/a_b_c.html")


def test_report_is_self_contained(report):
    text, _ = report
    assert not re.search(r"<script|<link|<iframe|@import|url\(", text, re.I)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text, re.I)
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', text)
    assert len(images) == 1 and base64.b64decode(images[0])[:8] == b"\x89PNG\r\n\x1a\n"


SCRIPT = "<script>alert(1)</script>"
BREAKOUT = '"><img src=x onerror=alert(1)>'  # leaves an attribute value, then opens a tag
ESCAPED = ("&lt;script&gt;alert(1)&lt;/script&gt;", "&#34;&gt;&lt;img src=x onerror=alert(1)&gt;")


@pytest.fixture(scope="module")
def hostile(tmp_path_factory) -> tuple[str, dict]:
    """A report whose every text comes from the user: experiment and run names, a version tag, a stop reason,
    the predictor's name, instructions, field prefix, and its demos' field names, texts and labels."""
    state = {SCRIPT: {"demos": [{"query": BREAKOUT, "intent": SCRIPT, BREAKOUT: "x"}], "signature": {
        "instructions": f"Classify. {SCRIPT} {BREAKOUT}", "fields": [{"prefix": BREAKOUT}, {"prefix": SCRIPT}]}}}
    runs = [(SCRIPT, "labeled_fewshot", _metrics(0.75, 1.5, 3.0), state, 6.0),
            (BREAKOUT, "none", _metrics(0.5, 2.0, 0.0), _state("Classify.", []), None)]
    name = _record(f"hostile {SCRIPT}{BREAKOUT}", runs, tmp_path_factory.mktemp("hostile"),
                   parent_tags={"chainopt.version": BREAKOUT}, stopped=SCRIPT)
    path, data = write_report(name, tmp_path_factory.mktemp("report") / "hostile.html")
    return path.read_text(encoding="utf-8"), data


def injected_markup(text: str) -> list[str]:
    """What a browser would run or load from the page beyond its own markup: a script tag, an on* handler,
    an image that is not the inline plot."""
    page = Page(text)
    return ([tag for tag, _ in page.tags if tag == "script"]
            + [f"{tag} {name}" for tag, attrs in page.tags for name in attrs if name.startswith("on")]
            + [f"img {attrs.get('src')}" for tag, attrs in page.tags
               if tag == "img" and not (attrs.get("src") or "").startswith("data:image/png;base64,")])


def test_user_text_is_escaped_everywhere(hostile):
    text, data = hostile
    assert injected_markup(text) == []
    assert SCRIPT not in text and "<img src=x" not in text
    for escaped in ESCAPED:
        assert escaped in text
    page = Page(text)
    shown = "".join(page.text)  # decoded: each payload reads as the text it was
    assert f"\n{data['experiment']}\n" in shown and f"Classify. {SCRIPT} {BREAKOUT}" in shown
    assert f"chainopt.version {BREAKOUT}" in shown
    assert [(row[1], row[-1]) for row in page.tables["runs"][1:]] == [(f"{SCRIPT} best", SCRIPT), (BREAKOUT, SCRIPT)]
    assert page.tables["demos"] == [["query", "intent", BREAKOUT], [BREAKOUT, SCRIPT, "x"]]
    alt = next(attrs["alt"] for tag, attrs in page.tags if tag == "img")
    assert alt.startswith(f"Pareto plot of {data['experiment']}:")  # the name stayed inside the attribute


def test_escaping_check_fails_once_autoescape_is_off(hostile, monkeypatch):
    # Proof that the test above can fail: the same data rendered without autoescape is caught.
    _, data = hostile
    monkeypatch.setattr(report_module, "ENV", report_module.ENV.overlay(autoescape=False, cache_size=0))
    text = render(data)
    assert SCRIPT in text and "script" in injected_markup(text) and "img onerror" in injected_markup(text)


def test_report_shows_runs_best_program_costs_and_break_even(report):
    text, data = report
    by_name = {r["name"]: r for r in data["runs"]}
    assert data["best_run_id"] == by_name["fewshot"]["run_id"]
    assert [r["name"] for r in data["runs"] if r["pareto"]] == ["fewshot"]
    assert re.search(r"fewshot <span class=\"best\">best</span>", text)
    best_section = text.split("<h2>Best program</h2>")[1].split("<h2>")[0]
    for shown in (DEMO_QUERY, "card_arrival", "Classify the customer request."):
        assert shown in best_section
    for header in ("tokens / success", "seconds / success", "joules / success", "USD / success", "latency p50 (s)",
                   "compile J", "eval input reused", "estimated (CPU-s x W)"):
        assert header in text
    break_even = text.split("<h2>Break-even</h2>")[1]
    assert '<td class="t">fewshot</td><td>6</td>' in break_even
    assert '<td class="t">bootstrap</td><td>never</td>' in break_even
    assert '<td class="t">zero</td>' not in break_even


def test_numbers_follow_one_rule(report):
    text, _ = report
    tables = Page(text).tables
    cells = [cell for rows in tables.values() for row in rows for cell in row]
    assert [c for c in cells if re.fullmatch(r"[\d.,]+e[+-]?\d+", c)] == [], "a number in e-notation"
    cost = {row[0]: row for row in tables["cost"][1:]}
    assert cost["bootstrap"][3] == "1,430" and cost["bootstrap"][8] == "1,240"  # compile J, eval tokens
    assert cost["zero"][-1] == "0.0001"  # eval USD


@pytest.mark.parametrize("value, shown", [
    (None, "-"), (math.nan, "-"), (math.inf, "never"), (0.0, "0"), (6.0, "6"), (1631.0, "1,631"),
    (1429.5, "1,430"), (413.333, "413"), (0.75, "0.75"), (0.123456, "0.123"), (2.5e-05, "0.000025"),
])
def test_num_writes_counts_in_full_and_the_rest_to_three_significant_digits(value, shown):
    assert ENV.filters["num"](value) == shown
    # The terminal's tables follow the same rule (an infinite cost reads "inf" there).
    assert fmt(value) == shown.replace("never", "inf")


@pytest.mark.parametrize("usd, expected", [
    ({"usd_total": 0.0, "compile_usd": 0.0, "usd_per_success": 0.0}, False),
    ({"usd_total": 0.0, "usd_per_success": math.inf}, False),  # no success: infinite per success, still no price
    ({}, False),
    ({"usd_total": 1e-4, "compile_usd": 0.0}, True),
    ({"usd_total": 0.0, "compile_usd": 2e-6}, True),
])
def test_priced_means_some_usd_was_spent(usd, expected):
    assert priced([{"metrics": {"accuracy": 0.5}}, {"metrics": usd}]) is expected


def test_no_price_is_said_once_instead_of_a_silent_zero(report):
    text, data = report
    assert data["priced"] and "No price set" not in text
    unpriced = " ".join(render({**data, "priced": False}).split())
    assert unpriced.count("No price set: [cost] usd_per_hour = 0") == 1
    assert "set <code>usd_per_hour</code> (the machine) or <code>usd_per_m_input</code>" in unpriced


def test_knn_winner_has_demos_per_query_not_zero_shot(report):
    _, data = report
    best = next(r for r in data["runs"] if r["run_id"] == data["best_run_id"])
    knn = report_module.knn_demos({"optimizer": "knn_fewshot",
                                   "params": {"optimizer.resolved.k": "3", "data.train_size": "1631"}})
    assert knn == {"k": 3, "pool": 1631} and report_module.knn_demos({**best, "params": {}}) is None
    program = [{**pred, "demos": [], "demo_fields": []} for pred in data["best_program"]]
    section = render({**data, "best_knn": knn, "best_program": program}).split("<h2>Best program</h2>")[1]
    text = " ".join(section.split("<h2>")[0].split())
    assert "Dynamic demos, chosen per query" in text and "the 3 training examples nearest" in text
    assert "training pool of 1,631" in text and "zero-shot" not in text
    zero = render({**data, "best_program": program}).split("<h2>Best program</h2>")[1].split("<h2>")[0]
    assert "No demos (zero-shot)." in zero


def test_knn_winner_is_found_from_its_recorded_settings(tmp_path):
    """Fails if the report reads a KNN run's empty program.json demos as a zero-shot program."""
    runs = [("knn", "knn_fewshot", _metrics(0.75, 1.0, 0.0), _state("Classify the customer request.", []), None)]
    experiment_id = tracking.setup(_record("report-knn", runs, tmp_path))
    run = MlflowClient().search_runs([experiment_id], f"tags.`{tracking.TAG_KIND}` = 'child'")[0]
    MlflowClient().log_param(run.info.run_id, "optimizer.resolved.k", 4)
    MlflowClient().log_param(run.info.run_id, "data.train_size", 50)
    text = write_report("report-knn", tmp_path / "r.html")[0].read_text(encoding="utf-8")
    best = " ".join(text.split("<h2>Best program</h2>")[1].split("<h2>")[0].split())
    assert "the 4 training examples nearest to each input (from a training pool of 50)" in best
    assert "zero-shot" not in best


def test_other_cost_unit_redraws_the_plot(experiment, report, tmp_path):
    _, seconds = report
    _, tokens = write_report(experiment, tmp_path / "t.html", unit="tokens")
    assert tokens["unit"] == "tokens" and tokens["pareto_png"] != seconds["pareto_png"]


def test_cli_writes_default_path_and_prints_json(experiment, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", experiment, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["path"] == f"reports/{NAME}.html" and (tmp_path / out["path"]).is_file()
    assert out["runs"] == 3 and out["best_run_id"]


def test_toml_argument_uses_its_tracking_section(experiment, tmp_path):
    toml = tmp_path / "other-name.toml"
    toml.write_text(f'name = "other-name"\n[tracking]\nexperiment = "{NAME}"\nuri = "{tracking.tracking_uri()}"\n')
    assert resolve(str(toml)) == (NAME, tracking.tracking_uri())
    path, data = write_report(str(toml), tmp_path / "x.html")
    assert data["experiment"] == NAME and path.is_file()


def test_unknown_experiment_is_a_clean_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["report", "never-ran"]) == 2
    assert "no runs recorded for experiment 'never-ran'" in capsys.readouterr().err


def test_retrieval_winner_shows_its_pool_and_settings(report):
    """Fails if a retrieval program (demos chosen per query from a pool saved in program.json) reads as
    zero-shot, or if the settings a search chose are not shown."""
    _, data = report
    program = [{**pred, "demos": [], "demo_fields": []} for pred in data["best_program"]]
    retrieval = {"pool": 9900, "embedder": "tfidf", "settings": {"k": 8, "agree": 3}}
    section = render({**data, "best_program": program, "best_retrieval": retrieval}).split("<h2>Best program</h2>")[1]
    text = " ".join(section.split("<h2>")[0].split())
    assert "the 8 training examples most similar to each input (from a pool of 9,900, tfidf)" in text
    assert "<code>k = 8</code>, <code>agree = 3</code>" in text
    assert "No fixed demos: only the retrieved ones." in text and "zero-shot" not in text


def test_retrieval_winner_is_read_from_its_saved_pool(tmp_path):
    """Fails if the report does not find a retrieval program's pool and settings in its program.json."""
    state = {**_state("Classify the customer request.", []),
             "retrieve": {"embedder": "tfidf", "input_fields": ["query"],
                          "examples": [{"query": f"q{i}", "intent": "card_arrival"} for i in range(37)]},
             "settings": {"k": 5, "agree": 4}}
    runs = [("retrieve", "settings_search", _metrics(0.75, 1.0, 0.0), state, None)]
    write_report(_record("report-retrieve", runs, tmp_path), tmp_path / "r.html")
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    best = " ".join(text.split("<h2>Best program</h2>")[1].split("<h2>")[0].split())
    assert "the 5 training examples most similar to each input (from a pool of 37, tfidf)" in best
    assert "<code>agree = 4</code>" in best
