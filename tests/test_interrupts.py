"""SIGTERM stops a parallel DSPy evaluation as Ctrl-C does: the examples not yet started are cancelled,
so the process exits at once instead of after its threads have worked through every remaining example."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from optimize.interrupts import Interrupted, held, stop_on

SCRIPT = textwrap.dedent("""
    import signal, time
    from dspy.utils.parallelizer import ParallelExecutor
    from optimize.interrupts import Interrupted, stop_on

    started = []

    def slow(item):
        started.append(item)
        time.sleep(0.2)
        return item

    with stop_on(signal.SIGTERM):
        try:
            print("ready", flush=True)
            ParallelExecutor(num_threads=2, disable_progress_bar=True).execute(slow, list(range(200)))
        except Interrupted:
            print("interrupted", flush=True)
    print("exiting", flush=True)
    import atexit
    atexit.register(lambda: print(f"started {len(started)}", flush=True))  # after the thread pool's join
""")


def test_sigterm_cancels_the_examples_not_yet_started():
    """Without the cancellation, the 200 examples of 0.2 s on 2 threads would all run (20 s) before exit."""
    child = subprocess.Popen([sys.executable, "-c", SCRIPT], stdout=subprocess.PIPE, text=True,
                             cwd=Path(__file__).resolve().parents[1])
    assert child.stdout.readline().strip() == "ready"
    time.sleep(1.0)
    sent = time.monotonic()
    child.send_signal(signal.SIGTERM)
    out, _ = child.communicate(timeout=60)
    waited = time.monotonic() - sent
    assert "interrupted" in out and "exiting" in out
    started = int(out.rsplit("started", 1)[1])
    assert started < 40, f"{started} of 200 examples ran after SIGTERM ({waited:.1f} s to exit)"


def test_a_held_block_finishes_before_the_signal_is_heard(ctrl_c):
    reached = []
    with pytest.raises(Interrupted):
        with stop_on(signal.SIGTERM), held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler would run here, were the signal not held
            reached.append("end of block")
    assert reached == ["end of block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_a_second_signal_breaks_through_a_held_block(ctrl_c):
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached.append("end of block")
    assert reached == []


# Four chains inside a model call that would decode 4,000 tokens each, left running as DSPy's evaluation
# leaves its threads when interrupted.
ENDLESS_CALLS = textwrap.dedent("""
    import signal, sys, time
    from concurrent.futures import ThreadPoolExecutor
    from optimize.llm.engine import get_engine
    from optimize.llm.settings import ModelConfig
    from optimize.llm.types import Generation

    def start_endless_calls():
        engine = get_engine(ModelConfig(spec="smollm2-135m", engine="sequential", n_ctx=4096))
        tokens = tuple(engine.llama.tokenize(b"Write a and b again and again.", add_bos=False))
        call = Generation(tokens=tokens, max_tokens=4000, grammar='root ::= "ab" root')
        pool = ThreadPoolExecutor(4)
        for _ in range(4):
            pool.submit(engine.backend.generate, call)
        pool.shutdown(wait=False)
""")

ENGINE_SCRIPT = ENDLESS_CALLS + textwrap.dedent("""
    from optimize import cli
    from optimize.interrupts import stop_on

    def endless_calls(args, out):
        start_endless_calls()
        with stop_on(signal.SIGTERM):
            print("ready", file=sys.__stdout__, flush=True)  # main() sends stdout to /dev/null
            time.sleep(600)

    cli.cmd_models = endless_calls
    sys.exit(cli.main(["models", "list"]))
""")

API_SCRIPT = ENDLESS_CALLS + textwrap.dedent("""
    from optimize import experiment
    from optimize.config import parse_experiment

    def endless_trial(trial, splits, progress, live):
        start_endless_calls()
        print("ready", flush=True)
        time.sleep(600)

    experiment.run_trial = endless_trial
    exp = parse_experiment({"name": "stop", "programs": [{"name": "intent.predict"}], "optimizers": [{"name": "none"}],
                            "data": {"dataset": "banking77", "test": 2}, "tracking": {"uri": sys.argv[1]}})
    try:
        experiment.run_experiment(exp)  # run_experiment turns SIGTERM into KeyboardInterrupt itself
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(130)
""")


def stopped_when_ready(script: str, *args: str) -> tuple[int, str, str]:
    """Run `script` until it prints "ready", send SIGTERM a second later: its exit code, stdout and stderr,
    or a failure if it is still running 30 s after."""
    child = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, cwd=Path(__file__).resolve().parents[1],
                             env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        assert child.stdout.readline().strip() == "ready", child.stderr.read() if child.poll() is not None else ""
        time.sleep(1.0)
        child.send_signal(signal.SIGTERM)
        try:
            out, err = child.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            raise AssertionError("still decoding 30 s after SIGTERM") from None
    finally:
        child.kill()  # never left decoding on the cores, whatever failed
    return child.returncode, out, err


@pytest.mark.model
def test_an_interrupted_command_stops_the_model_calls_in_flight():
    """The interpreter waits at exit for the threads of an interrupted evaluation: without closing the
    models on interrupt, four calls of 4,000 tokens ran to their end first (minutes on 2 cores)."""
    code, _, err = stopped_when_ready(ENGINE_SCRIPT)
    assert code == 130 and "interrupted; finished runs are kept" in err, err


@pytest.mark.model
def test_an_interrupted_api_run_stops_the_model_calls_in_flight(tmp_path):
    """The same for a Python caller of run_experiment, with no CLI around it: fails if only the CLI closes
    the models (the four 4,000-token calls then hold the interpreter at exit for minutes)."""
    code, out, err = stopped_when_ready(API_SCRIPT, f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert code == 130 and "interrupted" in out, err
