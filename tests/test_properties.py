"""Properties of the cost arithmetic (optimize.cost) and of the experiment parser (optimize.config)."""

from __future__ import annotations

import json
import math
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from optimize import cost
from optimize.config import (BudgetConfig, CostConfig, DataConfig, EvalConfig, Experiment, ModelConfig,
                             TrackingConfig, load_experiment, parse_experiment)
from optimize.errors import ConfigError

counts = st.integers(min_value=0, max_value=10**9)
seconds = st.floats(min_value=0, max_value=1e6, allow_nan=False)
usages = st.builds(cost.Usage, input_computed=counts, input_reused=counts, output=counts, calls=counts,
                   seconds=st.integers(0, 10**6).map(float))  # whole seconds: float addition is then exact


@given(usages, usages, usages)
def test_usage_addition_is_associative_and_commutative(a, b, c):
    assert (a + b) + c == a + (b + c)
    assert a + b == b + a
    assert a + cost.Usage() == a
    assert (a + b).tokens == a.tokens + b.tokens


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False), st.integers(0, 10**6))
def test_per_success(total, successes):
    value = cost.per_success(total, successes)
    assert math.isinf(value) if successes == 0 else value == total / successes


def _spend(usage: cost.Usage, wall: float, cpu: float) -> cost.Spend:
    return cost.Spend(usage, wall, cpu, cpu * 15.0, False)


@given(st.lists(st.booleans(), max_size=50), usages, seconds, seconds,
       st.fixed_dictionaries({"usd_per_hour": st.floats(0, 100), "usd_per_m_input": st.floats(0, 100),
                              "usd_per_m_output": st.floats(0, 100)}))
def test_summarize_invariants(successes, usage, wall, cpu, prices):
    latencies = [float(i) for i in range(len(successes))]
    out = cost.summarize(successes, latencies, _spend(usage, wall, cpu), prices)
    wins = sum(successes)
    assert 0.0 <= out["accuracy"] <= 1.0 and out["n"] == len(successes) and out["successes"] == wins
    assert out["tokens_total"] == usage.tokens
    totals = {"tokens": "tokens_total", "seconds": "seconds_total", "joules": "energy_joules", "usd": "usd_total"}
    for unit in cost.UNITS:
        if wins:
            assert math.isclose(out[f"{unit}_per_success"] * wins, out[totals[unit]], rel_tol=1e-9, abs_tol=1e-9)
        else:
            assert math.isinf(out[f"{unit}_per_success"])
    if latencies:
        assert min(latencies) <= out["latency_p50"] <= out["latency_p95"] <= max(latencies)


amounts = st.one_of(st.just(0.0), st.floats(1e-6, 1e9))  # real costs, not subnormal floats


@given(amounts, amounts, amounts)
def test_break_even(compile_cost, baseline, optimized):
    value = cost.break_even(compile_cost, baseline, optimized)
    assert value >= 0
    if optimized >= baseline:
        assert math.isinf(value)  # never repaid, whatever the compile cost
    elif compile_cost == 0:
        assert value == 0
    else:
        assert math.isclose(value * (baseline - optimized), compile_cost, rel_tol=1e-9)
    assert math.isinf(cost.break_even(1.0, math.inf, math.inf))  # neither succeeds: never


@given(st.lists(st.floats(-1e9, 1e9), min_size=1, max_size=100), st.floats(0, 100), st.floats(0, 100))
def test_percentile_bounds_and_order(values, q1, q2):
    low, high = sorted((q1, q2))
    assert min(values) <= cost.percentile(values, low) <= cost.percentile(values, high) <= max(values)
    assert cost.percentile(values, low) in values
    assert cost.percentile(values, 100) == max(values)


def test_percentile_of_nothing_is_nan():
    assert math.isnan(cost.percentile([], 50))


# ---- the config parser ----------------------------------------------------------------------------

names = st.text(string.ascii_lowercase + string.digits + "-_", min_size=1, max_size=12)
models = st.fixed_dictionaries({}, optional={
    "spec": st.sampled_from(["smollm2-135m", "gemma3-270m", "/models/x.gguf"]),
    "n_ctx": st.integers(256, 131072), "n_threads": st.integers(1, 64),
    "temperature": st.floats(0, 2, allow_nan=False), "max_tokens": st.integers(1, 4096), "seed": st.integers(0, 99),
    "cache": st.booleans(), "engine": st.sampled_from(["batched", "sequential"]), "parallel": st.integers(1, 64),
    "overflow": st.sampled_from(["fail", "truncate"])})
