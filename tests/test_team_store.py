"""The team store for real: PostgreSQL for the runs, an S3 server for the artifacts, `mlflow server` in front.

One store per module, all on 127.0.0.1, nothing leaves the machine:
  - a PostgreSQL cluster of its own (Debian's `postgresql`; `initdb`/`pg_ctl` refuse root, so as root they
    run as the `postgres` user) in a temporary folder, on a free port, trust authentication on loopback;
  - `moto` in server mode as the S3 endpoint, with dummy credentials and one bucket;
  - `mlflow server --backend-store-uri postgresql://... --artifacts-destination s3://... --serve-artifacts`.
The chainopt processes get only MLFLOW_TRACKING_URI (no storage credentials): artifacts go through the server.
Every process started here is stopped at the end of the module, and checked gone.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from test_reliability import CHAINOPT, ROOT
from test_team_mode import free_port

BUCKET = "chainopt-team"
PREFIX = "mlflow"
SHARED = "team-shared"  # the MLflow experiment both concurrent experiment files record into
AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def pg_bin() -> Path:
    """The folder of PostgreSQL's server programs: on PATH, else Debian's /usr/lib/postgresql/<ver>/bin."""
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if versions:
        return Path(versions[-1]).parent
    pytest.fail("PostgreSQL is not installed (no pg_ctl on PATH nor in /usr/lib/postgresql/*/bin): install "
                "Debian's `postgresql` package (scripts/install.sh does so when run as root)")


def require(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"the team-store tests need the Python package {package!r}: "
                    f"pip install -c requirements.lock -e '.[team]' (scripts/install.sh does)")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any tracking URI or cloud credentials of the caller, plus `extra`."""
    drop = ("MLFLOW_", "AWS_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "1", **extra}


def wait_for(url: str, proc: subprocess.Popen, log: Path, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop_group(proc)
                pytest.fail(f"{what} did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)


def stop_group(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the process group `proc` leads (a server and its workers), SIGKILL what is left, then check
    that nothing of the group survives."""
    pgid = proc.pid  # started with start_new_session=True: its own group
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
        deadline = time.monotonic() + timeout  # the leader is gone; give its workers the same time
        while time.monotonic() < deadline and group_alive(pgid):
            time.sleep(0.1)
        if not group_alive(pgid):
            break
    proc.wait()
    assert not group_alive(pgid), f"processes of group {pgid} outlived their server"


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Store:
    url: str  # the mlflow server, what chainopt is pointed at
    pg_dsn: str  # the PostgreSQL database behind it
    s3_endpoint: str

    def s3(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.s3_endpoint, **{
            "aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
            "region_name": AWS["AWS_DEFAULT_REGION"]})

    def keys(self) -> list[str]:
        pages = self.s3().get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        return [obj["Key"] for page in pages for obj in page.get("Contents", [])]

    def sql(self, query: str, *args) -> list[tuple]:
        import psycopg

        with psycopg.connect(self.pg_dsn) as db:
            return db.execute(query, args).fetchall()

    def runs(self, experiment: str) -> list[Run]:
        client = MlflowClient(tracking_uri=self.url)
        exp = client.get_experiment_by_name(experiment)
        return client.search_runs([exp.experiment_id], max_results=1000) if exp else []


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL cluster of our own on 127.0.0.1; yields its DSN (database `mlflow`, user `postgres`)."""
    bin_dir = pg_bin()
    require("psycopg", "psycopg[binary]")  # what SQLAlchemy 2.1 (MLflow's) opens postgresql:// URIs with
    root = os.geteuid() == 0
    if root:
        try:
            import pwd

            owner = pwd.getpwnam("postgres")
        except KeyError:
            pytest.fail("running as root, but there is no `postgres` user to run initdb/pg_ctl as "
                        "(Debian's `postgresql` package creates it)")
    as_owner = ["runuser", "-u", "postgres", "--"] if root else []
    # Not under pytest's tmp folder: that is private to root (0700) and the server runs as `postgres`.
    folder = Path(tempfile.mkdtemp(prefix="chainopt-pg-"))
    data, log = folder / "data", folder / "server.log"
    if root:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
    port = free_port()

    def pg(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        done = subprocess.run([*as_owner, *args], capture_output=True, text=True, timeout=120)
        if check and done.returncode != 0:
            text = log.read_text()[-3000:] if log.exists() else ""
            pytest.fail(f"{Path(args[0]).name} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}\n{text}")
        return done

    postmaster = None
    try:
        pg(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8")
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "start",
           "-o", f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off")
        postmaster = int((data / "postmaster.pid").read_text().split()[0])
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                             autocommit=True) as db:
            db.execute("CREATE DATABASE mlflow")
        yield f"postgresql://postgres@127.0.0.1:{port}/mlflow"
    finally:
        if (data / "postmaster.pid").exists():
            pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "-t", "60", "stop", check=False)
        deadline = time.monotonic() + 30
        while postmaster and pid_alive(postmaster) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = bool(postmaster) and pid_alive(postmaster)
        shutil.rmtree(folder, ignore_errors=True)
        assert not alive, f"PostgreSQL (pid {postmaster}) did not stop"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on 127.0.0.1 with an empty bucket; yields its endpoint URL."""
    require("moto", "moto[s3]")
    require("boto3", "boto3")
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=clean_env(**AWS), start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/", proc, log, "moto's S3 server", timeout=60)
        import boto3

        boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                     aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
        yield url
    finally:
        stop_group(proc)


@pytest.fixture(scope="module")
def store(postgres, s3, tmp_path_factory) -> Store:
    """`mlflow server` on the PostgreSQL database and the S3 bucket, proxying artifacts."""
    port = free_port()
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    env = clean_env(**AWS, MLFLOW_S3_ENDPOINT_URL=s3)
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", postgres, "--artifacts-destination", f"s3://{BUCKET}/{PREFIX}",
             "--serve-artifacts", "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{url}/health", proc, log, "mlflow server", timeout=180)
        yield Store(url, postgres, s3)
    finally:
        stop_group(proc, timeout=10)  # its job consumers (huey) outlive a SIGTERM: no need to wait 30 s


@pytest.fixture
def chainopt():
    """Starts `chainopt run CONFIG` as a team member would: the server's URL and no storage credentials.
    Whatever is still running when the test ends (a failed assertion, a timeout) is killed and reaped."""
    started: list[subprocess.Popen] = []

    def run(config: Path, cwd: Path, url: str) -> subprocess.Popen:
        # This checkout's code, even where the installed `chainopt` is an editable install of another one.
        path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
        proc = subprocess.Popen([CHAINOPT, "run", str(config)], cwd=cwd, text=True,
                                env=clean_env(MLFLOW_TRACKING_URI=url, PYTHONPATH=path),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started.append(proc)
        return proc

    yield run
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def shared(name: str, folder: Path) -> Path:
    """tests/data/<name>.toml recording into the MLflow experiment SHARED, as a team's files might."""
    path = folder / f"{name}.toml"
    path.write_text((ROOT / f"tests/data/{name}.toml").read_text() + f'\n[tracking]\nexperiment = "{SHARED}"\n')
    return path


def children(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.data.tags.get("chainopt.kind") == "child"]


def parents(runs: list[Run]) -> list[Run]:
    return [r for r in runs if r.data.tags.get("chainopt.kind") == "parent"]


def test_store_is_postgres_and_s3(store, tmp_path):
    """Without the model: a run logged through the server lands in PostgreSQL, its artifact in the bucket."""
    client = MlflowClient(tracking_uri=store.url)
    experiment_id = client.create_experiment("smoke")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "x", 1.5)
    (tmp_path / "hello.txt").write_text("hello")
    client.log_artifact(run.info.run_id, str(tmp_path / "hello.txt"))
    client.set_terminated(run.info.run_id)
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied: clients need no S3 credentials
    assert store.sql("select status from runs where run_uuid = %s", run.info.run_id) == [("FINISHED",)]
    assert store.sql("select value from metrics where run_uuid = %s and key = 'x'", run.info.run_id) == [(1.5,)]
    key = f"{PREFIX}/{experiment_id}/{run.info.run_id}/artifacts/hello.txt"
    assert key in store.keys()
    assert store.s3().get_object(Bucket=BUCKET, Key=key)["Body"].read() == b"hello"


def test_experiment_created_meanwhile_by_another_process(store, monkeypatch):
    """Two runs starting together both look the experiment up, find none and create it: on a server store
    the second create fails (RESOURCE_ALREADY_EXISTS, PostgreSQL's unique key). It takes the existing one."""
    from optimize import tracking

    before = mlflow.get_tracking_uri()
    existing = MlflowClient(tracking_uri=store.url).create_experiment("created-meanwhile")
    looked = []
    real = MlflowClient.get_experiment_by_name

    def first_look_misses(self, name):  # what the second process saw, just before the first one created it
        looked.append(name)
        return None if len(looked) == 1 else real(self, name)

    monkeypatch.setattr(MlflowClient, "get_experiment_by_name", first_look_misses)
    try:
        assert tracking.setup("created-meanwhile", store.url) == existing
    finally:
        mlflow.set_tracking_uri(before)
    assert looked == ["created-meanwhile", "created-meanwhile"]


@pytest.mark.model
def test_two_runs_at_once_on_the_team_store(store, chainopt, tmp_path):
    """Two experiment files that share one MLflow experiment, started together on a fresh store."""
    names = ("concurrent-none", "concurrent-fewshot")
    procs = {name: chainopt(shared(name, tmp_path), tmp_path, store.url) for name in names}
    done = {name: (proc.communicate(timeout=300), proc.returncode) for name, proc in procs.items()}
    for name, ((_, err), code) in done.items():
        assert code == 0, f"{name}:\n{err}"
        assert "Traceback" not in err
    runs = store.runs(SHARED)  # read back by a third client
    assert len(parents(runs)) == 2 and len(children(runs)) == 2  # nothing recorded twice
    assert {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(r.info.run_name for r in parents(runs)) == sorted(names)
    by_parent = {r.data.tags["mlflow.parentRunId"]: r for r in children(runs)}
    assert set(by_parent) == {r.info.run_id for r in parents(runs)}  # one child under each parent
    for child in children(runs):
        assert child.data.metrics["n"] == 2 and child.data.metrics["attempted"] == 2
    # The records are PostgreSQL's rows, the artifacts the bucket's objects.
    ids = {r.info.run_id for r in runs}
    rows = store.sql("select run_uuid, status from runs where experiment_id = %s", int(runs[0].info.experiment_id))
    assert dict(rows) == {run_id: "FINISHED" for run_id in ids}
    keys = store.keys()
    for child in children(runs):
        assert child.info.artifact_uri.startswith("mlflow-artifacts:")
        for name in ("program.json", "predictions.json"):
            assert f"{PREFIX}/{child.info.experiment_id}/{child.info.run_id}/artifacts/{name}" in keys
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()


@pytest.mark.model
def test_kill_and_resume_on_the_team_store(store, chainopt, tmp_path):
    """SIGKILL while the 2nd of 3 combinations runs, then `chainopt run` again: it resumes from the store."""
    config, experiment = ROOT / "tests/data/tiny3.toml", "tiny3"
    proc = chainopt(config, tmp_path, store.url)
    deadline = time.monotonic() + 240
    while True:
        assert proc.poll() is None, f"chainopt ended early ({proc.returncode}):\n{proc.communicate()[1]}"
        status = [r.info.status for r in children(store.runs(experiment))]
        if status.count("FINISHED") == 1 and "RUNNING" in status:
            break
        assert time.monotonic() < deadline, f"no child finished/running in time: {status}"
        time.sleep(0.2)
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed = children(store.runs(experiment))
    first = {r.data.tags["chainopt.config_hash"]: r.info.run_id for r in killed if r.info.status == "FINISHED"}
    assert len(first) == 1 and [r.info.status for r in killed].count("RUNNING") == 1

    again = chainopt(config, tmp_path, store.url)
    _, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert err.count("finished earlier, reused") == 1
    runs = store.runs(experiment)
    finished = {r.data.tags["chainopt.config_hash"]: r.info.run_id for r in children(runs)
                if r.info.status == "FINISHED"}
    assert len(finished) == 3 and first.items() <= finished.items()  # one per combination, the first kept
    assert [r.info.status for r in children(runs) if r.info.run_id not in finished.values()] == ["KILLED"]
    assert [r.info.status for r in parents(runs)] == ["FINISHED"]  # one parent, resumed
    assert {r.data.tags["mlflow.parentRunId"] for r in children(runs)} == {parents(runs)[0].info.run_id}
    keys = store.keys()
    for run_id in finished.values():
        assert f"{PREFIX}/{runs[0].info.experiment_id}/{run_id}/artifacts/program.json" in keys
