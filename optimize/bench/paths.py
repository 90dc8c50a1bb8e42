"""The bench's four paths, each measured in its own child process through chainopt's trial runner.

  server      stock: dspy.LM("openai/local") -> LiteLLM -> `python -m llama_cpp.server`, ChatAdapter
  inproc      stock: a plain dspy.BaseLM calling Llama.create_chat_completion behind a lock,
              JSONAdapter with the schema grammar
  sequential  chainopt's engine, one llama.cpp context (optimize.llm.sequential)
  batched     chainopt's batched engine (optimize.llm.batched)

A path is only an LM, an adapter and a way to count tokens: the workload runs as a `Trial` through
`optimize.trial.run_trial`, so compile, evaluation, success and parse failures mean what they mean in
`chainopt run`. The stock rows mirror ../shared/bench/stock_baseline.py: DSPy evaluates them with 1
thread, as a user would; chainopt rows use `parallel` threads. DSPy's cache is off, temperature is 0.
"""

from __future__ import annotations

import contextlib
import os
import resource
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import dspy

from optimize import cost
from optimize.bench.workloads import CHAINOPT_N_CTX, MAX_TOKENS, N_CTX, STOCK, WORKLOADS, Row, Workload
from optimize.config import BudgetConfig, CostConfig, DataConfig, EvalConfig, OptimizerConfig, ProgramConfig, Trial
from optimize.data import load_splits
from optimize.llm.adapter import CacheFriendlyAdapter
from optimize.llm.engine import build_lm, get_engine
from optimize.llm.models import DEFAULT_MODEL, describe
from optimize.llm.settings import ModelConfig
from optimize.trial import run_trial

Counts = tuple[int, int | None, int, int]  # input tokens, computed input (None: unknown), output tokens, calls


