"""What a person sees: headless Debian Chromium, driven by Playwright, on a real experiment's MLflow UI and report.

Runs the tiny real experiment (tests/data/tiny.toml) once for the module, then checks that MLflow's UI lists
the runs with their accuracy and cost-per-success values and, for each child, its datasets (name and digest)
and logged model; that a run page shows its datasets, logged model and registered prompt; that a run's
Traces tab lists its chains' traces and one opens on its LLM and validator spans; that it shows the Pareto
plot artifact, and that the `chainopt report` page renders its plot.
Screenshots are kept in reports/screenshots/.
A missing Chromium or Playwright fails these tests (it never skips them): `make install` provides both.
"""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from optimize import tracking
from optimize.ui import start_ui, stop_ui

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "reports" / "screenshots"
CHROMIUM = os.environ.get("CHAINOPT_CHROMIUM", "/usr/bin/chromium")
# Headless on a machine with a closed network: no GPU, no sandbox (root), no background connections.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
WAIT_MS = 90_000  # the UI's first load on 2 busy cores


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium under Playwright; Playwright gives every launch a fresh, empty profile."""
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install Debian's package (apt-get install -y chromium, "
                    "done by scripts/install.sh when run as root) or set CHAINOPT_CHROMIUM to its path")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: pip install -e '.[test]' (no browser download is needed)")
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> dict:
    """A real store: `chainopt run` of the tiny experiment, with traces of 2 chains a run, then `chainopt
    report` of it."""
    work = tmp_path_factory.mktemp("browser")
    config = work / "tiny.toml"
    config.write_text((ROOT / "tests" / "data" / "tiny.toml").read_text(encoding="utf-8")
                      + "\n[tracking]\ntraces = true\ntrace_examples = 2\n", encoding="utf-8")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    # PYTHONPATH: this checkout's chainopt, not whichever one is installed in the environment.
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT)}
    chainopt = [sys.executable, "-m", "optimize"]
    for args in (["run", str(config), "-q"], ["report", str(config), "--json"]):
        done = subprocess.run(chainopt + args, cwd=work, env=env, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
    report = work / json.loads(done.stdout)["path"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = [client.get_run(r.info.run_id) for r in client.search_runs([experiment.experiment_id])]  # with inputs
    parent = next(r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "parent")
    children = [r for r in runs if r.data.tags.get(tracking.TAG_KIND) == "child"]
    assert len(children) == 2
    return {"uri": uri, "experiment_id": experiment.experiment_id, "parent": parent, "children": children,
            "report": report}


@pytest.fixture(scope="module")
def ui(store):
    process, url = start_ui(store["uri"])
    yield f"{url}/#/experiments/{store['experiment_id']}"
    stop_ui(process)


def _close_assistant(page) -> None:
    """MLflow 3 opens an assistant side panel that hides part of the page."""
    close = page.get_by_role("button", name="Close")
    if close.count():
        close.first.click()


def _close_to(text: str, value: float) -> bool:
    shown = text.strip()
    if math.isinf(value):  # MLflow stores an infinite metric as the largest float, and the UI shows that
        return shown.lower() in {"inf", "infinity", "∞"} or float(shown) >= 1.7e308
    return math.isclose(float(shown), value, rel_tol=1e-6, abs_tol=1e-9)


def test_runs_table_lists_runs_with_accuracy_and_cost_per_success(page, ui, store):
    _expand_children(page, ui, store)
    for metric in ("accuracy", "seconds_per_success"):
        page.get_by_role("button", name="Columns").click()
        page.get_by_placeholder("Search columns").fill(metric)
        page.get_by_text(metric, exact=True).last.click()
        page.keyboard.press("Escape")
        page.locator(".ag-header-cell", has_text=metric).first.wait_for()
    page.screenshot(path=str(SHOTS / "mlflow-runs-table.png"))

    for child in store["children"]:
        # The pinned name column and the metric columns are separate row elements sharing a row-id.
        row_id = page.locator(".ag-row", has_text=child.info.run_name).first.get_attribute("row-id")
        metrics = tracking.read_metrics(child)
        for metric in ("accuracy", "seconds_per_success"):
            cell = page.locator(f'.ag-row[row-id="{row_id}"] [col-id*="{metric}"]').first.inner_text()
            assert _close_to(cell, metrics[metric]), (child.info.run_name, metric, cell, metrics[metric])


def test_run_page_shows_cost_metrics(page, ui, store):
    child = store["children"][0]
    page.goto(f"{ui}/runs/{child.info.run_id}?workflowType=machine_learning")
    page.get_by_text(child.info.run_name, exact=True).first.wait_for()
    _close_assistant(page)
    page.get_by_placeholder("Search metrics").fill("per_success")
    for unit in ("tokens", "seconds", "joules", "usd"):
        page.get_by_text(f"{unit}_per_success", exact=True).first.wait_for()
    page.get_by_text("seconds_per_success", exact=True).first.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "mlflow-run-metrics.png"))


def _expand_children(page, ui: str, store: dict) -> None:
    page.goto(f"{ui}/runs?workflowType=machine_learning")  # the runs table, not the GenAI overview
    parent_row = page.locator(".ag-row", has_text="tiny")
    parent_row.first.wait_for()
    _close_assistant(page)
    parent_row.first.locator('[col-id*="Run Name"] button').first.click()  # expand: show the child runs
    for child in store["children"]:
        page.locator(".ag-row", has_text=child.info.run_name).first.wait_for()


def test_runs_table_shows_each_childs_datasets_and_logged_model(page, ui, store):
    """The Datasets column names each child's training slice with its digest (the same slice, so the same
    digest, for both children) and the Models column its logged model. Fails if the runs log no dataset
    inputs or no logged model (the column then shows "-")."""
    _expand_children(page, ui, store)
    digests = set()
    for child in store["children"]:
        (train,) = [i.dataset for i in child.inputs.dataset_inputs if i.dataset.name.endswith(".train")]
        digests.add(train.digest)
        row_id = page.locator(".ag-row", has_text=child.info.run_name).first.get_attribute("row-id")
        cell = page.locator(f'.ag-row[row-id="{row_id}"] [col-id="attributes.`Dataset`"]').first
        cell.get_by_text(f"{train.name} ({train.digest})").first.wait_for()
        models = page.locator(f'.ag-row[row-id="{row_id}"] [col-id="attributes.`Models`"]').first
        assert "program" in models.inner_text()
    assert len(digests) == 1
    page.screenshot(path=str(SHOTS / "mlflow-runs-datasets-models.png"))


def test_run_page_shows_datasets_logged_model_and_registered_prompt(page, ui, store):
    """The labelled few-shot child's page lists its datasets (training slice with its digest), its logged
    model (`program`, with the accuracy measured on the test slice) and the prompt version it registered.
    Fails if any of the three is missing from the run."""
    child = next(c for c in store["children"] if "labeled_fewshot" in c.info.run_name)
    (link,) = json.loads(child.data.tags["mlflow.linkedPrompts"])
    test_slice = next(i.dataset for i in child.inputs.dataset_inputs if i.dataset.name.endswith(".test"))
    page.goto(f"{ui}/runs/{child.info.run_id}?workflowType=machine_learning")
    page.get_by_text(child.info.run_name, exact=True).first.wait_for()
    _close_assistant(page)
    page.get_by_text("Logged models (1)").first.wait_for()
    page.get_by_text(f"{test_slice.name} (#{test_slice.digest})").first.wait_for()  # the model's metric's dataset
    page.get_by_text(f"{link['name']} (v{link['version']})").first.wait_for()
    train = next(i.dataset for i in child.inputs.dataset_inputs if i.dataset.name.endswith(".train"))
    page.get_by_text(f"{train.name} ({train.digest})").first.wait_for()
    page.screenshot(path=str(SHOTS / "mlflow-run-records.png"), full_page=True)
    page.get_by_text("Logged models (1)").first.scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "mlflow-run-logged-model.png"))


def test_traces_tab_lists_the_chains_and_a_trace_shows_its_llm_and_validator_spans(page, ui, store):
    """The zero-shot child's Traces tab lists its 2 traced chains; opening one shows the chain, its LM call
    (step `classify`) and the label check's verdict. Fails if the run has no traces (traces not written, or
    not linked to the run) or a trace lacks its LLM or validator span."""
    child = next(c for c in store["children"] if "labeled_fewshot" not in c.info.run_name)
    page.goto(f"{ui}/runs/{child.info.run_id}/traces?workflowType=machine_learning")
    ids = page.get_by_text("tr-", exact=False)
    ids.first.wait_for()
    _close_assistant(page)
    assert ids.count() == 2
    ids.first.click()
    page.get_by_text("Spans", exact=True).first.wait_for()
    page.get_by_text("classify", exact=True).first.wait_for()  # the LLM span
    page.get_by_text("check_label: ", exact=False).first.wait_for()  # the validator's verdict
    page.screenshot(path=str(SHOTS / "mlflow-run-trace.png"))


def test_parent_run_shows_the_pareto_plot(page, ui, store):
    page.goto(f"{ui}/runs/{store['parent'].info.run_id}/artifacts/pareto.png?workflowType=machine_learning")
    image = page.locator('img[src^="blob:"]').first
    image.wait_for()
    _close_assistant(page)
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    assert image.evaluate("img => img.naturalWidth") > 300
    page.screenshot(path=str(SHOTS / "mlflow-pareto-artifact.png"))


def test_report_renders_offline_with_its_plot(page, store):
    requests = []
    page.on("request", lambda request: requests.append(request.url))
    page.goto(store["report"].as_uri())
    plot = page.locator("img#pareto")
    page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=plot.element_handle())
    assert plot.evaluate("img => img.naturalWidth") > 300
    assert page.locator("table.runs tbody tr").count() == 2
    assert page.get_by_text("Best program").is_visible()
    assert [u for u in requests if not u.startswith(("file:", "data:"))] == []
    page.screenshot(path=str(SHOTS / "report.png"), full_page=True)
    shutil.copy(store["report"], SHOTS / "report.html")
