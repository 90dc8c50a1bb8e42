"""chainopt bench: the floor arithmetic on a table of inputs, and a real tiny run on the embedded model."""

from __future__ import annotations

import math

import pytest

from optimize.bench import (BenchResult, Rates, Row, best_rates, exact_floor_seconds, floor_seconds, format_table,
                            from_json, identical_rate, run_bench, speedup)
from optimize.errors import ConfigError


@pytest.mark.parametrize("computed, output, prompt_tps, decode_tps, expected", [
    (0, 0, 400.0, 250.0, 0.0),
    (400, 0, 400.0, 250.0, 1.0),
    (0, 500, 400.0, 250.0, 2.0),
    (1000, 250, 500.0, 125.0, 4.0),
    (123, 45, 1.0, 1.0, 168.0),
])
def test_floor_seconds(computed: int, output: int, prompt_tps: float, decode_tps: float, expected: float) -> None:
    assert math.isclose(floor_seconds(computed, output, prompt_tps, decode_tps), expected)


@pytest.mark.parametrize("computed, decoded, class_tps, expected", [
    (0, {}, {}, 0.0),
    (400, {256: 250}, {256: 250.0, 512: 100.0}, 2.0),  # 400/400 + 250/250
    (0, {256: 250, 512: 100}, {256: 250.0, 512: 100.0}, 2.0),  # each class at its own rate
    (0, {768: 10}, {256: 250.0, 512: 100.0}, None),  # a class that was not measured: no floor
])
def test_exact_floor_seconds(computed: int, decoded: dict, class_tps: dict, expected: float | None) -> None:
    got = exact_floor_seconds(computed, 400.0, decoded, class_tps)
    assert got == expected if expected is None else math.isclose(got, expected)


def test_kv_classes_survive_the_childs_json() -> None:
    import json
    from dataclasses import asdict

    rates = Rates(400.0, 200.0, 750, 32, 16, 32, class_decode_tps={256: 250.0, 512: 200.0})
    row = Row("batched", n=1, decoded_by_class={256: 9, 768: 3})
    assert from_json(Rates, json.loads(json.dumps(asdict(rates)))) == rates
    assert from_json(Row, json.loads(json.dumps(asdict(row)))) == row


@pytest.mark.parametrize("measured, expected", [
    ([], None),
    ([(400.0, 200.0)], (400.0, 200.0)),
    ([(60.0, 6.0), (440.0, 260.0)], (440.0, 260.0)),  # start under load, end idle: the idle one counts
    ([(440.0, 100.0), (300.0, 260.0)], (440.0, 260.0)),  # each rate at its best
])
def test_best_rates(measured: list[tuple[float, float]], expected: tuple[float, float] | None) -> None:
    best = best_rates([Rates(p, d, 750, 32, 16, 32) for p, d in measured])
    assert (best and (best.prompt_tps, best.decode_tps)) == expected


def test_best_rates_per_kv_class() -> None:
    best = best_rates([Rates(400.0, 200.0, 750, 32, 16, 32, class_decode_tps={256: 250.0, 512: 90.0}),
                       Rates(300.0, 100.0, 750, 32, 16, 32, class_decode_tps={256: 240.0, 512: 180.0, 768: 150.0})])
    assert best.class_decode_tps == {256: 250.0, 512: 180.0, 768: 150.0}


@pytest.mark.parametrize("ref_s, ref_n, s, n, expected", [
    (50.0, 10, 5.0, 10, 10.0),  # same n: plain ratio of times
    (50.0, 10, 10.0, 100, 50.0),  # --stock-limit: the reference ran fewer examples; per-example stays fair
    (5.3, 1, 5.3, 1, 1.0),
])
def test_speedup(ref_s: float, ref_n: int, s: float, n: int, expected: float) -> None:
    assert math.isclose(speedup(Row("server", n=ref_n, seconds=ref_s), Row("batched", n=n, seconds=s)), expected)


def test_speedup_missing() -> None:
    assert speedup(None, Row("batched", n=1, seconds=1.0)) is None
    assert speedup(Row("server", n=1, seconds=1.0), Row("batched", error="not available: x")) is None


@pytest.mark.parametrize("a, b, expected", [
    (["x", "y", None], ["x", "z", None], (2, 3)),
    (["x"], ["x", "y"], (1, 1)),
    ([], [], (0, 0)),
])
def test_identical_rate(a: list, b: list, expected: tuple[int, int]) -> None:
    assert identical_rate(a, b) == expected


