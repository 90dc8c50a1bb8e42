"""The cost arithmetic, as tables of inputs and expected outputs."""

import math
import threading

import pytest

from optimize import cost
from programs.contract import step
from optimize.errors import BudgetExceeded


def spend(computed=0, reused=0, output=0, calls=0, wall=0.0, cpu=0.0, joules=0.0):
    return cost.Spend(cost.Usage(computed, reused, output, calls, wall), wall, cpu, joules, False)


@pytest.mark.parametrize("total, successes, expected", [
    (100.0, 4, 25.0), (0.0, 3, 0.0), (7.0, 0, math.inf), (1.0, 1, 1.0)])
def test_per_success(total, successes, expected):
    assert cost.per_success(total, successes) == expected


@pytest.mark.parametrize("compile_cost, base, opt, expected", [
    (100.0, 3.0, 1.0, 50.0),        # saves 2 per success: repaid after 50 successful queries
    (100.0, 1.0, 3.0, math.inf),    # more expensive per success: never repaid
    (100.0, 2.0, 2.0, math.inf),    # no saving
    (0.0, 2.0, 3.0, math.inf),      # free to compile, but dearer per success: never repaid (was 0, "at once")
    (0.0, 2.0, 2.0, math.inf),      # free to compile, no saving: never
    (0.0, 3.0, 2.0, 0.0),           # free to compile and cheaper: repaid at once
    (100.0, math.inf, 5.0, 0.0),    # the baseline never succeeds: any success is a saving
    (100.0, 5.0, math.inf, math.inf),
])
def test_break_even(compile_cost, base, opt, expected):
    assert cost.break_even(compile_cost, base, opt) == expected


@pytest.mark.parametrize("wall, tokens_in, tokens_out, prices, expected", [
    (3600.0, 0, 0, {"usd_per_hour": 0.5}, 0.5),
    (0.0, 2_000_000, 1_000_000, {"usd_per_m_input": 0.1, "usd_per_m_output": 0.4}, 0.6),
    (1800.0, 1_000_000, 0, {"usd_per_hour": 1.0, "usd_per_m_input": 1.0}, 1.5),
])
def test_money(wall, tokens_in, tokens_out, prices, expected):
    assert cost.money(spend(computed=tokens_in, output=tokens_out, wall=wall), **prices) == pytest.approx(expected)


def test_summarize_worked_example():
    # The README's worked example: 10 chains, 4 correct, 12,000 tokens, 20 s, 2 CPU cores busy.
    s = spend(computed=3000, reused=8000, output=1000, calls=10, wall=20.0, cpu=40.0,
              joules=cost.energy_estimate(40.0, 15.0))
    m = cost.summarize([True] * 4 + [False] * 6, [2.0] * 10, s, {"usd_per_hour": 0.36})
    assert m["accuracy"] == 0.4 and m["successes"] == 4
    assert m["tokens_per_success"] == 3000.0
    assert m["seconds_per_success"] == 5.0
    assert m["joules_per_success"] == 150.0
    assert m["usd_per_success"] == pytest.approx(0.0005)
    assert m["latency_p50"] == m["latency_p95"] == 2.0


def test_summarize_no_success_is_infinite_not_a_crash():
    m = cost.summarize([False, False], [1.0, 3.0], spend(computed=10, wall=4.0), {})
    assert m["accuracy"] == 0 and all(math.isinf(m[f"{u}_per_success"]) for u in cost.UNITS)
    m = cost.summarize([], [], spend(), {})
    assert m["accuracy"] == 0 and math.isnan(m["latency_p50"])


@pytest.mark.parametrize("values, q, expected", [([1, 2, 3, 4], 50, 2), ([1, 2, 3, 4], 95, 4), ([5], 50, 5),
                                                 (list(range(1, 101)), 95, 95)])
def test_percentile(values, q, expected):
    assert cost.percentile(values, q) == expected


def test_metering_scopes_nest_and_label_steps():
    with cost.metered("outer") as outer:
        with cost.metered("inner") as inner, step("plan"):
            cost.record(cost.Usage(10, 5, 2, 1, 0.1))
        cost.record(cost.Usage(1, 0, 1, 1, 0.1))
    assert inner.usage.tokens == 17 and outer.usage.tokens == 19
    assert inner.by_step["plan"].tokens == 17 and outer.by_step["predict"].tokens == 2


def test_shared_scope_sees_other_threads_private_scope_does_not():
    with cost.metered("run", all_threads=True) as run, cost.metered("mine") as mine:
        t = threading.Thread(target=lambda: cost.record(cost.Usage(output=3, calls=1)))
        t.start()
        t.join()
    assert run.usage.output == 3 and mine.usage.output == 0


def test_budget_check_raises_at_ceiling():
    with cost.metered("chain", limit=10):
        cost.check_budgets()
        cost.record(cost.Usage(input_computed=10))
        with pytest.raises(BudgetExceeded, match="chain token budget reached: 10 of 10"):
            cost.check_budgets()


def test_a_call_that_crosses_the_ceiling_is_counted_and_refused():
    # The ceiling holds after the call too: a chain at 8 of 10 whose next call spends 5 ends over budget,
    # with those 5 tokens counted. Checked only before each call, it used to pass at 13 of 10.
    with cost.metered("chain", limit=10) as chain:
        cost.record(cost.Usage(input_computed=8))
        cost.check_budgets()
        with pytest.raises(BudgetExceeded, match="chain token budget reached: 13 of 10"):
            cost.record(cost.Usage(input_computed=5))
    assert chain.usage.tokens == 13 and chain.over


def test_a_call_that_ends_exactly_at_the_ceiling_is_allowed():
    with cost.metered("chain", limit=10) as chain:
        cost.record(cost.Usage(input_computed=10))
    assert not chain.over


def test_the_engine_reports_every_call_to_the_meter():
    # cost registers itself with the inference layer on import: no scope of this module is ever left unmetered.
    from optimize.llm.types import observers

    assert any(o.after is cost.record and o.before is cost.check_budgets for o in observers())


def test_spending_estimates_energy_without_rapl(monkeypatch):
    monkeypatch.setattr(cost, "read_rapl_joules", lambda path=cost.RAPL: None)
    with cost.spending(watts_per_core=10.0) as phase:
        cost.record(cost.Usage(output=5, calls=1))
        sum(i * i for i in range(200_000))
    s = phase["spend"]
    assert s.usage.output == 5 and not s.energy_measured
    assert s.joules == pytest.approx(s.cpu_seconds * 10.0)


def test_spending_uses_rapl_when_readable(monkeypatch):
    readings = iter([100.0, 130.5])
    monkeypatch.setattr(cost, "read_rapl_joules", lambda path=cost.RAPL: next(readings))
    with cost.spending(watts_per_core=10.0) as phase:
        pass
    assert phase["spend"].energy_measured and phase["spend"].joules == pytest.approx(30.5)
