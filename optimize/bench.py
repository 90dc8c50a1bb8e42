"""`chainopt bench`: what chainopt buys over stock DSPy on a local llama.cpp model, in one table.

Rows, measured in the same run on the same examples, each in a fresh subprocess (so peak RSS
belongs to that path alone and no path's KV or response cache helps another):

  server      stock: dspy.LM("openai/local") -> LiteLLM -> `python -m llama_cpp.server`, ChatAdapter
  inproc      stock: a plain dspy.BaseLM calling Llama.create_chat_completion behind a lock,
              JSONAdapter with the schema grammar
  sequential  chainopt's engine, one llama.cpp context (optimize.engine)
  batched     chainopt's batched engine (optimize.batching)

The stock rows mirror ../shared/bench/stock_baseline.py: DSPy evaluates them with 1 thread, as a
user would; chainopt rows use `parallel` threads. DSPy's cache is off, temperature is 0.

The compute floor is what raw llama.cpp needs for the tokens the chainopt row had to compute:
its computed input at the measured prompt-processing rate plus its output at the measured
batched decode rate (`floor_seconds`), both measured in the workload's own context (its prompt
length) in llama.cpp's fastest layout for it (`measure_rates`). chainopt's ratio to it says how
much is left to win. The exact-layout floor (`exact_floor_seconds`) prices each token the batched
engine decoded at the rate raw llama.cpp decodes its KV class in the engine's own layout (one KV
stream per sequence, a full batch of one class per llama_decode: what keeps answers equal to the
sequential engine's), so it says how much is left to win without changing answers.

Run: python -m optimize.bench --workload banking77 --n 200 --stock-limit 20
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

PATHS = ("server", "inproc", "sequential", "batched")
STOCK = ("server", "inproc")
LETTER = {"server": "a", "inproc": "b", "sequential": "c", "batched": "d"}
N_CTX = 4096  # stock_baseline's value, for the stock rows
# chainopt's rows: every call of these workloads fits (the longest, bootstrap's few-shot prompts, ~1,600
# tokens plus the answer), and each batched slot holds n_ctx KV cells, so 4096 would leave room for 10
# slots in the default KV budget instead of 16. The sequential row gets the same, so (c) and (d) compare.
CHAINOPT_N_CTX = 2048
# stock_baseline's value, asked by every row. The server path does not get it: DSPy's "openai" preset
# sends max_completion_tokens, which llama_cpp.server ignores, so it decodes to EOS or n_ctx (as stock does).
MAX_TOKENS = 200


@dataclass(frozen=True)
class Workload:
    """A named benchmark: which data and program, which rows by default, how many examples."""

    name: str
    dataset: str
    program: str
    paths: tuple[str, ...]
    n: int
    train: int = 0  # examples BootstrapFewShot compiles on; 0 = evaluation only


WORKLOADS = {
    "banking77": Workload("banking77", "banking77", "intent.predict", PATHS, 200),
    "gsm8k-chain": Workload("gsm8k-chain", "gsm8k", "math.chain", ("inproc", "batched"), 100),
    "bootstrap": Workload("bootstrap", "banking77", "intent.predict", ("inproc", "batched"), 200, train=50),
}


@dataclass
class Row:
    """One path's measurements; token counts are totals over the row's examples."""

    path: str
    n: int = 0
    seconds: float = 0.0
    accuracy: float = 0.0  # fraction of examples the metric accepts
    parse_failures: int = 0
    input_tokens: int = 0
    input_computed: int | None = None  # None: the path cannot tell computed from KV-reused tokens
    output_tokens: int = 0
    calls: int = 0
    peak_rss_mb: float = 0.0
    server_rss_mb: float | None = None
    adapter: str = ""
    answers: list[str | None] = field(default_factory=list)
    error: str | None = None
    decoded_by_class: dict[int, int] | None = None  # the batched engine's decoded tokens per KV class

    @property
    def s_per_example(self) -> float:
        return self.seconds / self.n if self.n else float("nan")

    @property
    def input_reused(self) -> int | None:
        return None if self.input_computed is None else self.input_tokens - self.input_computed


@dataclass(frozen=True)
class Rates:
    """Raw llama.cpp throughput on this machine, measured with the low-level API (see measure_rates)."""

    prompt_tps: float
    decode_tps: float
    context: int  # tokens already in the KV cache: the workload's prompt length
    suffix: int  # prompt tokens each sequence adds
    parallel: int
    steps: int
    class_decode_tps: dict[int, float] = field(default_factory=dict)  # per KV class, one stream per sequence


def _from_json(cls: type, data: dict[str, Any]) -> Any:
    """A Row or Rates from a child's JSON, which turned the KV classes (int keys) into strings."""
    for name in ("decoded_by_class", "class_decode_tps"):
        if data.get(name):
            data[name] = {int(key): value for key, value in data[name].items()}
    return cls(**data)