def test_table_of_synthetic_result() -> None:
    rows = [Row("server", n=2, seconds=100.0, input_tokens=4000, output_tokens=60, calls=2, peak_rss_mb=300,
                server_rss_mb=400, accuracy=0.5, parse_failures=1, adapter="ChatAdapter", answers=["a", None]),
            Row("inproc", n=2, seconds=10.0, input_tokens=4000, input_computed=2200, output_tokens=20, calls=2,
                adapter="JSONAdapter", answers=["a", "b"]),
            Row("sequential", n=4, seconds=8.0, input_tokens=8000, input_computed=2000, output_tokens=40, calls=4,
                answers=["a", "b", "c", "d"]),
            Row("batched", n=4, seconds=4.0, input_tokens=8000, input_computed=2000, output_tokens=40, calls=4,
                answers=["a", "b", "c", "x"], decoded_by_class={256: 20, 768: 16})]
    result = BenchResult("banking77", "2026-01-01", "cpu", "smollm2-135m", n=4, stock_n=2, parallel=16,
                         rates=Rates(500.0, 200.0, 750, 32, 16, 32, class_decode_tps={256: 100.0, 768: 80.0}),
                         rows=rows)
    table = format_table(result)
    assert "<=2000.0" in table  # the server cannot split its input: all of it, marked as an upper bound
    assert "50.0x" in table and "5.0x" in table  # (d) vs (a): 50 s/ex / 1 s/ex; vs (b): 5 / 1
    assert "= 4.2 s" in table and "0.95x the floor" in table  # 2000/500 + 40/200 = 4.2 s; 4.0 / 4.2
    assert "(d) would be 4.8x (b)" in table  # (b) 5 s/ex against the floor's 4.2 s / 4 examples
    # 2000/500 + 20/100 + 16/80 = 4.4 s; 4.0 / 4.4; (b) 5 s/ex against 1.1 s/ex
    assert "= 4.4 s (1.100 s/ex); chainopt took 0.91x it" in table and "(d) would be 4.5x (b)" in table
    assert "n_ctx=2048" in table and "n_ctx=4096" in table
    assert "identical answers: 3/4 (75.0%)" in table
    assert "first 2 of the 4 examples" in table
    assert "+ server 400" in table


def test_an_error_row_is_one_line_under_the_table() -> None:
    rows = [Row("inproc", n=2, seconds=10.0, input_tokens=4000, input_computed=2200, output_tokens=20, calls=2,
                adapter="JSONAdapter", answers=["a", "b"]),
            Row("batched", error="failed: chainopt: error: llama_decode failed with status 1")]
    tables = [format_table(BenchResult("banking77", "2026-01-01", "cpu", "smollm2-135m", n=2, stock_n=2, parallel=16,
                                       rates=None, rows=shown)).splitlines() for shown in (rows, rows[:1])]
    assert "(d) batched: failed: chainopt: error: llama_decode failed with status 1" in tables[0]
    assert tables[0][2:5] == tables[1][2:5]  # the message does not widen the columns of the measured rows


@pytest.mark.parametrize("path, threads, n_ctx, engine", [
    ("inproc", 1, 4096, "sequential"),  # stock rows: stock_baseline.py's n_ctx, 1 DSPy thread
    ("sequential", 6, 2048, "sequential"),
    ("batched", 6, 2048, "batched"),
])
def test_a_path_runs_the_workload_as_a_trial(path: str, threads: int, n_ctx: int, engine: str) -> None:
    from optimize.bench import WORKLOADS
    from optimize.bench.paths import bench_trial

    trial = bench_trial(path, WORKLOADS["bootstrap"], 7, parallel=6, model="smollm2-135m", seed=3)
    assert (trial.eval.threads, trial.model.n_ctx, trial.model.engine, trial.model.parallel) == (threads, n_ctx,
                                                                                                  engine, 6)
    assert (trial.data.train, trial.data.test, trial.data.seed, trial.eval.split) == (50, 7, 3, "test")
    assert trial.optimizer.name == "bootstrap_fewshot" and trial.optimizer.settings["max_labeled_demos"] == 16
    assert bench_trial(path, WORKLOADS["banking77"], 7, parallel=6, model="smollm2-135m", seed=3).optimizer.name == "none"


def test_unknown_workload_path_and_parallel() -> None:
    with pytest.raises(ConfigError, match="available: banking77"):
        run_bench("bankin77")
    with pytest.raises(ConfigError, match="unknown path"):
        run_bench("banking77", paths=("inprocess",))
    with pytest.raises(ConfigError, match="between 1 and 64"):
        run_bench("banking77", parallel=65)


@pytest.mark.model
def test_tiny_real_run() -> None:
    result = run_bench("banking77", n=3, stock_limit=2, paths=("inproc", "sequential", "batched"), parallel=4,
                       timeout=300)
    # Every row ran: a row that failed (an error message instead of numbers) fails the test.
    assert [(r.path, r.error) for r in result.rows] == [("inproc", None), ("sequential", None), ("batched", None)]
    assert result.rates is not None and result.rates.prompt_tps > 0 and result.rates.decode_tps > 0
    for row in result.rows:
        n = 2 if row.path == "inproc" else 3
        assert row.n == n and len(row.answers) == n
        assert row.calls >= n and row.input_tokens > 0 and row.output_tokens > 0 and row.seconds > 0
        assert 0 <= row.input_computed <= row.input_tokens and row.input_reused == row.input_tokens - row.input_computed
        assert 0 <= row.parse_failures <= row.n
        assert math.isclose(row.accuracy * n, round(row.accuracy * n))
        assert row.peak_rss_mb > 50
    batched, sequential = result.row("batched"), result.row("sequential")
    assert any(answer is not None for answer in batched.answers)
    assert batched.answers == sequential.answers  # the engines differ in speed, never in answers
    table = format_table(result).splitlines()
    assert len([line for line in table if line.startswith(("(b) inproc", "(c) sequential", "(d) batched"))]) == 3
    floor = floor_seconds(batched.input_computed, batched.output_tokens, result.rates.prompt_tps,
                          result.rates.decode_tps)
    assert any(f"= {floor:.1f} s" in line for line in table)
    assert "(c) vs (d) identical answers: 3/3 (100.0%)" in table
    assert any("first 2 of the 3 examples" in line for line in table)
    assert sorted(result.rates.class_decode_tps) == list(range(256, 2049, 256))
    # its decoded tokens, per KV class, priced at the measured class rates
    assert batched.decoded_by_class and set(batched.decoded_by_class) <= set(result.rates.class_decode_tps)
    assert any(line.startswith("exact-layout floor for (d)") for line in table)