@dataclass
class Setup:
    """A path's LM and adapter and how it counts what it spent; its context manager stops what it started."""

    lm: dspy.BaseLM
    adapter: dspy.Adapter
    usage: Callable[[], Counts]
    server_rss: Callable[[], float | None] = lambda: None
    decoded: Callable[[], dict[int, int] | None] = lambda: None  # tokens decoded per KV class, batched only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _vm_hwm_mb(pid: int) -> float | None:
    """Peak RSS of another live process (Linux /proc), read before it is stopped."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def _server(cfg: ModelConfig) -> Iterator[Setup]:
    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", describe(cfg.spec).path, "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(cfg.n_ctx), "--n_threads", str(os.cpu_count() or 1),
           "--model_alias", "local"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("llama_cpp.server did not start (is llama-cpp-python[server] installed?)")
                time.sleep(0.5)
        lm = dspy.LM("openai/local", api_base=f"http://127.0.0.1:{port}/v1", api_key="local",
                     temperature=0.0, max_tokens=cfg.max_tokens, cache=False, num_retries=0)

        def usage() -> Counts:
            entries = [e.get("usage") or {} for e in lm.history]
            return (sum(u.get("prompt_tokens", 0) for u in entries), None,
                    sum(u.get("completion_tokens", 0) for u in entries), len(lm.history))

        yield Setup(lm, dspy.ChatAdapter(), usage, lambda: _vm_hwm_mb(server.pid))
    finally:
        # uvicorn does not stop while llama.cpp is mid-generation (it may be decoding to n_ctx): kill it.
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@contextlib.contextmanager
def _inproc(cfg: ModelConfig) -> Iterator[Setup]:
    import llama_cpp
    from openai.types.chat import ChatCompletion

    llm = llama_cpp.Llama(model_path=describe(cfg.spec).path, n_ctx=cfg.n_ctx, n_threads=os.cpu_count(),
                          verbose=False)
    lock = threading.Lock()
    totals = {"input": 0, "computed": 0, "output": 0, "calls": 0}
    first_eval = [False]
    stock_eval = llm.eval

    def counting_eval(tokens):
        # Llama.generate evaluates the prompt minus the prefix its context already holds in one
        # eval call, then one call per sampled token: the first call's size is the computed input.
        if first_eval[0]:
            totals["computed"] += len(tokens)
            first_eval[0] = False
        return stock_eval(tokens)

    llm.eval = counting_eval

    class LlamaInProcess(dspy.BaseLM):
        supports_response_schema = property(lambda self: True)
        supported_params = property(lambda self: {"response_format"})

        def forward(self, prompt=None, messages=None, **kwargs):
            fmt = kwargs.get("response_format")
            if fmt is not None and hasattr(fmt, "model_json_schema"):
                fmt = {"type": "json_object", "schema": fmt.model_json_schema()}
            with lock:
                first_eval[0] = True
                out = llm.create_chat_completion(messages=messages, temperature=0.0, response_format=fmt,
                                                 max_tokens=kwargs.get("max_tokens") or cfg.max_tokens)
                totals["input"] += out["usage"]["prompt_tokens"]
                totals["output"] += out["usage"]["completion_tokens"]
                totals["calls"] += 1
            return ChatCompletion.model_validate(out)

    try:
        yield Setup(LlamaInProcess("local", cache=False, max_tokens=cfg.max_tokens), dspy.JSONAdapter(),
                    lambda: (totals["input"], totals["computed"], totals["output"], totals["calls"]))
    finally:
        llm.close()


@contextlib.contextmanager
def _chainopt(cfg: ModelConfig) -> Iterator[Setup]:
    lm, engine = build_lm(cfg), get_engine(cfg)

    def decoded() -> dict[int, int] | None:
        counts = getattr(engine.backend, "decoded", None)
        return None if counts is None else dict(sorted(counts.items()))

    try:
        with cost.metered("bench", all_threads=True) as tally:
            # (c) and (d) share chainopt's adapter, so their answers differ only by engine.
            yield Setup(lm, CacheFriendlyAdapter(), lambda: (tally.usage.input_tokens, tally.usage.input_computed,
                                                             tally.usage.output, tally.usage.calls), decoded=decoded)
    finally:
        engine.close()


SETUPS: dict[str, Callable[[ModelConfig], contextlib.AbstractContextManager[Setup]]] = {
    "server": _server, "inproc": _inproc, "sequential": _chainopt, "batched": _chainopt}


def bench_trial(path: str, workload: Workload, n: int, *, parallel: int, model: str, seed: int) -> Trial:
    """The workload as one trial on `path`'s model settings: stock rows as stock_baseline.py runs them (its
    n_ctx, 1 evaluation thread), chainopt rows on their engine with `parallel` threads."""
    stock = path in STOCK
    model_cfg = ModelConfig(spec=model, n_ctx=N_CTX if stock else CHAINOPT_N_CTX, max_tokens=MAX_TOKENS,
                            seed=seed, cache=False, engine="batched" if path == "batched" else "sequential",
                            parallel=parallel, stream_cells=CHAINOPT_N_CTX)
    return Trial(experiment=f"bench-{workload.name}", model=model_cfg,
                 data=DataConfig(dataset=workload.dataset, train=workload.train, dev=0, test=n, seed=seed),
                 program=ProgramConfig(name=workload.program),
                 optimizer=OptimizerConfig(name=workload.optimizer, settings=workload.optimizer_settings),
                 seed=seed, budget=BudgetConfig(), cost=CostConfig(), eval=EvalConfig(threads=1 if stock else parallel))


def run_path(path: str, workload: str, n: int, *, parallel: int = 16, model: str = DEFAULT_MODEL,
             seed: int = 0) -> Row:
    """Measure one row in this process: the workload's trial (its compile, then `n` test examples) on this
    path's LM and adapter. Seconds are the trial's compile plus evaluation, not loading the model."""
    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    trial = bench_trial(path, WORKLOADS[workload], n, parallel=parallel, model=model, seed=seed)
    splits = load_splits(trial.data)
    with contextlib.ExitStack() as stack:
        try:
            setup = stack.enter_context(SETUPS[path](trial.model))
        except ImportError as exc:
            return Row(path=path, error=f"not available: {exc}")
        outcome = run_trial(trial, splits, live=False, lm=setup.lm, adapter_=setup.adapter)
        input_tokens, computed, output, calls = setup.usage()
        server_rss, decoded = setup.server_rss(), setup.decoded()
    metrics, records = outcome.metrics, outcome.records
    return Row(path=path, n=len(records), seconds=metrics["compile_seconds"] + metrics["seconds_total"],
               accuracy=metrics["accuracy"], parse_failures=int(metrics["parse_failures"]), input_tokens=input_tokens,
               input_computed=computed, output_tokens=output, calls=calls,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               server_rss_mb=server_rss, adapter=type(setup.adapter).__name__,
               answers=[None if r.predicted is None else str(r.predicted) for r in records],
               decoded_by_class=decoded)
