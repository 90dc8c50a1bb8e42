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


def test_a_held_block_finishes_before_the_signal_is_heard():
    reached = []
    with pytest.raises(Interrupted):
        with stop_on(signal.SIGTERM), held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler would run here, were the signal not held
            reached.append("end of block")
    assert reached == ["end of block"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored


def test_a_second_signal_breaks_through_a_held_block():
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            reached.append("end of block")
    assert reached == []
