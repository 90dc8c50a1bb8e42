"""Being told to stop is Ctrl-C: SIGTERM (`kill`, a supervisor) and SIGHUP (the terminal closed) unwind
through the same `except KeyboardInterrupt` and `finally` blocks, so what a command started (a child run,
the MLflow server) is stopped and recorded instead of left behind."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


class Interrupted(KeyboardInterrupt):
    """A termination signal, turned into the same clean stop as Ctrl-C."""


def _interrupt(signum, frame) -> None:
    """Stop as Ctrl-C would: whoever holds SIGINT now hears of it first. DSPy's parallel evaluation holds
    it to cancel its queued examples; without that, its worker threads went on through every example
    after the exception, and the process could not exit until they were done (minutes, on a slow model)."""
    current = signal.getsignal(signal.SIGINT)
    if signum != signal.SIGINT and callable(current) and current is not _interrupt:
        try:
            current(signal.SIGINT, frame)
        except KeyboardInterrupt:
            pass
    raise Interrupted()


@contextlib.contextmanager
def stop_on(*signals: signal.Signals) -> Iterator[None]:
    """Within the block, `signals` raise Interrupted; a signal the process was started ignoring (`nohup`
    ignores SIGHUP) stays ignored. Only the main thread can set handlers: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {sig: signal.signal(sig, _interrupt) for sig in signals if signal.getsignal(sig) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def held(*signals: signal.Signals) -> Iterator[None]:
    """Within the block a stop signal (by default Ctrl-C, SIGTERM, SIGHUP) waits for the block's end, then
    goes to whoever held it before: a write to the store is not cut in half. A KeyboardInterrupt inside
    SQLite's write left its lock taken, and the run could then not even be marked FAILED. A second signal
    stops at once: a store that hangs cannot hold the user. Only the main thread can set handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    kept: dict[int, object] = {}

    def restore() -> None:
        for sig, handler in kept.items():
            signal.signal(sig, handler)
        kept.clear()

    def wait(signum: int, frame) -> None:
        if not arrived:
            arrived.append(signum)
            return
        restore()
        signal.raise_signal(signum)

    for sig in signals or STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            kept[sig] = signal.signal(sig, wait)
    try:
        yield
    finally:
        if kept:
            restore()
            if arrived:
                signal.raise_signal(arrived[0])
