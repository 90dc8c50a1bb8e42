"""`chainopt bench`: what chainopt buys over stock DSPy on a local llama.cpp model, in one table.

Rows, measured in the same run on the same examples, each in a fresh process (so peak RSS belongs to
that path alone and no path's KV or response cache helps another): the stock server and in-process
paths and chainopt's sequential and batched engines (optimize.bench.paths), each running the workload
through chainopt's trial runner.

The compute floor is what raw llama.cpp needs for the tokens the chainopt row had to compute:
its computed input at the measured prompt-processing rate plus its output at the measured
batched decode rate (`floor_seconds`), both measured in the workload's own context (its prompt
length) in llama.cpp's fastest layout for it (optimize.bench.rates), at the start and the end of the
run. chainopt's ratio to it says how much is left to win. The exact-layout floor
(`exact_floor_seconds`) prices each token the batched engine decoded at the rate raw llama.cpp
decodes its KV class in the engine's own layout (one KV stream per sequence, a full batch of one
class per llama_decode: what keeps answers equal to the sequential engine's), so it says how much is
left to win without changing answers.

Each measurement is a child `chainopt bench --child ROW` (a hidden mode of the command line), which
writes its result as JSON for this parent.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from optimize.bench.report import format_table
from optimize.bench.workloads import (LETTER, PATHS, STOCK, WORKLOADS, BenchResult, Rates, Row, best_rates,
                                      exact_floor_seconds, floor_seconds, from_json, identical_rate, speedup)
from optimize.errors import ConfigError
from optimize.llm.models import DEFAULT_MODEL

__all__ = ["CHILDREN", "PATHS", "WORKLOADS", "BenchResult", "Rates", "Row", "best_rates", "exact_floor_seconds",
           "floor_seconds", "format_table", "from_json", "identical_rate", "measure", "run_bench", "speedup"]

CHILDREN = ("rates", *PATHS)  # what one child process measures
MAX_PARALLEL = 64  # the most threads and batched sequences a trial takes (EvalConfig.threads, ModelConfig.parallel)


def measure(child: str, workload: str, *, n: int | None = None, parallel: int = 16, model: str = DEFAULT_MODEL,
            seed: int = 0) -> dict[str, Any]:
    """One child's measurement, as the JSON data its parent reads: the rates, or one path's row."""
    if child == "rates":
        from optimize.bench.rates import measure_rates

        return asdict(measure_rates(model, workload=workload, parallel=parallel))
    from optimize.bench.paths import run_path

    return asdict(run_path(child, workload, n or WORKLOADS[workload].n, parallel=parallel, model=model, seed=seed))


def _child(args: list[str], timeout: float | None) -> dict[str, Any]:
    """Run `python -m optimize bench --child ...` in a fresh process; its JSON result, or {'error': ...}.

    It runs from the source tree this package is in, so the child measures this code; it gets its own
    process group, so a timeout also stops the llama_cpp.server it started."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        proc = subprocess.Popen([sys.executable, "-m", "optimize", "bench", *args, "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parents[2], start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"error": f"timed out after {timeout:.0f} s"}
        except BaseException:  # Ctrl-C reaches only this process group: stop the child's too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        if proc.returncode != 0 or not out.exists():
            lines = [line for line in stderr.strip().splitlines() if line.strip()]
            return {"error": f"failed: {lines[-1] if lines else f'exit code {proc.returncode}'}"}
        return json.loads(out.read_text())


def _machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"


def run_bench(workload: str = "banking77", *, n: int | None = None, stock_limit: int | None = None,
              paths: tuple[str, ...] | None = None, parallel: int = 16, model: str = DEFAULT_MODEL,
              seed: int = 0, timeout: float | None = None,
              progress: Callable[[str], None] = lambda line: None) -> BenchResult:
    """Measure every row in its own fresh process, on the same examples, between two measures of the floor rates.

    `stock_limit` runs the stock rows on the first examples only (they are slow); s/example stays
    comparable. `timeout` bounds each row; a row that fails or times out is reported, not fatal.
    """
    if workload not in WORKLOADS:
        raise ConfigError(f"unknown workload {workload!r}; available: {', '.join(WORKLOADS)}")
    spec = WORKLOADS[workload]
    paths = paths or spec.paths
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ConfigError(f"unknown path(s) {', '.join(unknown)}; available: {', '.join(PATHS)}")
    if not 1 <= parallel <= MAX_PARALLEL:
        raise ConfigError(f"parallel must be between 1 and {MAX_PARALLEL}, got {parallel}")
    n = n or spec.n
    stock_n = min(n, stock_limit or n)
    common = ["--workload", workload, "--parallel", str(parallel), "--model", model, "--seed", str(seed)]
    progress("measuring raw llama.cpp rates")
    measured = [_child(["--child", "rates", *common], timeout)]
    rows = []
    for path in paths:
        size = stock_n if path in STOCK else n
        progress(f"({LETTER[path]}) {path}: {size} examples")
        data = _child(["--child", path, "--n", str(size), *common], timeout)
        rows.append(from_json(Row, data) if "path" in data else Row(path=path, error=data["error"]))
    progress("measuring raw llama.cpp rates again")
    measured.append(_child(["--child", "rates", *common], timeout))
    rates = best_rates([from_json(Rates, m) for m in measured if "error" not in m])
    return BenchResult(workload=workload, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                       machine=_machine(), model=model, n=n, stock_n=stock_n, parallel=parallel,
                       rates=rates, rows=rows)
