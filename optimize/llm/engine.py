"""The DSPy 3.4 engine that runs a GGUF model in-process with llama.cpp.

`LlamaEngine.complete(Request) -> Response` is what `dspy.LM(engine=...)` calls. It formats the
chat with the model's own template, decodes under the JSON-schema grammar the adapter asks for (an
answer that ends parses; one cut off by max_tokens does not), counts exact usage (input tokens computed
vs reused from the KV cache, output tokens, seconds), reports it to the observers (optimize.llm.types)
and hands the actual decoding to a backend:

  sequential  one llama.cpp context behind a lock; reuses the longest common prefix with the previous call
  batched     many sequences decoded together with prefix sharing (optimize.llm.batched)
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import itertools
import json
import os
import signal
import threading
import time
from typing import Iterator

import dspy
from dspy import lm15
from dspy.lm15 import Message, Response, TextPart

from optimize.errors import ModelError
from optimize.llm.batched import KV_PAD, BatchedBackend
from optimize.llm.models import ModelInfo, describe
from optimize.llm.sequential import SequentialBackend
from optimize.llm.settings import ModelConfig
from optimize.llm.types import Backend, Generation, Usage, final_choice, observers


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold Ctrl-C/SIGTERM until the block ends: raised inside llama.cpp's ctypes log callback, the
    KeyboardInterrupt would be printed and dropped, and the run would go on as if nothing happened."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    kept = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
            for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in kept.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


_params_lock = threading.Lock()


@contextlib.contextmanager
def _batch_invariant_kernels() -> Iterator[None]:
    """Keep llama.cpp off the two CPU paths whose result for one row depends on how many rows are multiplied
    together: the tiled K-quant matmul (taken from 8 rows on; read once per process from GGML_CPU_TILED_MM)
    and repacked weights (CPU_REPACK: Q4_K and Q4_0 matrices get a GEMM kernel from 4 rows on). With either,
    a sequence decoded beside others gets other logits than alone (up to 0.5 apart on the 0.5B model, whose
    Q4_K and Q6_K matrices take both), and the batched engine's answers leave the sequential engine's.
    Llama() takes no use_extra_bufts, so the default parameters it starts from say False while it loads."""
    import llama_cpp.llama_cpp as lib

    os.environ.setdefault("GGML_CPU_TILED_MM", "0")
    with _params_lock:
        default = lib.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        lib.llama_model_default_params = params
        try:
            yield
        finally:
            lib.llama_model_default_params = default


def load_llama(info: ModelInfo, cfg: ModelConfig, n_ctx: int | None = None, **extra):
    """Load the model with llama.cpp (a context of `n_ctx` cells, default the config's) on batch-invariant
    kernels; a file llama.cpp cannot read is a ModelError, not a crash."""
    import llama_cpp

    n_ctx = n_ctx or cfg.n_ctx
    try:
        with _signals_deferred(), _batch_invariant_kernels():
            return llama_cpp.Llama(model_path=info.path, n_ctx=n_ctx, n_batch=min(512, n_ctx),
                                   n_threads=cfg.n_threads or os.cpu_count(), seed=cfg.seed, verbose=False, **extra)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"llama.cpp cannot load {info.path}: {exc}") from exc


@functools.lru_cache(maxsize=8)
def count_tokens(info: ModelInfo, text: str) -> int:
    """How many tokens `text` is to this model, by its own tokenizer. Only the vocabulary is loaded, and no
    context is made (a llama.Llama would make one, and warn about it on stderr)."""
    import llama_cpp
    from llama_cpp._internals import LlamaModel

    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    try:
        with _signals_deferred():
            model = LlamaModel(path_model=info.path, params=params, verbose=False)
    except (ValueError, RuntimeError) as exc:
        raise ModelError(f"llama.cpp cannot read the vocabulary of {info.path}: {exc}") from exc
    try:
        return len(model.tokenize(text.encode(), add_bos=False, special=False))
    finally:
        model.close()


def chat_formatter(llama):
    """The model's own chat template (ChatML when the GGUF carries none), as llama.cpp renders it."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = llama.metadata.get("tokenizer.chat_template") or CHATML
    token = lambda i: llama.detokenize([i], special=True).decode("utf-8", "replace") if i >= 0 else ""
    return Jinja2ChatFormatter(template, eos_token=token(llama.token_eos()), bos_token=token(llama.token_bos()))


@functools.lru_cache(maxsize=64)
def schema_grammar(schema_json: str) -> str:
    """GBNF for a JSON schema; cached because DSPy sends the same schema for every call of a predictor."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    return json_schema_to_gbnf(schema_json)


class LlamaEngine:
    """A DSPy engine over a local GGUF model. Thread-safe: DSPy's Evaluate and optimizers call it from threads."""

    supports_response_schema = True
    supported_params = frozenset({"response_format", "temperature", "max_tokens", "seed", "top_p", "top_k"})

    def __init__(self, info: ModelInfo, cfg: ModelConfig, backend: Backend | None = None):
        self.info, self.cfg = info, cfg
        if backend is not None:
            self.llama = getattr(backend, "llama")
        else:  # the batched engine decodes in contexts of its own: the Llama's serves tokenizing, so it is small
            self.llama = load_llama(info, cfg, n_ctx=KV_PAD if cfg.engine == "batched" else None)
        self.backend = backend or self._default_backend()
        self.formatter = chat_formatter(self.llama)
        self._sample_seeds = itertools.count(cfg.seed + 1)
        self._seed_lock = threading.Lock()
        self.totals = Usage()
        self._totals_lock = threading.Lock()

    def _default_backend(self) -> Backend:
        if self.cfg.engine == "batched":
            # Streams sized to the usual call; a longer one runs alone, on an n_ctx context made when first needed.
            return BatchedBackend(self.llama, parallel=self.cfg.parallel, kv_budget=self.cfg.kv_cache_mb * 10**6,
                                  cells_per_seq=min(self.cfg.stream_cells, self.cfg.n_ctx),
                                  long=lambda: SequentialBackend(load_llama(self.info, self.cfg)))
        return SequentialBackend(self.llama)

    # -- prompt ---------------------------------------------------------------------------------
    def tokenize_chat(self, request: lm15.Request) -> list[int]:
        messages = []
        if request.system is not None:
            system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system)
            messages.append({"role": "system", "content": system})
        messages.extend({"role": m.role, "content": m.text or ""} for m in request.messages)
        result = self.formatter(messages=messages)
        return self.llama.tokenize(result.prompt.encode("utf-8"), add_bos=not result.added_special, special=True)

    def _fit(self, tokens: list[int], max_tokens: int) -> tuple[list[int], int]:
        """Apply the overflow policy: fail with DSPy's context-window error, or cut the middle of the prompt."""
        n_ctx = self.cfg.n_ctx
        if len(tokens) + max_tokens <= n_ctx:
            return tokens, max_tokens
        if self.cfg.overflow == "fail":
            raise lm15.ContextLengthError(
                f"prompt of {len(tokens)} tokens + max_tokens {max_tokens} exceeds the context window "
                f"n_ctx={n_ctx} of {self.info.name}")
        max_tokens = min(max_tokens, max(16, n_ctx // 8))
        room = n_ctx - max_tokens
        if len(tokens) > room:
            head = room // 2
            tokens = tokens[:head] + tokens[len(tokens) - (room - head):]
        return tokens, max_tokens

    def _seed(self, request: lm15.Request, temperature: float) -> int:
        if request.config.seed is not None:
            return request.config.seed
        if temperature == 0:
            return self.cfg.seed
        # Sampling without a seed (Refine/BestOfN rollouts) must give fresh samples each call,
        # reproducibly for a run: draw from a counter started at the configured seed.
        with self._seed_lock:
            return next(self._sample_seeds)

    # -- the engine contract ----------------------------------------------------------------------
    def complete(self, request: lm15.Request) -> Response:
        watching = observers()
        for observer in watching:
            observer.before()
        conf = request.config
        temperature = self.cfg.temperature if conf.temperature is None else conf.temperature
        grammar, choice = None, None
        if conf.response_format and conf.response_format.get("schema"):
            # Key order matters: the grammar writes properties in the schema's order (reasoning before the answer).
            grammar = schema_grammar(json.dumps(conf.response_format["schema"]))
            choice = final_choice(conf.response_format["schema"])
        elif conf.response_format and conf.response_format.get("type") == "json_object":
            grammar = schema_grammar(json.dumps({"type": "object"}))
        tokens, max_tokens = self._fit(self.tokenize_chat(request), conf.max_tokens or self.cfg.max_tokens)
        job = Generation(tokens=tuple(tokens), max_tokens=max_tokens, temperature=temperature,
                         seed=self._seed(request, temperature), grammar=grammar,
                         top_p=conf.top_p if conf.top_p is not None else 1.0, top_k=conf.top_k or 0,
                         choice=choice)
        start = time.perf_counter()
        done = self.backend.generate(job)
        call = Usage(input_computed=done.n_prompt - done.n_reused, input_reused=done.n_reused,
                          output=done.n_output, calls=1, seconds=time.perf_counter() - start)
        with self._totals_lock:
            self.totals = self.totals + call
        for observer in watching:
            observer.after(call, request.model)
        extra = {CONFIDENCE_KEY: done.confidence} if done.confidence is not None else {}
        return Response(id=None, model=request.model, message=Message.assistant([TextPart(done.text)]),
                        finish_reason=done.finish_reason,
                        usage=lm15.Usage(input_tokens=done.n_prompt, output_tokens=done.n_output,
                                         cache_read_tokens=done.n_reused),
                        provider_data={USAGE_KEY: call.as_dict(), **extra})

    def stream(self, request: lm15.Request) -> Iterator:
        return lm15.response_to_events(self.complete(request))

    def close(self) -> None:
        self.backend.close()


# Used only when a GGUF file carries no chat template.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

_engines: dict[tuple, LlamaEngine] = {}
_engines_lock = threading.Lock()


@atexit.register
def close_engines() -> None:
    """Free llama.cpp contexts while the interpreter can still run their destructors."""
    with _engines_lock:
        while _engines:
            _engines.popitem()[1].close()


@contextlib.contextmanager
def closed_on_interrupt() -> Iterator[None]:
    """Close every engine when Ctrl-C (or a stop signal turned into KeyboardInterrupt) leaves the block.
    An interrupted evaluation leaves its worker threads inside their chains, and the interpreter waits for
    them at exit: a closed model makes each one's next token an error, so the process ends in seconds, not
    after every chain has decoded to its end. The next call loads the model again."""
    try:
        yield
    except KeyboardInterrupt:
        close_engines()
        raise


def get_engine(cfg: ModelConfig) -> LlamaEngine:
    """One engine per (model file, runtime settings) in a process: loading is paid once per sweep."""
    info = describe(cfg.spec)
    key = (info.sha256, cfg.n_ctx, cfg.n_threads, cfg.engine, cfg.parallel, cfg.stream_cells, cfg.kv_cache_mb,
           cfg.overflow)
    with _engines_lock:
        if key not in _engines:
            _engines[key] = LlamaEngine(info, cfg)
        return _engines[key]


USAGE_KEY = "chainopt.usage"  # the call's Usage, kept with the answer in DSPy's response cache
CONFIDENCE_KEY = "chainopt.confidence"  # how sure the model was of a choice field's label (kept alike)


class LocalLM(dspy.LM):
    """dspy.LM on the engine. A call that DSPy's response cache answers never reaches the engine, so it is
    reported here: the usage recorded with the cached answer is replayed to the observers, marked `cached`,
    so that a run served from the cache costs what the run that computed the answer paid, not nothing.
    A choice's confidence, computed or cached, is told to the observers that listen for it (`heard`)."""

    def update_history(self, entry: dict) -> None:
        response = entry.get("response")
        data = (response.provider_data or {}) if isinstance(response, Response) else {}
        # DSPy drops the usage of a call it served from its cache (a computed call always has some).
        if not entry.get("usage") and USAGE_KEY in data:
            replayed = Usage(**{**data[USAGE_KEY], "cached": 1})
            for observer in observers():
                observer.after(replayed, response.model)
        if data.get(CONFIDENCE_KEY) is not None:
            for observer in observers():
                if observer.heard is not None:
                    observer.heard(dict(data[CONFIDENCE_KEY]))
        super().update_history(entry)


def build_lm(cfg: ModelConfig) -> dspy.LM:
    """A dspy.LM on the local model. The model name carries the file's sha256, so DSPy's cache never
    mixes answers of two different model files."""
    engine = get_engine(cfg)
    name = f"llamacpp/{engine.info.name}@{engine.info.sha256[:16]}"
    return LocalLM(name, engine=engine, temperature=cfg.temperature, max_tokens=cfg.max_tokens,
                   cache=cfg.cache, num_retries=0)
