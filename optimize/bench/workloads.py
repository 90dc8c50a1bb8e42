"""What the bench measures and what it makes of it: the workloads, a row's and the rates' numbers, and the
pure arithmetic on them (the compute floors, speedups, agreement), apart from anything that runs a model."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

PATHS = ("server", "inproc", "sequential", "batched")
STOCK = ("server", "inproc")
LETTER = {"server": "a", "inproc": "b", "sequential": "c", "batched": "d"}
N_CTX = 4096  # stock_baseline's value, for the stock rows
# chainopt's rows: every call of these workloads fits (the longest, bootstrap's few-shot prompts, ~1,600
# tokens plus the answer), and the batched rows' slots hold as many KV cells (stream_cells), so every call
# is batched; 4096 would leave room for 10 slots in the default KV budget instead of 16. The sequential
# row gets the same n_ctx, so (c) and (d) compare.
CHAINOPT_N_CTX = 2048
# stock_baseline's value, asked by every row. The server path does not get it: DSPy's "openai" preset
# sends max_completion_tokens, which llama_cpp.server ignores, so it decodes to EOS or n_ctx (as stock does).
MAX_TOKENS = 200


@dataclass(frozen=True)
class Workload:
    """A named benchmark: which data and program, how it is compiled, which rows by default, how many examples."""

    name: str
    dataset: str
    program: str
    paths: tuple[str, ...]
    n: int
    train: int = 0  # examples the optimizer compiles on
    optimizer: str = "none"  # the trial's optimizer; "none": evaluation only
    optimizer_settings: dict[str, Any] = field(default_factory=dict)


WORKLOADS = {
    "banking77": Workload("banking77", "banking77", "intent.predict", PATHS, 200),
    "gsm8k-chain": Workload("gsm8k-chain", "gsm8k", "math.chain", ("inproc", "batched"), 100),
    # DSPy's own BootstrapFewShot defaults (16 labelled demos, where chainopt's registry defaults to 4): the
    # workload the README's numbers were measured on.
    "bootstrap": Workload("bootstrap", "banking77", "intent.predict", ("inproc", "batched"), 200, train=50,
                          optimizer="bootstrap_fewshot",
                          optimizer_settings={"max_bootstrapped_demos": 4, "max_labeled_demos": 16}),
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
    """Raw llama.cpp throughput on this machine, measured with the low-level API (optimize.bench.rates)."""

    prompt_tps: float
    decode_tps: float
    context: int  # tokens already in the KV cache: the workload's prompt length
    suffix: int  # prompt tokens each sequence adds
    parallel: int
    steps: int
    class_decode_tps: dict[int, float] = field(default_factory=dict)  # per KV class, one stream per sequence


def from_json(cls: type, data: dict[str, Any]) -> Any:
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
