"""Test set-up: every test session gets its own MLflow store, DSPy cache and chainopt cache."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

_session_dir = Path(tempfile.mkdtemp(prefix="chainopt-tests-"))
# Before dspy/mlflow are imported anywhere: both read these at import time.
os.environ["DSPY_CACHEDIR"] = str(_session_dir / "dspy-cache")
SESSION_STORE = f"sqlite:///{_session_dir / 'mlflow.db'}"
os.environ["MLFLOW_TRACKING_URI"] = SESSION_STORE
os.environ["CHAINOPT_CACHE"] = str(_session_dir / "chainopt-cache")
os.environ["HF_DATASETS_CACHE"] = str(_session_dir / "hf-datasets")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ["TQDM_DISABLE"] = "1"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # Ray's local clusters listen on 127.0.0.1 only (optimize.scale)

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def pytest_sessionfinish(session, exitstatus):
    """An assembled model (qwen2.5-coder-0.5b: half a gigabyte) is not left in /tmp after every test run."""
    shutil.rmtree(_session_dir / "chainopt-cache" / "models", ignore_errors=True)


@pytest.fixture(autouse=True)
def _tracking_uri_restored_after_each_test():
    """`mlflow.set_tracking_uri` also sets $MLFLOW_TRACKING_URI: a test that points MLflow at its own store
    or server would leave the next tests talking to it (a server stopped since). Each test ends on the
    store it started on (the session's, or its module's)."""
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    uri_before = sys.modules["mlflow"].get_tracking_uri() if "mlflow" in sys.modules else None
    yield
    mlflow = sys.modules.get("mlflow")
    if mlflow is not None and uri_before is not None and mlflow.get_tracking_uri() != uri_before:
        mlflow.set_tracking_uri(uri_before)
    if env_before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = env_before


@pytest.fixture
def ctrl_c():
    """Ctrl-C as an interactive start gives it. A suite started in the background of a non-interactive shell
    (`make test &`) inherits SIGINT ignored, and chainopt rightly leaves an ignored signal ignored; the tests
    of what Ctrl-C does need it heard."""
    import signal

    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def smollm_info():
    from optimize.llm.models import describe

    return describe("smollm2-135m")


@pytest.fixture(scope="session")
def sequential_lm():
    """One real engine for the session: the embedded model, sequential backend, no response cache."""
    from optimize.config import ModelConfig
    from optimize.llm.engine import build_lm

    return build_lm(ModelConfig(engine="sequential", cache=False, max_tokens=48, n_ctx=2048))


@pytest.fixture(scope="session")
def ray_cluster():
    """One real local Ray cluster for the session's Ray tests (2 CPUs, on 127.0.0.1; about 5-15 s to start)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh, real MLflow tracking store (SQLite + local artifacts) for one test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri
