"""The Ray backend (optimize/scale.py) on a real local cluster with the real embedded model: the same answers
and metrics as the local backend, a killed worker's shard redone and its trial recorded once, a worker that
cannot load its model named, a two-node cluster used whole, a ray:// address through Ray Client, and bad
settings refused in one line."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from optimize import cli, scale, tracking
from optimize.config import ExecutionConfig, Experiment, parse_experiment
from optimize.data import load_splits
from optimize.errors import ClusterError, ConfigError
from optimize.experiment import experiment_hash, run_experiment
from ray_driver import answers

ROOT = Path(__file__).resolve().parents[1]
# Four trials (two programs, zero-shot and labelled 2-shot) on three Banking77 examples: three shards on two
# workers are uneven.
# The response cache is off, so each backend really asks the model.
EXPERIMENT = {"models": [{"spec": "smollm2-135m", "max_tokens": 32, "cache": False}],
              "data": {"dataset": "banking77", "train": 2, "test": 3, "seed": 29},
              "programs": [{"name": "intent.predict"}, {"name": "intent.retrieve"}],
              "optimizers": [{"name": "none"}, {"name": "labeled_fewshot", "settings": {"k": 2}}],
              "eval": {"threads": 2}, "budget": {"max_retries": 0}}


def experiment(name: str, **execution) -> Experiment:
    return parse_experiment({**EXPERIMENT, "name": name, "execution": execution})


@pytest.fixture(scope="module")
def local_run():
    """The sweep on the local backend: what the Ray runs must reproduce."""
    return run_experiment(experiment("ray-local"))


def test_the_backend_is_not_part_of_the_experiment_identity():
    # A sweep begun locally resumes on Ray (and back): a hash that took [execution] in would redo it all.
    assert experiment_hash(experiment("x")) == experiment_hash(experiment("x", backend="ray", address="auto"))


def test_an_unknown_backend_is_refused_naming_the_choices():
    with pytest.raises(ConfigError, match=r"execution\.backend = 'dask'.*'local' or 'ray'"):
        experiment("x", backend="dask")


def test_without_ray_installed_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as on the base install
    with pytest.raises(ClusterError, match=r'needs Ray: pip install -e "\.\[ray\]"'):
        with scale.cluster(ExecutionConfig(backend="ray")):
            pass


def test_chainopt_run_ray_with_nothing_at_the_address_names_it_at_once(capsys):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    start = time.perf_counter()
    code = cli.main(["run", str(ROOT / "tests/data/tiny3.toml"), "--ray", f"127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"chainopt: error: cannot reach the Ray cluster at 127.0.0.1:{port}: ")
    assert time.perf_counter() - start < 30  # Ray alone would wait minutes for a GCS that is not there


@pytest.mark.model
def test_ray_gives_the_local_answers_and_metrics(ray_cluster, local_run):
    lines: list[str] = []
    result = run_experiment(experiment("ray-same", backend="ray"), progress=lines.append)
    assert len(result.trials) == 4 and answers(result) == answers(local_run)
    assert [r.index for r in result.trials[0].records] == [0, 1, 2]
    assert any(line.startswith("ray: 2 workers (1 CPU each) on 1 node(s): 127.0.0.1") for line in lines), lines
    assert any("in 2 shards on 2 workers: 3/3" in line and "ex/s" in line for line in lines), lines



@pytest.mark.model
def test_a_knn_fewshot_trial_is_sharded_and_gives_the_local_answers(ray_cluster):
    # KNN demos are picked per input from the training pool at call time, which the JSON state does not hold:
    # each shard's worker rebuilds them from the pool, so the trial shards and answers as it does locally.
    exp = {**EXPERIMENT, "data": {**EXPERIMENT["data"], "train": 20}, "programs": [{"name": "intent.predict"}],
           "optimizers": [{"name": "knn_fewshot", "settings": {"k": 2}}]}
    local = run_experiment(parse_experiment({**exp, "name": "knn-local"}))
    lines: list[str] = []
    on_ray = run_experiment(parse_experiment({**exp, "name": "knn-ray", "execution": {"backend": "ray"}}),
                            progress=lines.append)
    assert answers(on_ray) == answers(local)
    assert any("in 2 shards on 2 workers: 3/3" in line for line in lines), lines

def _ray_processes(title: bytes) -> list[int]:
    """Pids of the processes whose title starts with `title`: Ray titles a process that holds a chainopt
    worker (actor) `ray::Worker`, and `ray::Worker.score` while it scores a shard."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and (proc / "cmdline").read_bytes().startswith(title):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.model
