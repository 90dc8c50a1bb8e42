"""Progress on the long steps (model load, compile, evaluation), so a minutes-long run is not a silent one.

In a terminal a live `rich` line shows examples/s, running accuracy, tokens and the ETA; in a log (stderr
not a TTY, e.g. CI) nothing is drawn and one final line sums the step up, so logs stay short.
The final line goes through the caller's `report` callback, which the CLI silences for -q and --json.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator, TextIO

if TYPE_CHECKING:
    from optimize.evaluate import ChainRecord

Report = Callable[[str], None]


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def duration(seconds: float) -> str:
    """Short human duration: 42 s, 3 min 05 s, 1 h 02 min."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class EvalProgress:
    """Counts finished chains; pass `record` as evaluate()'s `on_record` (it is called from worker threads)."""

    def __init__(self, total: int, label: str = "evaluating", report: Report = lambda s: None,
                 live: bool | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.total, self.label, self.report, self.clock = total, label, report, clock
        self.done = self.successes = self.tokens = 0
        self.start = clock()
        self._lock = threading.Lock()
        stream = stream or sys.stderr
        self._bar = _LiveBar(label, total, stream) if (is_terminal(stream) if live is None else live) else None

    def record(self, record: "ChainRecord") -> None:
        with self._lock:
            self.done += 1
            self.successes += bool(record.success)
            self.tokens += record.usage.tokens
            line = self.status()
        if self._bar:
            self._bar.update(self.done, line)

    @property
    def elapsed(self) -> float:
        return self.clock() - self.start

    @property
    def rate(self) -> float:
        """Finished chains per second so far."""
        return self.done / self.elapsed if self.done and self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate; None before the first chain finishes."""
        return (self.total - self.done) / self.rate if self.rate else None

    def status(self) -> str:
        accuracy = f"{self.successes / self.done:.0%}" if self.done else "-"
        eta = "-" if self.eta is None else duration(self.eta)
        return (f"{self.rate:.2f} ex/s  accuracy {accuracy} ({self.successes}/{self.done})  "
                f"{self.tokens:,} tokens  ETA {eta}")

    def summary(self) -> str:
        accuracy = f"{self.successes / self.done:.0%}" if self.done else "-"
        return (f"{self.label}: {self.done}/{self.total} in {duration(self.elapsed)} ({self.rate:.2f} ex/s), "
                f"accuracy {accuracy}, {self.tokens:,} tokens")

    def close(self) -> None:
        """Remove the live line and report the one-line summary."""
        if self._bar:
            self._bar.stop()
            self._bar = None
        self.report(self.summary())

    def __enter__(self) -> "EvalProgress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def phase(label: str, report: Report = lambda s: None, live: bool | None = None,
          stream: TextIO | None = None) -> Iterator[None]:
    """A step with no countable items (model load, compile): a spinner with elapsed time, then one line."""
    stream = stream or sys.stderr
    start = time.perf_counter()
    spinner = None
    if is_terminal(stream) if live is None else live:
        from rich.console import Console

        spinner = Console(file=stream, force_terminal=True).status(f"{label} ...")
        spinner.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        if spinner is not None:
            spinner.stop()
        report(f"{label}: {'done' if ok else 'failed'} in {duration(time.perf_counter() - start)}")


class _LiveBar:
    """rich's progress bar on the given stream, removed when stopped (the summary line replaces it)."""

    def __init__(self, label: str, total: int, stream: TextIO):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[line]}"), console=Console(file=stream, force_terminal=True),
                                  transient=True)
        self._task = self._progress.add_task(label, total=total, line="")
        self._progress.start()

    def update(self, done: int, line: str) -> None:
        self._progress.update(self._task, completed=done, line=line)

    def stop(self) -> None:
        self._progress.stop()
