"""Progress: live line only in a terminal, one summary line always, counts right under threads."""

import io
import threading
from types import SimpleNamespace

import pytest

from optimize.progress import EvalProgress, duration, phase


def record(success: bool, tokens: int = 10) -> SimpleNamespace:
    return SimpleNamespace(success=success, usage=SimpleNamespace(tokens=tokens))


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("seconds, text", [(0, "0 s"), (42.4, "42 s"), (59.6, "1 min 00 s"), (185, "3 min 05 s"),
                                           (3720, "1 h 02 min"), (-3, "0 s")])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_rate_accuracy_tokens_and_eta():
    clock, lines = Clock(), []
    bar = EvalProgress(10, "evaluating", report=lines.append, live=False, clock=clock)
    assert bar.eta is None and "ETA -" in bar.status()
    for ok in (True, False, True, True):
        bar.record(record(ok, tokens=250))
    clock.now += 2.0
    assert bar.rate == pytest.approx(2.0)
    assert bar.eta == pytest.approx(3.0)
    assert bar.status() == "2.00 ex/s  accuracy 75% (3/4)  1,000 tokens  ETA 3 s"
    bar.close()
    assert lines == ["evaluating: 4/10 in 2 s (2.00 ex/s), accuracy 75%, 1,000 tokens"]


def test_not_a_terminal_prints_nothing_but_the_summary():
    stream, lines = io.StringIO(), []
    with EvalProgress(3, "evaluating test", report=lines.append, stream=stream) as bar:
        for _ in range(3):
            bar.record(record(True))
    assert stream.getvalue() == ""
    assert len(lines) == 1 and lines[0].startswith("evaluating test: 3/3 in ")


def test_live_line_is_drawn_in_a_terminal():
    stream, lines = io.StringIO(), []
    with EvalProgress(2, "evaluating", report=lines.append, live=True, stream=stream) as bar:
        bar.record(record(True))
        bar.record(record(False))
    assert "ex/s" in stream.getvalue() and "accuracy" in stream.getvalue()
    assert len(lines) == 1


def test_records_from_many_threads_are_all_counted():
    bar = EvalProgress(800, live=False)
    threads = [threading.Thread(target=lambda: [bar.record(record(True, 1)) for _ in range(100)]) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (bar.done, bar.successes, bar.tokens) == (800, 800, 800)


def test_phase_reports_done_or_failed():
    lines = []
    with phase("loading smollm2-135m", lines.append, live=False):
        pass
    with pytest.raises(RuntimeError), phase("compiling", lines.append, live=True, stream=io.StringIO()):
        raise RuntimeError("boom")
    assert lines[0].startswith("loading smollm2-135m: done in ") and lines[1].startswith("compiling: failed in ")
