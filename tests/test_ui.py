"""`chainopt ui`: MLflow's server on the project's store, found through $MLFLOW_TRACKING_URI, stopped by Ctrl-C."""

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from optimize.errors import ChainoptError
from optimize.ui import artifact_root, free_port, server_command


def _started(proc: subprocess.Popen) -> dict:
    """What `chainopt ui --json` printed once its server is up (fails with its stderr if it ended early)."""
    lines: list[str] = []
    while not lines or lines[-1] != "}\n":
        line = proc.stdout.readline()
        assert line, f"chainopt ui ended early: {proc.stderr.read()}"
        lines.append(line)
    return json.loads("".join(lines))


@pytest.mark.parametrize("uri, root", [
    ("sqlite:////data/x/mlflow.db", "file:///data/x/mlruns"),
    ("file:///data/mlruns", "file:///data/mlruns"),
    ("/data/store", "file:///data/store"),
])
def test_artifact_root_matches_the_tracking_store(uri, root):
    assert artifact_root(uri) == root


def test_a_remote_store_is_not_served_again():
    with pytest.raises(ChainoptError, match="open its address in a browser"):
        artifact_root("http://mlflow.example:5000")


def test_server_command_binds_loopback_with_matching_artifacts():
    cmd = server_command("sqlite:////data/x/mlflow.db", 5123)
    opts = dict(zip(cmd[4::2], cmd[5::2]))
    assert cmd[1:4] == ["-m", "mlflow", "server"]
    assert opts == {"--backend-store-uri": "sqlite:////data/x/mlflow.db",
                    "--default-artifact-root": "file:///data/x/mlruns",
                    "--artifacts-destination": "file:///data/x/mlruns",
                    "--host": "127.0.0.1", "--port": "5123", "--workers": "1"}
    assert 1024 <= free_port() < 65536


def _get(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def test_cli_serves_the_store_named_by_the_environment_until_interrupted():
    uri = os.environ["MLFLOW_TRACKING_URI"]  # the test session's store (tests/conftest.py)
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("ui-test")
    run = client.create_run(experiment_id, run_name="listed-run")
    client.log_metric(run.info.run_id, "accuracy", 0.5)
    client.set_terminated(run.info.run_id)

    # A shell's background jobs ignore SIGINT and Python keeps an inherited SIG_IGN: restore the default,
    # as in the terminal where a person presses Ctrl-C.
    proc = subprocess.Popen([sys.executable, "-m", "optimize", "ui", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        info = _started(proc)
        assert info["tracking_uri"] == uri and info["url"].startswith("http://127.0.0.1:")
        found = _get(f"{info['url']}/api/2.0/mlflow/experiments/get-by-name?experiment_name=ui-test")
        assert found["experiment"]["experiment_id"] == experiment_id
        runs = _get(f"{info['url']}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})
        assert [r["info"]["run_name"] for r in runs["runs"]] == ["listed-run"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0  # the server gets SIGTERM, then SIGKILL after 10 s
    finally:
        if proc.poll() is None:
            proc.kill()
    with pytest.raises((urllib.error.URLError, OSError)):
        _get(f"{info['url']}/health")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_terminated_ui_stops_the_server_it_started(sig):
    """`kill` (SIGTERM) or a closed terminal (SIGHUP) stops `chainopt ui` as Ctrl-C does. Fails if the MLflow
    server, which runs in its own session out of reach of our signals, outlives the command."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "optimize", "ui", "--port", str(port), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(sig, signal.SIG_DFL))  # as in a terminal, not nohup
    server = None
    try:
        info = _started(proc)
        server = info["pid"]
        assert info["url"] == f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{info['url']}/health", timeout=10) as response:
            assert response.status == 200
        proc.send_signal(sig)
        code = proc.wait(60)
        assert not _alive(server), "the MLflow server outlived chainopt ui"
        assert code == 0
        with pytest.raises((urllib.error.URLError, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        if server is not None and _alive(server):
            os.killpg(server, signal.SIGKILL)