@dataclass
class BenchResult:
    workload: str
    date: str
    machine: str
    model: str
    n: int
    stock_n: int
    parallel: int
    rates: Rates | None
    rows: list[Row]

    def row(self, path: str) -> Row | None:
        return next((r for r in self.rows if r.path == path and r.error is None), None)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- arithmetic (pure, unit-tested)

def floor_seconds(input_computed: int, output_tokens: int, prompt_tps: float, decode_tps: float) -> float:
    """Time raw llama.cpp needs for these tokens: prompt at the prefill rate, output at the batched decode rate."""
    return input_computed / prompt_tps + output_tokens / decode_tps


def exact_floor_seconds(input_computed: int, prompt_tps: float, decoded_by_class: dict[int, int],
                        class_decode_tps: dict[int, float]) -> float | None:
    """Time raw llama.cpp needs for these tokens in the layout that keeps answers exact: prompt at the
    prefill rate, each decoded token at its KV class's batched rate (a token attends over its class's
    cells, so long contexts decode slower). None when a class the engine used was not measured."""
    if any(kv_class not in class_decode_tps for kv_class in decoded_by_class):
        return None
    return input_computed / prompt_tps + sum(n / class_decode_tps[c] for c, n in decoded_by_class.items())


def best_rates(measured: list[Rates]) -> Rates | None:
    """The fastest prompt and decode rates seen. The floor is a lower bound on time, and on a shared CPU
    a slow measurement says more about the neighbours than about llama.cpp, so the best one is the fair one."""
    if not measured:
        return None
    best = max(measured, key=lambda r: r.prompt_tps)
    per_class = {c: max(r.class_decode_tps[c] for r in measured if c in r.class_decode_tps)
                 for c in sorted({c for r in measured for c in r.class_decode_tps})}
    return Rates(**{**asdict(best), "decode_tps": max(r.decode_tps for r in measured), "class_decode_tps": per_class})


def speedup(reference: Row | None, row: Row) -> float | None:
    """How many times faster per example `row` is than `reference`; None when either is missing."""
    if reference is None or row.error is not None or not row.n or not reference.n:
        return None
    return reference.s_per_example / row.s_per_example


def identical_rate(a: list[str | None], b: list[str | None]) -> tuple[int, int]:
    """(identical, compared) over the examples both rows answered, in order."""
    pairs = list(zip(a, b))
    return sum(x == y for x, y in pairs), len(pairs)


# ---------------------------------------------------------------- the four paths (run in a child)

@dataclass
class Setup:
    """A path's LM and adapter, how it counts tokens, and what to stop when done."""

    lm: Any
    adapter: Any
    threads: int
    usage: Callable[[], tuple[int, int | None, int, int]]  # input, computed-or-None, output, calls
    close: Callable[[], None] = lambda: None
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


