"""Raw llama.cpp rates on this machine, for the compute floors: prompt and batched decode in llama.cpp's
fastest layout, and batched decode per KV class in the batched engine's own layout (optimize.llm.raw
sets up both contexts as the engine does)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from optimize.bench.workloads import CHAINOPT_N_CTX, WORKLOADS, Rates
from optimize.llm.models import DEFAULT_MODEL, describe
from optimize.llm.raw import RawContext


def workload_context(workload: str, llm) -> int:
    """Prompt tokens of the workload's first call (chainopt's adapter, the model's chat template): the
    context that the tokens a chainopt row computes attend over."""
    from optimize.config import DataConfig
    from optimize.data import load_splits
    from optimize.llm.adapter import CacheFriendlyAdapter
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


def measure_rates(model: str = DEFAULT_MODEL, *, workload: str = "banking77", parallel: int = 16,
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

    llm = llama_cpp.Llama(model_path=describe(model).path, n_ctx=256, n_threads=os.cpu_count() or 1, verbose=False)
    context = workload_context(workload, llm)
    text = " ".join(f"Query {i}: how do I top up my card with a transfer from abroad?" for i in range(200))
    tokens = llm.tokenize(text.encode())
    tokens *= max(context + suffix + steps, CHAINOPT_N_CTX) // len(tokens) + 1  # as long as the contexts need
    try:
        with RawContext(llm, n_ctx=context + parallel * (suffix + steps) + 256, n_batch=max(512, parallel * suffix),
                        n_seq_max=parallel, unified=True) as raw:
            for start in range(0, context, 512):
                raw.decode([(tokens[k], k, 0, False) for k in range(start, min(start + 512, context))])
            for seq in range(1, parallel):
                raw.copy(0, seq, context)
            prompt_s = _best_seconds(
                lambda: _trim(raw, parallel, context),
                lambda: raw.decode([(tokens[context + (seq + k) % suffix], context + k, seq, k == suffix - 1)
                                    for seq in range(parallel) for k in range(suffix)]))
            decode_s = _best_seconds(
                lambda: _trim(raw, parallel, context + suffix),
                lambda: [raw.decode([(tokens[(k * parallel + s) % len(tokens)], context + suffix + k, s, True)
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
    from optimize.llm.batched import KV_PAD

    assert steps < KV_PAD
    rates: dict[int, float] = {}
    source = parallel  # an extra stream computes the longest context once; the others copy it
    with RawContext(llm, n_ctx=(parallel + 1) * cells, n_batch=512, n_seq_max=parallel + 1, unified=False) as raw:
        longest = cells - steps
        for start in range(0, longest, 512):
            raw.decode([(tokens[k], k, source, False) for k in range(start, min(start + 512, longest))])
        for kv_class in range(KV_PAD, cells + 1, KV_PAD):
            held = kv_class - steps
            for seq in range(parallel):  # a whole-stream copy, trimmed (as the engine shares prefixes)
                raw.drop(seq)
                raw.copy(source, seq, held)
            # The stream data is copied at the next decode: do one, untimed (the reset drops its token).
            raw.decode([(tokens[held], held, seq, True) for seq in range(parallel)])
            seconds = _best_seconds(
                lambda held=held: _trim(raw, parallel, held),
                lambda held=held: [raw.decode([(tokens[held + k], held + k, seq, True) for seq in range(parallel)])
                                   for k in range(steps)])
            rates[kv_class] = parallel * steps / seconds
    return rates


def _trim(raw: RawContext, n_seqs: int, keep: int) -> None:
    """Drop every sequence's tokens from position `keep` on, so a timed run starts from the same cache."""
    for seq in range(n_seqs):
        raw.drop(seq, keep)


def _best_seconds(reset: Callable[[], None], run: Callable[[], Any], tries: int = 2) -> float:
    """The fastest of `tries` timed runs, each after `reset`: on a shared CPU the slow ones measure the neighbours."""
    best = float("inf")
    for _ in range(tries):
        reset()
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best