data = st.fixed_dictionaries({}, optional={
    "dataset": st.sampled_from(["banking77", "gsm8k", "svamp"]), "train": st.integers(0, 500),
    "dev": st.integers(0, 500), "test": st.integers(0, 500), "seed": st.integers(0, 99),
    "skip_malformed": st.booleans()})
settings_values = st.dictionaries(st.sampled_from(["k", "max_rounds", "auto"]),
                                  st.one_of(st.integers(0, 9), st.sampled_from(["light", "heavy"])), max_size=2)
optimizers = st.fixed_dictionaries({"name": st.sampled_from(["none", "labeled_fewshot", "gepa"])},
                                   optional={"settings": settings_values, "teacher": models})
experiments = st.fixed_dictionaries({"name": names}, optional={
    "description": st.text(max_size=30), "models": st.lists(models, min_size=1, max_size=2),
    "data": data, "programs": st.lists(st.fixed_dictionaries({"name": st.sampled_from(["intent.predict", "math.cot"])}),
                                       min_size=1, max_size=2),
    "optimizers": st.lists(optimizers, min_size=1, max_size=2), "seeds": st.lists(st.integers(0, 9), min_size=1,
                                                                                  max_size=3),
    "budget": st.fixed_dictionaries({}, optional={"run_tokens": st.integers(1, 10**7),
                                                  "max_retries": st.integers(0, 5)}),
    "eval": st.fixed_dictionaries({}, optional={"threads": st.integers(1, 64),
                                                "split": st.sampled_from(["train", "dev", "test"])})})


def to_toml(doc: dict) -> str:
    """A minimal TOML writer for the shapes above: scalars, inline tables, tables, arrays of tables."""
    def value(v) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, str):
            # TOML has no surrogate-pair escapes; JSON leaves DEL raw, which TOML forbids in a string
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return "{" + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + "}"

    def table(header: str, body: dict) -> list[str]:
        lines = [header] if header else []
        lines += [f"{k} = {value(v)}" for k, v in body.items() if not isinstance(v, dict) or k in ("settings",)
                  if k != "teacher"]
        if "teacher" in body:
            lines.append(f"teacher = {value(body['teacher'])}")
        return lines

    lines = table("", {k: v for k, v in doc.items() if not isinstance(v, (dict, list)) or k == "seeds"})
    for key, v in doc.items():
        if isinstance(v, dict):
            lines += table(f"[{key}]", v)
        elif isinstance(v, list) and key != "seeds":
            for item in v:
                lines += table(f"[[{key}]]", item)
    return "\n".join(lines) + "\n"


@settings(max_examples=60, deadline=None)
@given(experiments)
def test_valid_config_round_trips_through_toml(tmp_path_factory, doc):
    path = tmp_path_factory.mktemp("cfg") / "exp.toml"
    path.write_text(to_toml(doc), encoding="utf-8")
    loaded = load_experiment(path)
    assert loaded.model_dump() == Experiment.model_validate(doc).model_dump()
    again = parse_experiment(loaded.model_dump(mode="json"))
    assert again == loaded and again.model_dump() == loaded.model_dump()


SECTIONS = {"": Experiment, "model": ModelConfig, "data": DataConfig, "budget": BudgetConfig, "cost": CostConfig,
            "tracking": TrackingConfig, "eval": EvalConfig}


@settings(max_examples=80, deadline=None)
@given(st.sampled_from(sorted(SECTIONS)), st.text(string.ascii_lowercase + "_", min_size=1, max_size=15))
def test_unknown_key_is_always_rejected_and_named(section, key):
    if key in SECTIONS[section].model_fields or (not section and key in ("model", "program", "optimizer")):
        return
    raw = {"name": "x", section: {key: 1}} if section else {"name": "x", key: 1}
    with pytest.raises(ConfigError) as caught:
        parse_experiment(raw, "exp.toml")
    message = str(caught.value)
    assert message.startswith("exp.toml: unknown key") and f"{key}'" in message and "allowed:" in message