def _setup_server(model_path: str, parallel: int) -> Setup:
    import dspy

    port = _free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", model_path, "--host", "127.0.0.1",
           "--port", str(port), "--n_ctx", str(N_CTX), "--n_threads", str(os.cpu_count() or 1),
           "--model_alias", "local"]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                server.kill()
                raise RuntimeError("llama_cpp.server did not start (is llama-cpp-python[server] installed?)")
            time.sleep(0.5)
    lm = dspy.LM("openai/local", api_base=f"http://127.0.0.1:{port}/v1", api_key="local",
                 temperature=0.0, max_tokens=MAX_TOKENS, cache=False, num_retries=0)

    def usage() -> tuple[int, int | None, int, int]:
        entries = [e.get("usage") or {} for e in lm.history]
        return (sum(u.get("prompt_tokens", 0) for u in entries), None,
                sum(u.get("completion_tokens", 0) for u in entries), len(lm.history))

    def close() -> None:
        # uvicorn does not stop while llama.cpp is mid-generation (it may be decoding to n_ctx): kill it.
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()

    return Setup(lm, dspy.ChatAdapter(), 1, usage, close, lambda: _vm_hwm_mb(server.pid))


def _setup_inproc(model_path: str, parallel: int) -> Setup:
    import dspy
    import llama_cpp
    from openai.types.chat import ChatCompletion

    llm = llama_cpp.Llama(model_path=model_path, n_ctx=N_CTX, n_threads=os.cpu_count(), verbose=False)
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
                                                 max_tokens=kwargs.get("max_tokens") or MAX_TOKENS)
                totals["input"] += out["usage"]["prompt_tokens"]
                totals["output"] += out["usage"]["completion_tokens"]
                totals["calls"] += 1
            return ChatCompletion.model_validate(out)

    lm = LlamaInProcess("local", cache=False, max_tokens=MAX_TOKENS)
    return Setup(lm, dspy.JSONAdapter(), 1,
                 lambda: (totals["input"], totals["computed"], totals["output"], totals["calls"]), llm.close)


def _setup_chainopt(engine: Literal["sequential", "batched"]) -> Callable[[str, int], Setup]:
    def setup(model_path: str, parallel: int) -> Setup:
        from optimize import cost
        from optimize.llm.adapter import CacheFriendlyAdapter
        from optimize.llm.settings import ModelConfig
        from optimize.llm.engine import build_lm, get_engine

        cfg = ModelConfig(spec=model_path, n_ctx=CHAINOPT_N_CTX, max_tokens=MAX_TOKENS, cache=False,
                          engine=engine, parallel=parallel)
        lm = build_lm(cfg)
        scope = cost.metered("bench", all_threads=True)
        tally = scope.__enter__()

        def usage() -> tuple[int, int | None, int, int]:
            u = tally.usage
            return u.input_tokens, u.input_computed, u.output, u.calls

        def close() -> None:
            scope.__exit__(None, None, None)
            get_engine(cfg).close()

        def decoded() -> dict[int, int] | None:
            counts = getattr(get_engine(cfg).backend, "decoded", None)
            return None if counts is None else dict(sorted(counts.items()))

        # (c) and (d) share chainopt's adapter, so their answers differ only by engine.
        return Setup(lm, CacheFriendlyAdapter(), parallel, usage, close, decoded=decoded)

    return setup


SETUPS: dict[str, Callable[[str, int], Setup]] = {
    "server": _setup_server,
    "inproc": _setup_inproc,
    "sequential": _setup_chainopt("sequential"),
    "batched": _setup_chainopt("batched"),
}


