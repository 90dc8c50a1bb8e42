"""The bench's text: one table of the rows, then the compute floors, the (c) vs (d) agreement and notes."""

from __future__ import annotations

from optimize.bench.workloads import (CHAINOPT_N_CTX, LETTER, N_CTX, STOCK, BenchResult, Row, exact_floor_seconds,
                                      floor_seconds, identical_rate, speedup)
from optimize.tables import table

HEADERS = ["path", "n", "s/ex", "x vs a", "x vs b", "in comp/ex", "in reused/ex", "out/ex", "accuracy", "parse fail",
           "peak RSS MiB", "adapter"]


def _cell(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _name(row: Row) -> str:
    return f"({LETTER[row.path]}) {row.path}"


def _cells(row: Row, a: Row | None, b: Row | None) -> list[str]:
    per = lambda count: None if count is None else count / row.n
    computed = _cell(per(row.input_computed), ".1f") if row.input_computed is not None \
        else "<=" + _cell(per(row.input_tokens), ".1f")
    rss = _cell(row.peak_rss_mb, ".0f") + (f" + server {row.server_rss_mb:.0f}" if row.server_rss_mb else "")
    return [_name(row), str(row.n), _cell(row.s_per_example, ".3f"), _cell(speedup(a, row), ".1f", "x"),
            _cell(speedup(b, row), ".1f", "x"), computed, _cell(per(row.input_reused), ".1f"),
            _cell(per(row.output_tokens), ".1f"), f"{row.accuracy:.1%}", f"{row.parse_failures}/{row.n}", rss,
            row.adapter]


def format_table(result: BenchResult) -> str:
    """The measured rows in one table; a row that failed is one line under it (its message, no columns)."""
    a, b = result.row("server"), result.row("inproc")
    out = [f"chainopt bench: workload {result.workload}, model {result.model}, {result.date}",
           (f"machine: {result.machine}; chainopt rows: parallel={result.parallel}, n_ctx={CHAINOPT_N_CTX}; "
            f"stock rows: n_ctx={N_CTX}; DSPy cache off, temperature 0"),
           table(HEADERS, [_cells(row, a, b) for row in result.rows if row.error is None])]
    out += [f"{_name(row)}: {row.error}" for row in result.rows if row.error is not None]
    out.append("")
    out.extend(_floor_lines(result))
    c, d = result.row("sequential"), result.row("batched")
    if c and d:
        same, compared = identical_rate(c.answers, d.answers)
        out.append(f"(c) vs (d) identical answers: {same}/{compared} ({same / compared:.1%})")
    stock = [r for r in result.rows if r.path in STOCK and r.error is None]
    if stock and result.stock_n < result.n:
        out.append(f"note: stock rows ran on the first {result.stock_n} of the {result.n} examples (--stock-limit); "
                   "s/example and per-example tokens stay comparable, accuracy is over fewer examples")
    if any(r.input_computed is None for r in result.rows if r.error is None):
        out.append("note: the server path cannot tell computed from KV-reused input; '<=' shows all input tokens")
    out.append("note: stock rows evaluate with 1 DSPy thread (as stock_baseline.py), llama.cpp threads = cores")
    return "\n".join(out)


def _floor_lines(result: BenchResult) -> list[str]:
    rates = result.rates
    if rates is None:
        return ["compute floor: rates could not be measured"]
    lines = [(f"raw llama.cpp (best of the start and the end of the run; {rates.parallel} sequences sharing the "
              f"workload's {rates.context}-token prompt, one unified KV cache): prompt {rates.prompt_tps:.0f} tok/s "
              f"({rates.suffix} new tokens each, one llama_decode), batched decode {rates.decode_tps:.0f} tok/s "
              f"({rates.steps} steps)")]
    target = result.row("batched") or result.row("sequential")
    if target is None or target.input_computed is None:
        return lines + ["compute floor: no chainopt row to compare"]
    floor = floor_seconds(target.input_computed, target.output_tokens, rates.prompt_tps, rates.decode_tps)
    lines.append(f"compute floor for ({LETTER[target.path]}): {target.input_computed} computed input tokens at the "
                 f"prompt rate + {target.output_tokens} output tokens at the decode rate = {floor:.1f} s "
                 f"({floor / target.n:.3f} s/ex); chainopt took {target.seconds:.1f} s = "
                 f"{target.seconds / floor:.2f}x the floor")
    b = result.row("inproc")
    if b is not None and b.s_per_example:
        lines.append(f"at the floor, ({LETTER[target.path]}) would be {b.s_per_example / (floor / target.n):.1f}x (b): "
                     "the most any engine computing these tokens at these rates could reach")
    return lines + _exact_floor_lines(result, target, b)


def _exact_floor_lines(result: BenchResult, target: Row, b: Row | None) -> list[str]:
    rates, decoded = result.rates, target.decoded_by_class
    if rates is None or not decoded or target.input_computed is None:
        return []
    exact = exact_floor_seconds(target.input_computed, rates.prompt_tps, decoded, rates.class_decode_tps)
    if exact is None:
        return [f"exact-layout floor: KV classes {sorted(set(decoded) - set(rates.class_decode_tps))} not measured"]
    per_class = ", ".join(f"{c} cells {n} tokens at {rates.class_decode_tps[c]:.0f} tok/s" for c, n in decoded.items())
    lines = [(f"exact-layout floor for ({LETTER[target.path]}) (one KV stream per sequence, {rates.parallel} "
              f"sequences of one KV class per llama_decode, the layout that keeps answers equal to the sequential "
              f"engine's): {target.input_computed} computed input tokens at the prompt rate + decoded tokens per KV "
              f"class ({per_class}) = {exact:.1f} s ({exact / target.n:.3f} s/ex); chainopt took "
              f"{target.seconds / exact:.2f}x it")]
    if b is not None and b.s_per_example:
        lines.append(f"at the exact-layout floor, ({LETTER[target.path]}) would be "
                     f"{b.s_per_example / (exact / target.n):.1f}x (b): the most an engine with answers equal to "
                     "the sequential engine's could reach here")
    return lines
