"""Kill `chainopt run` mid-experiment (SIGKILL, SIGTERM, Ctrl-C) and run it again: nothing is lost or redone.

One scenario on one real SQLite store, with three combinations (tests/data/tiny3.toml):
  1. SIGKILL once the first child finished and the second is running;
  2. rerun, SIGTERM once the second finished and the third is running;
  3. rerun, SIGINT while the third is running again;
  4. rerun to the end.
Each stage is checked by its own test below; the scenario runs once per module.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from optimize.tracking import store_lock

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parents[1]
CHAINOPT = str(Path(sys.executable).parent / "chainopt")
CONFIG = ROOT / "tests/data/tiny3.toml"


def start(config: Path, cwd: Path, uri: str) -> subprocess.Popen:
    """`chainopt run config` as a user would start it, with Ctrl-C delivered as in a terminal."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    # A shell's background jobs ignore SIGINT and Python keeps an inherited SIG_IGN: restore the default.
    return subprocess.Popen([CHAINOPT, "run", str(config)], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def runs(uri: str, experiment: str) -> list[Run]:
    """The experiment's runs; the store is opened under the lock chainopt takes, never mid-migration."""
    path = Path(uri.removeprefix("sqlite:///"))
    if not path.exists():
        return []
    with store_lock(uri):
        mlflow.set_tracking_uri(uri)
        client = MlflowClient()
        exp = client.get_experiment_by_name(experiment)
        return client.search_runs([exp.experiment_id], max_results=100) if exp else []


def children(uri: str, experiment: str) -> list[Run]:
    return [r for r in runs(uri, experiment) if r.data.tags.get("chainopt.kind") == "child"]


def wait_until(proc: subprocess.Popen, uri: str, experiment: str, finished: int, timeout: float = 240) -> None:
    """Poll the store until `finished` children are FINISHED and another child is RUNNING."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"chainopt ended early ({proc.returncode}):\n{out}\n{err}")
        status = [r.info.status for r in children(uri, experiment)]
        if status.count("FINISHED") >= finished and "RUNNING" in status:
            return
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"no child finished/running in {timeout}s")


@dataclass
class Stage:
    returncode: int
    stdout: str
    stderr: str
    children: list[Run] = field(default_factory=list)
    parents: list[Run] = field(default_factory=list)


def finish(proc: subprocess.Popen, uri: str, experiment: str, timeout: float = 240) -> Stage:
    out, err = proc.communicate(timeout=timeout)
    all_runs = runs(uri, experiment)
    return Stage(proc.returncode, out, err,
                 [r for r in all_runs if r.data.tags.get("chainopt.kind") == "child"],
                 [r for r in all_runs if r.data.tags.get("chainopt.kind") == "parent"])


def interrupt(cwd: Path, uri: str, finished: int, sig: signal.Signals) -> Stage:
    proc = start(CONFIG, cwd, uri)
    wait_until(proc, uri, "tiny3", finished)
    proc.send_signal(sig)
    return finish(proc, uri, "tiny3")


@pytest.fixture(scope="module")
def scenario(tmp_path_factory) -> dict[str, Stage]:
    folder = tmp_path_factory.mktemp("resume")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    stages = {"kill": interrupt(folder, uri, 1, signal.SIGKILL),
              "term": interrupt(folder, uri, 2, signal.SIGTERM),
              "int": interrupt(folder, uri, 2, signal.SIGINT)}
    stages["done"] = finish(start(CONFIG, folder, uri), uri, "tiny3")
    return stages


def by_status(stage: Stage, status: str) -> dict[str, str]:
    """config hash -> run id of the children with `status`."""
    return {r.data.tags["chainopt.config_hash"]: r.info.run_id for r in stage.children if r.info.status == status}


def test_sigkill_leaves_finished_child_and_a_running_leftover(scenario):
    kill = scenario["kill"]
    assert kill.returncode == -signal.SIGKILL
    assert len(by_status(kill, "FINISHED")) == 1
    assert [r.info.status for r in kill.children].count("RUNNING") == 1  # nobody could say otherwise


def test_sigterm_stops_cleanly_with_130_and_reuses_finished_work(scenario):
    kill, term = scenario["kill"], scenario["term"]
    assert term.returncode == 130, term.stderr
    assert "interrupted; finished runs are kept" in term.stderr and "Traceback" not in term.stderr
    assert term.stderr.count("finished earlier, reused") == 1
    assert by_status(kill, "FINISHED").items() <= by_status(term, "FINISHED").items()  # same run ids
    assert "RUNNING" not in [r.info.status for r in term.children]
    assert [r.info.status for r in term.children].count("KILLED") + \
        [r.info.status for r in term.children].count("FAILED") == 2  # the SIGKILLed and the SIGTERMed child


def test_ctrl_c_stops_cleanly_with_130(scenario):
    term, ctrl_c = scenario["term"], scenario["int"]
    assert ctrl_c.returncode == 130, ctrl_c.stderr
    assert "interrupted; finished runs are kept" in ctrl_c.stderr and "Traceback" not in ctrl_c.stderr
    assert ctrl_c.stderr.count("finished earlier, reused") == 2
    assert by_status(term, "FINISHED") == by_status(ctrl_c, "FINISHED")
    assert "RUNNING" not in [r.info.status for r in ctrl_c.children]


def test_rerun_completes_without_recomputing_or_duplicating(scenario):
    kill, term, done = scenario["kill"], scenario["term"], scenario["done"]
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("finished earlier, reused") == 2
    finished = [r for r in done.children if r.info.status == "FINISHED"]
    hashes = [r.data.tags["chainopt.config_hash"] for r in finished]
    assert len(hashes) == len(set(hashes)) == 3  # one FINISHED child per combination, no duplicates
    assert by_status(term, "FINISHED").items() <= by_status(done, "FINISHED").items()
    interrupted = [r for r in done.children if r.info.status != "FINISHED"]
    assert len(interrupted) == 3 and {r.info.status for r in interrupted} <= {"KILLED", "FAILED"}
    assert len(done.parents) == 1 and done.parents[0].info.status == "FINISHED"  # one parent, resumed each time
    parent = done.parents[0].info.run_id
    assert all(r.data.tags["mlflow.parentRunId"] == parent for r in done.children)
    assert by_status(kill, "FINISHED").keys() <= by_status(done, "FINISHED").keys()