def run_path(path: str, workload: str, n: int, *, parallel: int = 16, model: str = "smollm2-135m",
             seed: int = 0) -> Row:
    """Measure one row in this process: compile (bootstrap workload), then evaluate `n` test examples
    with chainopt's evaluation loop, so success and parse failures mean what they mean in `chainopt run`."""
    import dspy

    from optimize.config import DataConfig
    from optimize.data import load_splits
    from optimize.evaluate import evaluate
    from optimize.llm.models import describe
    from optimize.trial import get_program

    dspy.configure_cache(enable_disk_cache=False, enable_memory_cache=False)
    spec = WORKLOADS[workload]
    splits = load_splits(DataConfig(dataset=spec.dataset, train=spec.train, test=n, seed=seed))
    program_spec = get_program(spec.program)
    metric, answer_field = program_spec.metric(splits.task), splits.task.answer_field
    try:
        setup = SETUPS[path](describe(model).path, parallel)
    except ImportError as exc:
        return Row(path=path, error=f"not available: {exc}")
    try:
        with dspy.context(lm=setup.lm, adapter=setup.adapter):
            program = program_spec.build(splits.task)
            start = time.perf_counter()
            if splits.train:
                program = dspy.BootstrapFewShot(metric=metric).compile(program, trainset=splits.train)
            records = evaluate(program, splits.test, metric, answer_field, threads=setup.threads).records
            seconds = time.perf_counter() - start
        input_tokens, computed, output, calls = setup.usage()
        server_rss, decoded = setup.server_rss(), setup.decoded()
    finally:
        setup.close()
    return Row(path=path, n=len(records), seconds=seconds, accuracy=sum(r.success for r in records) / len(records),
               parse_failures=sum(r.parse_failure for r in records), input_tokens=input_tokens,
               input_computed=computed, output_tokens=output, calls=calls,
               peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               server_rss_mb=server_rss, adapter=type(setup.adapter).__name__,
               answers=[None if r.predicted is None else str(r.predicted) for r in records],
               decoded_by_class=decoded)


def workload_context(workload: str, llm) -> int:
    """Prompt tokens of the workload's first call (chainopt's adapter, the model's chat template): the
    context that the tokens a chainopt row computes attend over."""
    from optimize.llm.adapter import CacheFriendlyAdapter
    from optimize.config import DataConfig
    from optimize.data import load_splits
    from optimize.llm.engine import chat_formatter
    from optimize.trial import get_program

    spec = WORKLOADS[workload]
    splits = load_splits(DataConfig(dataset=spec.dataset, train=0, test=1, seed=0))
    signature = get_program(spec.program).build(splits.task).predictors()[0].signature
    example = splits.test[0]
    inputs = {name: example.get(name, "") for name in signature.input_fields}
    messages = CacheFriendlyAdapter().format(signature, demos=[], inputs=inputs)
    prompt = chat_formatter(llm)(messages=messages).prompt
    return len(llm.tokenize(prompt.encode("utf-8"), add_bos=False, special=True))


def measure_rates(model: str = "smollm2-135m", *, workload: str = "banking77", parallel: int = 16,
                  suffix: int = 32, steps: int = 32, class_steps: int = 16) -> Rates:
    """Raw llama.cpp rates in the workload's own regime, with the engine's thread count, no sampling, no
    Python between tokens.

    Prompt and decode, in llama.cpp's fastest layout for them (one unified KV cache, the context's cells
    shared by every sequence without a copy): `parallel` sequences share a context as long as the
    workload's prompt (`workload_context`); each adds `suffix` tokens, all in one llama_decode, then
    advances one token per llama_decode for `steps` steps (each best of two). Attention over the context
    is part of every token's cost, so rates measured on a short context would make a floor no engine can
    reach on long prompts. Then per KV class, in the batched engine's layout (`class_rates`).
    """
    import llama_cpp

    from optimize.llm.models import describe

    threads = os.cpu_count() or 1
    llm = llama_cpp.Llama(model_path=describe(model).path, n_ctx=256, n_threads=threads, verbose=False)
    context = workload_context(workload, llm)
    text = " ".join(f"Query {i}: how do I top up my card with a transfer from abroad?" for i in range(200))
    tokens = llm.tokenize(text.encode())
    tokens *= max(context + suffix + steps, CHAINOPT_N_CTX) // len(tokens) + 1  # as long as the contexts need
    try:
        with _raw_context(llm, n_ctx=context + parallel * (suffix + steps) + 256, n_batch=max(512, parallel * suffix),
                          n_seq_max=parallel, unified=True) as (decode, memory):
            for start in range(0, context, 512):
                decode([(tokens[k], k, 0, False) for k in range(start, min(start + 512, context))])
            for seq in range(1, parallel):
                llama_cpp.llama_memory_seq_cp(memory, 0, seq, -1, -1)
            prompt_s = _best_seconds(
                lambda: _trim(memory, parallel, context),
                lambda: decode([(tokens[context + (seq + k) % suffix], context + k, seq, k == suffix - 1)
                                for seq in range(parallel) for k in range(suffix)]))
            decode_s = _best_seconds(
                lambda: _trim(memory, parallel, context + suffix),
                lambda: [decode([(tokens[(k * parallel + s) % len(tokens)], context + suffix + k, s, True)
                                 for s in range(parallel)]) for k in range(steps)])
        per_class = class_rates(llm, tokens, parallel=parallel, cells=CHAINOPT_N_CTX, steps=class_steps)
    finally:
        llm.close()
    return Rates(prompt_tps=parallel * suffix / prompt_s, decode_tps=parallel * steps / decode_s,
                 context=context, suffix=suffix, parallel=parallel, steps=steps, class_decode_tps=per_class)


