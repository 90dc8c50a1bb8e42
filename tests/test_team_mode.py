"""Team mode: chainopt against a real `mlflow server` over HTTP, artifacts proxied by the server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from optimize.cli import main

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(tmp_path, monkeypatch):
    """`mlflow server` on 127.0.0.1 with a SQLite backend and a served artifact store, both in tmp."""
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "artifacts"), "--serve-artifacts", "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/health", timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"mlflow server did not start:\n{(tmp_path / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    yield url, tmp_path / "artifacts"
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a busy machine: gunicorn's graceful stop can outlast the wait
        proc.kill()
        proc.wait()
    log.close()


@pytest.mark.model
def test_run_through_an_mlflow_server(server, tmp_path, monkeypatch, capsys):
    url, artifacts = server
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(ROOT / "tests/data/concurrent-none.toml"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tracking_uri"] == url
    mlflow.set_tracking_uri(url)
    client = MlflowClient()
    run = client.get_run(result["runs"][0]["run_id"])
    assert run.info.status == "FINISHED" and run.data.metrics["n"] == 2
    assert run.data.params["model.spec"] == "smollm2-135m"
    assert run.data.tags["mlflow.parentRunId"] == result["parent_run_id"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server, not a local path
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"program.json", "predictions.json"} <= names
    local = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="program.json"))
    assert json.loads(local.read_text())
    assert any(artifacts.rglob("predictions.json"))  # the bytes landed in the server's artifact store
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
