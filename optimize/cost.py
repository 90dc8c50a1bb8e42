"""Everything spent, what it costs per successful chain, and the budget rules: the one home for both.

Metering: the engine reports each LM call's usage to its observers (optimize.llm.types.observe); this
module is one, registered on import, so whoever opens a scope here is metered. What a call spent lands
in every open `Tally` of the calling thread (a chain, a compile phase, a whole run), so one call is
counted once per scope that asked. Programs label their steps with `programs.contract.step("name")`
to get tokens per step. A scope opened with `events=True` (a chain's) also keeps each call as an event, in
order with the validator verdicts the programs report (`programs.contract.judging`), for its trace.

Budgets are ceilings: a scope at its ceiling refuses the next call, and a call that carries a scope
past its ceiling raises `BudgetExceeded` once it is recorded (its tokens were spent and are counted).
"""

from __future__ import annotations

import contextvars
import math
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

from optimize.errors import BudgetExceeded
from optimize.llm.types import Observer, Usage, observe
from programs.contract import current_step


@dataclass
class Tally:
    """Usage gathered in one scope, with an optional hard token ceiling."""

    label: str = ""
    limit: int | None = None
    usage: Usage = field(default_factory=Usage)
    by_step: dict[str, Usage] = field(default_factory=lambda: defaultdict(Usage))
    events: list[dict[str, Any]] | None = None  # kept only when asked for (a chain's scope): see lm_event
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, call: Usage, step_name: str, event: dict[str, Any] | None = None) -> None:
        with self._lock:
            self.usage = self.usage + call
            self.by_step[step_name] = self.by_step[step_name] + call
            if self.events is not None and event is not None:
                self.events.append(event)

    def log(self, event: dict[str, Any]) -> None:
        """Keep an event that is not an LM call (a validator's verdict), in order with the calls."""
        with self._lock:
            if self.events is not None:
                self.events.append(event)

    @property
    def full(self) -> bool:
        """At (or past) the ceiling: the next call is refused."""
        return self.limit is not None and self.usage.tokens >= self.limit

    def check(self) -> None:
        """Before a call: a scope already at its ceiling refuses it."""
        if self.full:
            raise BudgetExceeded(self.label or "chain", self.limit, self.usage.tokens)

    @property
    def over(self) -> bool:
        """Past the ceiling: the scope spent more than it was allowed."""
        return self.limit is not None and self.usage.tokens > self.limit


_scopes: contextvars.ContextVar[tuple[Tally, ...]] = contextvars.ContextVar("chainopt_scopes", default=())
_shared: list[Tally] = []  # scopes that see calls from every thread (a run, a compile phase)
_shared_lock = threading.Lock()


@contextmanager
def metered(label: str = "", limit: int | None = None, *, all_threads: bool = False,
            events: bool = False) -> Iterator[Tally]:
    """Count every LM call made inside the block (by this thread, or by any thread when all_threads), and
    keep each as an event too when `events`."""
    tally = Tally(label=label, limit=limit, events=[] if events else None)
    if all_threads:
        with _shared_lock:
            _shared.append(tally)
        try:
            yield tally
        finally:
            with _shared_lock:
                _shared.remove(tally)
        return
    token = _scopes.set(_scopes.get() + (tally,))
    try:
        yield tally
    finally:
        _scopes.reset(token)


def _open_scopes() -> list[Tally]:
    with _shared_lock:
        return [*_scopes.get(), *_shared]


def check_budgets() -> None:
    """Called by the engine before a call: raise BudgetExceeded if any open scope is at its ceiling."""
    for tally in _open_scopes():
        tally.check()


def lm_event(call: Usage, step_name: str, model: str) -> dict[str, Any]:
    """One LM call as plain data (JSON and pickle as they are), timed now that it has returned: epoch
    nanoseconds, ending now, starting its measured seconds earlier; a call answered from DSPy's response
    cache took no time (its usage is the computing call's, replayed)."""
    end = time.time_ns()
    start = end if call.cached else end - int(call.seconds * 1e9)
    return {"kind": "lm", "step": step_name, "model": model, "start_ns": start, "end_ns": end,
            "input_computed": call.input_computed, "input_reused": call.input_reused, "output": call.output,
            "cached": bool(call.cached)}


def record(call: Usage, model: str = "") -> None:
    """Called after every LM call: count it in every open scope, then refuse it if it crossed a ceiling."""
    name = current_step()
    scopes = _open_scopes()
    event = lm_event(call, name, model) if any(t.events is not None for t in scopes) else None
    for tally in scopes:
        tally.add(call, name, event)
    for tally in scopes:
        if tally.over:
            raise BudgetExceeded(tally.label or "chain", tally.limit, tally.usage.tokens)