def class_rates(llm, tokens: list[int], *, parallel: int, cells: int, steps: int) -> dict[int, float]:
    """Batched decode rate per KV class, in the batched engine's layout: `parallel` sequences, one KV stream
    of `cells` cells each, all of one class in one llama_decode. For each class (a multiple of KV_PAD),
    every stream holds `class - steps` tokens and decodes `steps` more, so each step attends over exactly
    the class's padded length, as the engine's tokens of that class do (best of two)."""
    import llama_cpp

    from optimize.llm.batched import KV_PAD

    assert steps < KV_PAD
    rates: dict[int, float] = {}
    source = parallel  # an extra stream computes the longest context once; the others copy it
    with _raw_context(llm, n_ctx=(parallel + 1) * cells, n_batch=512, n_seq_max=parallel + 1,
                      unified=False) as (decode, memory):
        longest = cells - steps
        for start in range(0, longest, 512):
            decode([(tokens[k], k, source, False) for k in range(start, min(start + 512, longest))])
        for kv_class in range(KV_PAD, cells + 1, KV_PAD):
            held = kv_class - steps
            for seq in range(parallel):  # a whole-stream copy, trimmed (as the engine shares prefixes)
                llama_cpp.llama_memory_seq_rm(memory, seq, -1, -1)
                llama_cpp.llama_memory_seq_cp(memory, source, seq, -1, -1)
                llama_cpp.llama_memory_seq_rm(memory, seq, held, -1)
            # The stream data is copied at the next decode: do one, untimed (the reset drops its token).
            decode([(tokens[held], held, seq, True) for seq in range(parallel)])
            seconds = _best_seconds(
                lambda: _trim(memory, parallel, held),
                lambda: [decode([(tokens[held + k], held + k, seq, True) for seq in range(parallel)])
                         for k in range(steps)])
            rates[kv_class] = parallel * steps / seconds
    return rates


def _trim(memory, n_seqs: int, keep: int) -> None:
    """Drop every sequence's tokens from position `keep` on, so a timed run starts from the same cache."""
    import llama_cpp

    for seq in range(n_seqs):
        llama_cpp.llama_memory_seq_rm(memory, seq, keep, -1)


def _best_seconds(reset: Callable[[], None], run: Callable[[], Any], tries: int = 2) -> float:
    """The fastest of `tries` timed runs, each after `reset`: on a shared CPU the slow ones measure the neighbours."""
    best = float("inf")
    for _ in range(tries):
        reset()
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


@contextlib.contextmanager
def _raw_context(llm, *, n_ctx: int, n_batch: int, n_seq_max: int, unified: bool):
    """A bare llama.cpp context on `llm`'s weights, as the engine sets it up (threads = cores, flash attention
    off); yields a decode function for (token, pos, seq, logits) items and the context's memory."""
    import llama_cpp

    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx, n_batch, n_batch
    params.n_seq_max, params.kv_unified = n_seq_max, unified
    params.n_threads = params.n_threads_batch = os.cpu_count() or 1
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED  # as the engine runs
    ctx = llama_cpp.llama_init_from_model(llm._model.model, params)
    if not ctx:
        raise RuntimeError(f"llama.cpp could not create a context of {n_ctx} cells for measuring rates")
    batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        batch.n_tokens = len(items)
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, pos, 1
            batch.seq_id[i][0], batch.logits[i] = seq, logits
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed while measuring rates")

    try:
        yield decode, llama_cpp.llama_get_memory(ctx)
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)


