"""Start MLflow's own web UI on the project's store, so a person can browse runs without remembering flags.

The server is a child process in its own process group: stopping it stops its workers too.
The artifact root is derived the same way `tracking.setup` derives it, so artifacts written by
`chainopt run` are the ones the UI shows.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path

from optimize.errors import ChainoptError
from optimize.tracking import tracking_uri

HOST = "127.0.0.1"


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def artifact_root(uri: str) -> str:
    """Where the store keeps artifacts: ./mlruns beside a SQLite file, or the file store itself."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlruns").resolve().as_uri()
    if uri.startswith("file:"):
        return uri
    if "://" not in uri:
        return Path(uri).resolve().as_uri()
    raise ChainoptError(f"{uri} is not a local store (sqlite:/// or a folder); if it is a tracking server, "
                        "open its address in a browser instead")


def server_command(uri: str, port: int) -> list[str]:
    root = artifact_root(uri)
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--default-artifact-root", root, "--artifacts-destination", root,
            "--host", HOST, "--port", str(port), "--workers", "1"]


def wait_until_up(process: subprocess.Popen, url: str, timeout: float, log: deque[str]) -> None:
    """Poll /health until it answers; a server that exits early says why (the tail of its log).
    On any error the caller stops the server."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any("address already in use" in line for line in list(log)):  # the server lingers before exiting
            raise ChainoptError(f"{url} is in use by another program: choose another --port, or leave it out")
        if process.poll() is not None:
            time.sleep(0.2)  # let the reader thread take the last lines
            lines = list(log)
            tail = "".join([line for line in lines if "ERROR" in line][-3:] or lines[-5:]).strip()
            raise ChainoptError(f"the MLflow server exited with code {process.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise ChainoptError(f"the MLflow server did not answer at {url} within {timeout:.0f} s")


def start_ui(uri: str | None = None, port: int | None = None, timeout: float = 90.0) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` on the store (default: $MLFLOW_TRACKING_URI or the project's) and wait for it."""
    uri = tracking_uri(uri)
    port = port or free_port()
    url = f"http://{HOST}:{port}"
    # LiteLLM (imported by the server) otherwise spends seconds retrying a price-list download offline;
    # the server's background job runners (GenAI jobs, several processes) are not needed to browse runs.
    env = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ,
           "MLFLOW_TRACKING_URI": uri}
    process = subprocess.Popen(server_command(uri, port), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True, errors="replace", start_new_session=True, env=env)
    log: deque[str] = deque(maxlen=50)
    threading.Thread(target=_keep_tail, args=(process, log), daemon=True).start()
    try:
        wait_until_up(process, url, timeout, log)
    except BaseException:  # an error, or Ctrl-C/SIGTERM while it starts: never leave the server behind
        stop_ui(process)
        raise
    return process, url


def _keep_tail(process: subprocess.Popen, log: deque[str]) -> None:
    """Read the server's log all along (a full pipe would freeze it), keeping the last lines for errors."""
    for line in process.stderr or ():
        log.append(line)


def stop_ui(process: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop the server and its workers (the whole process group)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