observe(Observer(before=check_budgets, after=record))


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


# -- energy ---------------------------------------------------------------------------------------
RAPL = "/sys/class/powercap/intel-rapl:0/energy_uj"


def read_rapl_joules(path: str = RAPL) -> float | None:
    """The package energy counter, when the kernel lets us read it (often root-only or absent in VMs)."""
    try:
        with open(path) as handle:
            return int(handle.read().strip()) / 1e6
    except (OSError, ValueError):
        return None


@dataclass(frozen=True)
class Spend:
    """What one phase (an evaluation or a compile) consumed, all threads together."""

    usage: Usage
    wall_seconds: float
    cpu_seconds: float
    joules: float
    energy_measured: bool


@contextmanager
def spending(watts_per_core: float) -> Iterator[dict]:
    """Meter a phase: LM usage from every thread, wall and CPU time, and energy (RAPL, else estimated).

    Yields a dict that holds the `Spend` under "spend" once the block ends.
    """
    import time

    holder: dict = {}
    rapl0, cpu0, wall0 = read_rapl_joules(), time.process_time(), time.perf_counter()
    with metered("phase", all_threads=True) as tally:
        holder["tally"] = tally
        try:
            yield holder
        finally:
            cpu = time.process_time() - cpu0
            rapl1 = read_rapl_joules()
            measured = rapl0 is not None and rapl1 is not None and rapl1 >= rapl0
            joules = (rapl1 - rapl0) if measured else energy_estimate(cpu, watts_per_core)
            holder["spend"] = Spend(tally.usage, time.perf_counter() - wall0, cpu, joules, measured)


def energy_estimate(cpu_seconds: float, watts_per_core: float) -> float:
    """Joules when no counter is readable: CPU-seconds x configured watts per busy core."""
    return cpu_seconds * watts_per_core


# -- money and the cost formula -------------------------------------------------------------------
def money(spend: Spend, usd_per_hour: float = 0.0, usd_per_m_input: float = 0.0,
          usd_per_m_output: float = 0.0) -> float:
    """Dollars: machine time at an hourly rate, plus per-token prices for a hosted model."""
    return (spend.wall_seconds / 3600 * usd_per_hour
            + spend.usage.input_tokens / 1e6 * usd_per_m_input
            + spend.usage.output / 1e6 * usd_per_m_output)


def per_success(total: float, successes: int) -> float:
    """Everything spent, failed attempts included, divided by the successes; none succeeded: infinite."""
    return total / successes if successes else math.inf


UNITS = ("tokens", "seconds", "joules", "usd")


def spend_units(spend: Spend, prices: dict[str, float]) -> dict[str, float]:
    return {"tokens": float(spend.usage.tokens), "seconds": spend.wall_seconds, "joules": spend.joules,
            "usd": money(spend, **prices)}


def summarize(successes: list[bool], latencies: list[float], spend: Spend, prices: dict[str, float]) -> dict[str, float]:
    """The run's metrics: accuracy, what was spent, and the cost per successful chain in every unit."""
    n, wins = len(successes), sum(successes)
    totals = spend_units(spend, prices)
    out = {"n": n, "successes": wins, "accuracy": wins / n if n else 0.0,
           "tokens_total": totals["tokens"], "input_tokens_computed": spend.usage.input_computed,
           "input_tokens_reused": spend.usage.input_reused, "output_tokens": spend.usage.output,
           "lm_calls": spend.usage.calls, "cache_hits": spend.usage.cached, "seconds_total": spend.wall_seconds, "cpu_seconds": spend.cpu_seconds,
           "energy_joules": spend.joules, "energy_measured": float(spend.energy_measured), "usd_total": totals["usd"],
           "latency_p50": percentile(latencies, 50), "latency_p95": percentile(latencies, 95)}
    out.update({f"{unit}_per_success": per_success(totals[unit], wins) for unit in UNITS})
    return out


def break_even(compile_cost: float, baseline_per_success: float, optimized_per_success: float) -> float:
    """Successful queries after which a compile pays for itself: compile / (baseline - optimized) per success.

    Never (infinite) when the optimized program is not cheaper per success, whatever the compile cost:
    each query then costs more than the baseline's, so nothing is ever repaid. At once (0) when it is
    cheaper and compiling cost nothing, or when the baseline never succeeds.
    """
    saving = baseline_per_success - optimized_per_success
    if not saving > 0:  # also nan: both infinite
        return math.inf
    if compile_cost <= 0 or math.isinf(saving):
        return 0.0
    return compile_cost / saving