# ---------------------------------------------------------------- the parent: one subprocess per row

def _child(args: list[str], timeout: float | None) -> dict[str, Any]:
    """Run `python -m optimize.bench <args>` in a fresh process; its JSON result, or {'error': ...}.

    The child gets its own process group, so a timeout also stops the llama_cpp.server it started."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        proc = subprocess.Popen([sys.executable, "-m", "optimize.bench", *args, "--out", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                cwd=Path(__file__).resolve().parent.parent, start_new_session=True)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out.exists():
            lines = [line for line in stderr.strip().splitlines() if line.strip()]
            return {"error": f"failed: {lines[-1] if lines else f'exit code {proc.returncode}'}"}
        return json.loads(out.read_text())


def _machine() -> str:
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB"


def run_bench(workload: str = "banking77", *, n: int | None = None, stock_limit: int | None = None,
              paths: tuple[str, ...] | None = None, parallel: int = 16, model: str = "smollm2-135m",
              seed: int = 0, timeout: float | None = None,
              progress: Callable[[str], None] = lambda line: None) -> BenchResult:
    """Measure every row in its own fresh process, on the same examples, between two measures of the floor rates.

    `stock_limit` runs the stock rows on the first examples only (they are slow); s/example stays
    comparable. `timeout` bounds each row; a row that fails or times out is reported, not fatal.
    """
    from optimize.errors import ConfigError

    if workload not in WORKLOADS:
        raise ConfigError(f"unknown workload {workload!r}; available: {', '.join(WORKLOADS)}")
    spec = WORKLOADS[workload]
    paths = paths or spec.paths
    unknown = [p for p in paths if p not in PATHS]
    if unknown:
        raise ConfigError(f"unknown path(s) {', '.join(unknown)}; available: {', '.join(PATHS)}")
    n = n or spec.n
    stock_n = min(n, stock_limit or n)
    common = ["--workload", workload, "--parallel", str(parallel), "--model", model, "--seed", str(seed)]
    progress("measuring raw llama.cpp rates")
    measured = [_child(["--rates", *common], timeout)]
    rows = []
    for path in paths:
        size = stock_n if path in STOCK else n
        progress(f"({LETTER[path]}) {path}: {size} examples")
        data = _child(["--path", path, "--n", str(size), *common], timeout)
        rows.append(_from_json(Row, data) if "path" in data else Row(path=path, error=data["error"]))
    progress("measuring raw llama.cpp rates again")
    measured.append(_child(["--rates", *common], timeout))
    rates = best_rates([_from_json(Rates, m) for m in measured if "error" not in m])
    return BenchResult(workload=workload, date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                       machine=_machine(), model=model, n=n, stock_n=stock_n, parallel=parallel,
                       rates=rates, rows=rows)


# ---------------------------------------------------------------- the table

def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(result: BenchResult) -> str:
    """One plain-text table, then the floor, the (c) vs (d) agreement and notes on what differs."""
    a, b = result.row("server"), result.row("inproc")
    header = ["path", "n", "s/ex", "x vs a", "x vs b", "in comp/ex", "in reused/ex", "out/ex",
              "accuracy", "parse fail", "peak RSS MiB", "adapter"]
    lines: list[list[str]] = []
    for row in result.rows:
        name = f"({LETTER[row.path]}) {row.path}"
        if row.error is not None:
            lines.append([name, row.error])
            continue
        per = lambda count: None if count is None else count / row.n
        computed = _fmt(per(row.input_computed), ".1f") if row.input_computed is not None \
            else "<=" + _fmt(per(row.input_tokens), ".1f")
        rss = _fmt(row.peak_rss_mb, ".0f") + (f" + server {row.server_rss_mb:.0f}" if row.server_rss_mb else "")
        lines.append([name, str(row.n), _fmt(row.s_per_example, ".3f"), _fmt(speedup(a, row), ".1f", "x"),
                      _fmt(speedup(b, row), ".1f", "x"), computed, _fmt(per(row.input_reused), ".1f"),
                      _fmt(per(row.output_tokens), ".1f"), f"{row.accuracy:.1%}",
                      f"{row.parse_failures}/{row.n}", rss, row.adapter])
    # An error row is a name and one message: it does not widen the columns of the measured rows.
    measured = [header, *(r for r in lines if len(r) == len(header))]
    widths = [max(len(r[i]) for r in measured) for i in range(len(header))]
    out = [f"chainopt bench: workload {result.workload}, model {result.model}, {result.date}",
           f"machine: {result.machine}; chainopt rows: parallel={result.parallel}, n_ctx={CHAINOPT_N_CTX}; "
           f"stock rows: n_ctx={N_CTX}; DSPy cache off, temperature 0",
           "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines]
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
    lines = [f"raw llama.cpp (best of the start and the end of the run; {rates.parallel} sequences sharing the "
             f"workload's {rates.context}-token prompt, one unified KV cache): prompt {rates.prompt_tps:.0f} tok/s "
             f"({rates.suffix} new tokens each, one llama_decode), batched decode {rates.decode_tps:.0f} tok/s "
             f"({rates.steps} steps)"]
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
    lines = [f"exact-layout floor for ({LETTER[target.path]}) (one KV stream per sequence, {rates.parallel} sequences "
             f"of one KV class per llama_decode, the layout that keeps answers equal to the sequential engine's): "
             f"{target.input_computed} computed input tokens at the prompt rate + decoded tokens per KV class "
             f"({per_class}) = {exact:.1f} s ({exact / target.n:.3f} s/ex); chainopt took "
             f"{target.seconds / exact:.2f}x it"]
    if b is not None and b.s_per_example:
        lines.append(f"at the exact-layout floor, ({LETTER[target.path]}) would be "
                     f"{b.s_per_example / (exact / target.n):.1f}x (b): the most an engine with answers equal to "
                     "the sequential engine's could reach here")
    return lines


# ---------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m optimize.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=list(WORKLOADS), default="banking77")
    parser.add_argument("--n", type=int, help="examples evaluated (default: the workload's)")
    parser.add_argument("--stock-limit", type=int, help="run the stock rows (a)(b) on the first N examples only")
    parser.add_argument("--paths", help=f"comma-separated rows among {','.join(PATHS)} (default: the workload's)")
    parser.add_argument("--parallel", type=int, default=16, help="threads and batched sequences of chainopt rows")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--seed", type=int, default=0, help="which examples (shuffle seed)")
    parser.add_argument("--timeout", type=float, help="seconds allowed per row")
    parser.add_argument("--json", help="also write the full result (answers included) to this file")
    child = parser.add_argument_group("one row in this process (used by the parent run)")
    child.add_argument("--path", choices=PATHS)
    child.add_argument("--rates", action="store_true")
    child.add_argument("--out")
    args = parser.parse_args(argv)
    import warnings

    warnings.filterwarnings("ignore")
    if args.path or args.rates:
        if args.rates:
            data = asdict(measure_rates(args.model, workload=args.workload, parallel=args.parallel))
        else:
            data = asdict(run_path(args.path, args.workload, args.n or WORKLOADS[args.workload].n,
                                   parallel=args.parallel, model=args.model, seed=args.seed))
        Path(args.out).write_text(json.dumps(data)) if args.out else print(json.dumps(data))
        return 0
    result = run_bench(args.workload, n=args.n, stock_limit=args.stock_limit,
                       paths=tuple(args.paths.split(",")) if args.paths else None, parallel=args.parallel,
                       model=args.model, seed=args.seed, timeout=args.timeout,
                       progress=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=1))
    print(format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
