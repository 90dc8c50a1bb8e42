"""The sequential backend: one llama.cpp context, one call at a time.

The simple path, and the reference whose answers the batched backend must reproduce. At temperature 0
llama.cpp's own grammar and greedy sampler pick the tokens (the independent reference for the batched
backend's shortcut); a sampled call picks them through `optimize.llm.sampling`, as the batched backend
does, handed the raw logits by a logits processor.
"""

from __future__ import annotations

import threading

import numpy as np

from optimize.errors import ModelError
from optimize.llm.confidence import ChoiceTracker, vocabulary
from optimize.llm.sampling import GrammarCheck, TokenSampler
from optimize.llm.types import Completion, Generation

CLOSED = "the sequential engine was closed"


class SequentialBackend:
    """One context, one call at a time: the simple path, and the reference the batched one must match."""

    def __init__(self, llama):
        self.llama = llama
        self.lock = threading.Lock()
        self._closing = threading.Event()
        self._check: GrammarCheck | None = None  # sampled calls' grammar scratch, made on first need

    def _reusable_prefix(self, tokens: list[int]) -> int:
        # Mirrors Llama.generate: the longest common prefix with what the context holds is kept,
        # except that the last prompt token is recomputed to refresh the logits.
        held = self.llama._input_ids[: self.llama.n_tokens]
        lcp = 0
        for a, b in zip(held, tokens):
            if a != b:
                break
            lcp += 1
        return lcp - 1 if lcp == len(tokens) else lcp

    def generate(self, job: Generation) -> Completion:
        from llama_cpp import StoppingCriteriaList
        from llama_cpp.llama_grammar import LlamaGrammar

        tokens = list(job.tokens)
        tracker = ChoiceTracker(vocabulary(self.llama), *job.choice) if job.choice is not None else None
        output: list[int] = []

        def watch(input_ids, logits):
            """A logits processor that changes nothing: it hands each step's raw logits to the tracker."""
            output[:] = [int(t) for t in input_ids[len(tokens):]]
            tracker.step(self.llama.detokenize(output).decode("utf-8", errors="ignore"), logits, len(output))
            return logits

        with self.lock:
            if self._closing.is_set():
                raise ModelError(CLOSED)
            processors = [watch] if tracker is not None else []
            sampler = grammar = None
            if job.temperature > 0:
                if self._check is None:
                    self._check = GrammarCheck(self.llama._model.vocab)
                sampler = TokenSampler(job, self._check)

                def pick(input_ids, logits):
                    """Leaves only the sampler's token: llama.cpp's greedy step then takes it."""
                    chosen = np.full_like(logits, -np.inf)
                    token = sampler.next(np.ascontiguousarray(logits))
                    chosen[token] = 0.0
                    return chosen

                processors.append(pick)
            elif job.grammar:
                grammar = LlamaGrammar.from_string(job.grammar, verbose=False)
            reused = max(0, self._reusable_prefix(tokens))
            # Closing stops a call between two tokens: its caller gets an error, not a cut answer.
            try:
                out = self.llama.create_completion(
                    prompt=tokens, max_tokens=job.max_tokens, temperature=0.0,
                    repeat_penalty=1.0, grammar=grammar, logits_processor=processors or None,
                    stopping_criteria=StoppingCriteriaList([lambda input_ids, logits: self._closing.is_set()]))
            finally:
                if sampler is not None:
                    sampler.free()
            if self._closing.is_set():
                raise ModelError(CLOSED)
            if tracker is not None:  # the last token, sampled after the last look at the logits
                output[:] = [int(t) for t in self.llama._input_ids[len(tokens):]]
        choice = out["choices"][0]
        confidence = tracker.result(output, choice["text"]) if tracker is not None else None
        return Completion(text=choice["text"], n_prompt=len(tokens), n_reused=reused,
                          n_output=out["usage"]["completion_tokens"],
                          finish_reason="length" if choice["finish_reason"] == "length" else "stop",
                          confidence=confidence)

    def close(self) -> None:
        """Stop the call in progress (its caller gets an error), refuse new ones, free the context. Safe while
        other threads are calling: the context is freed only once no call is using it."""
        self._closing.set()
        with self.lock:
            self.llama.close()
