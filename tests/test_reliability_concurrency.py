"""Two `chainopt run` processes on one fresh local SQLite store at once: no corruption, no lost runs."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from test_reliability import ROOT, finish, start

pytestmark = pytest.mark.model


def test_two_runs_at_once_on_one_sqlite_store(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    names = ("concurrent-none", "concurrent-fewshot")
    procs = {name: start(ROOT / f"tests/data/{name}.toml", tmp_path, uri) for name in names}  # both migrate the new store
    stages = {name: finish(proc, uri, name) for name, proc in procs.items()}
    for name, stage in stages.items():
        assert stage.returncode == 0, stage.stderr
        assert "Traceback" not in stage.stderr
        assert [r.info.status for r in stage.children] == ["FINISHED"]
        assert [r.info.status for r in stage.parents] == ["FINISHED"]
        child = stage.children[0]
        assert child.data.metrics["n"] == 2 and child.data.metrics["attempted"] == 2
        assert child.data.tags["mlflow.parentRunId"] == stage.parents[0].info.run_id
    with sqlite3.connect(Path(uri.removeprefix("sqlite:///"))) as db:
        assert db.execute("pragma integrity_check").fetchone() == ("ok",)
        assert db.execute("select count(*) from runs").fetchone() == (4,)