def test_a_worker_killed_mid_shard_is_redone_and_its_trial_recorded_once(ray_cluster, local_run):
    killed: list[int] = []
    done = threading.Event()

    def kill_the_first_scoring_worker() -> None:
        while not done.is_set() and not killed:
            for pid in _ray_processes(b"ray::Worker.score")[:1]:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            time.sleep(0.02)

    killer = threading.Thread(target=kill_the_first_scoring_worker)
    killer.start()
    try:
        result = run_experiment(experiment("ray-killed", backend="ray"))
    finally:
        done.set()
        killer.join()
    assert killed, "no worker was caught scoring"
    assert answers(result) == answers(local_run)
    children = tracking.children(result.experiment_id, result.parent_run_id)
    assert sorted(c.info.run_name for c in children) == sorted(t.trial.run_name for t in result.trials)
    assert {c.info.status for c in children} == {"FINISHED"}


@pytest.mark.model
@pytest.mark.parametrize("case", ["cut short", "another file"])
def test_a_worker_that_cannot_load_its_model_names_its_node_and_the_file(ray_cluster, tmp_path, smollm_info,
                                                                         monkeypatch, case):
    # What the driver's machine holds (sweep_models: each model's sha256 there) stands in for another machine's
    # file: the workers find a GGUF cut short where the driver has a whole one, or a file with another sha256.
    if case == "cut short":
        spec = tmp_path / "cut-short.gguf"
        whole = Path(smollm_info.path).read_bytes()
        spec.write_bytes(whole[: len(whole) // 2])
        sha256, expected = smollm_info.sha256, f"corrupt or truncated GGUF file {spec}"
    else:
        spec, sha256 = "smollm2-135m", "f" * 64
        expected = f"{smollm_info.path} has sha256 {smollm_info.sha256[:12]}…, the driver's ffffffffffff…"
    exp = parse_experiment({**EXPERIMENT, "name": "ray-broken", "models": [{"spec": str(spec)}]})
    trial = exp.combinations()[0]
    monkeypatch.setattr(scale, "sweep_models", lambda trials: {trial.model: sha256})
    with pytest.raises(ClusterError) as error:
        next(scale.run_trials(ExecutionConfig(backend="ray"), [(1, trial, load_splits(trial.data))], 1))
    message = str(error.value)
    node = ray_cluster.nodes()[0]
    assert "\n" not in message
    assert message.startswith(f"the Ray worker on 127.0.0.1 (node {node['NodeID'][:12]}) cannot load model {spec}: ")
    assert expected in message


def _driver(exp: dict) -> dict:
    """The sweep `exp` run by tests/ray_driver.py in a process of its own: what it printed."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    done = subprocess.run([sys.executable, str(ROOT / "tests/ray_driver.py"), json.dumps(exp)], env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.model
def test_a_two_node_cluster_runs_a_worker_on_each_node_with_the_same_results(local_run, tmp_path):
    # A Cluster and this session's ray.init cannot share a process: the sweep runs in a process of its own.
    out = _driver({**EXPERIMENT, "name": "ray-two-nodes", "execution": {"backend": "ray"},
                   "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    assert len(out["nodes"]) == 2
    workers = next(line for line in out["lines"] if line.startswith("ray: "))
    assert workers.startswith("ray: 2 workers (1 CPU each) on 2 node(s)")
    assert all(node[:12] in workers for node in out["nodes"])  # one worker on each node
    assert out["answers"] == json.loads(json.dumps(answers(local_run)))




@pytest.mark.model
def test_a_ray_client_address_runs_the_sweep_with_the_local_answers(ray_cluster, local_run, tmp_path):
    # A ray:// address goes through Ray Client (the `client` part of the ray extra): a client server on
    # 127.0.0.1 in front of this session's cluster, and a driver elsewhere that knows only that address.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path / "client-server.log"
    with log.open("wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "ray.util.client.server", "--mode", "legacy",
                                   "--address", ray_cluster.get_runtime_context().gcs_address,
                                   "--host", "127.0.0.1", "--port", str(port)], stdout=out, stderr=out)
    try:
        result = _driver({**EXPERIMENT, "name": "ray-client",
                          "execution": {"backend": "ray", "address": f"ray://127.0.0.1:{port}"},
                          "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}})
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "New logs connection established" in log.read_text(errors="replace")  # it came through the server
    assert any(line.startswith("ray: 2 workers (1 CPU each) on 1 node(s)") for line in result["lines"])
    assert result["answers"] == json.loads(json.dumps(answers(local_run)))

# The sweep above on more examples, so that the driver can be caught between two recorded trials.
RESUMED = """
name = "ray-resume"
seeds = [0]
programs = [{ name = "intent.predict" }, { name = "intent.retrieve" }]
optimizers = [{ name = "none" }, { name = "labeled_fewshot", settings = { k = 2 } }]
[model]
spec = "smollm2-135m"
max_tokens = 32
cache = false
[data]
dataset = "banking77"
train = 2
test = 40
seed = 29
[eval]
threads = 2
[budget]
max_retries = 0
[execution]
backend = "ray"
address = "auto"
"""


@pytest.mark.model
def test_a_driver_killed_mid_sweep_resumes_from_the_store(ray_cluster, tmp_path):
    # The driver alone writes the store: SIGKILLed once a trial is recorded, `chainopt run` again on the same
    # cluster reuses what was recorded and records each other trial once; the dead driver's workers go.
    from test_reliability import children, finish, start

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tmp_path / "ray-resume.toml"
    config.write_text(RESUMED, encoding="utf-8")
    driver = start(config, tmp_path, uri)
    deadline = time.monotonic() + 300
    while not any(r.info.status == "FINISHED" for r in children(uri, "ray-resume")):
        assert driver.poll() is None and time.monotonic() < deadline, "the driver recorded no trial"
        time.sleep(0.1)
    assert _ray_processes(b"ray::Worker"), "the driver's workers are not where this test looks for them"
    driver.kill()
    driver.wait()
    recorded = {r.data.tags["chainopt.config_hash"]: r.info.run_id
                for r in children(uri, "ray-resume") if r.info.status == "FINISHED"}
    assert 1 <= len(recorded) < 4, "the driver was not caught mid-sweep"
    deadline = time.monotonic() + 60
    while _ray_processes(b"ray::Worker") and time.monotonic() < deadline:  # Ray ends a dead driver's actors
        time.sleep(0.5)
    assert not _ray_processes(b"ray::Worker"), "the killed driver's workers outlived it"

    done = finish(start(config, tmp_path, uri), uri, "ray-resume", timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("finished earlier, reused") == len(recorded)
    finished = {r.data.tags["chainopt.config_hash"]: r.info.run_id for r in done.children
                if r.info.status == "FINISHED"}
    assert len(finished) == 4 and len([r for r in done.children if r.info.status == "FINISHED"]) == 4
    assert recorded.items() <= finished.items()  # the same runs, not recomputed
    assert "RUNNING" not in {r.info.status for r in done.children}
    assert len(done.parents) == 1
