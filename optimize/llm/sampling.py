"""Choosing each next token from the model's logits, greedy or sampled, under a job's response grammar.

Both backends draw sampled tokens here, so a seed gives the same sample on either, alone or decoded in a
batch; the batched backend picks greedy tokens here too, the sequential one leaves those to llama.cpp (the
independent reference that batched answers are checked against).

Why not llama.cpp's sampler chain: its grammar step checks every token of the vocabulary at every step
(151,936 tokens on Qwen2.5, in the batched engine's one worker thread: sampled decoding cost 2.2x greedy
per token). Here the grammar sees only the tokens that can matter:
- greedy: the unconstrained argmax, checked alone; if the grammar rejects it, the best SHORTLIST tokens,
  and the whole vocabulary only when none of them is allowed. This is exactly grammar-then-greedy.
- sampled: the grammar mask, then min-p at MIN_P = 1e-4 (tokens less likely than 1e-4 times the best
  allowed one are dropped, at temperature 1 as in llama.cpp, whose own default min-p is 0.05), top-k,
  top-p (temperature-1 probabilities), the temperature, and one draw from a generator seeded by the job's
  seed. The min-p cut is what spares the scan: only tokens within 9.2 logits of the best allowed one can
  be drawn, so only they go through the grammar (`GrammarCheck.likely_allowed`).
"""

from __future__ import annotations

import ctypes

import numpy as np

from optimize.errors import ModelError
from optimize.llm.types import Generation

SHORTLIST = 64  # best tokens checked one by one before a whole-vocabulary grammar scan (greedy)
MIN_P = 1e-4  # sampled: tokens less likely than this times the best allowed one are dropped (llama.cpp's min-p)
WIDTH = float(-np.log(MIN_P))  # the same cut in logits


class GrammarCheck:
    """Applies a grammar to chosen tokens of a vocabulary. One scratch array: one thread at a time."""

    def __init__(self, vocab):
        import llama_cpp as lc

        self.lc, self.vocab = lc, vocab
        self.n_vocab = lc.llama_vocab_n_tokens(vocab)
        self._data = (lc.llama_token_data * self.n_vocab)()
        self._view = np.ctypeslib.as_array(self._data)
        self._all = np.arange(self.n_vocab, dtype=np.int32)
        self.checked = 0  # tokens put through a grammar so far (how far from a whole-vocabulary scan per token)

    def allowed(self, grammar, tokens: np.ndarray, logits: np.ndarray) -> np.ndarray:
        """Those of `tokens` that `grammar` allows next, in their order."""
        n = len(tokens)
        view = self._view[:n]
        view["id"], view["logit"], view["p"] = tokens, logits[tokens], 0.0
        arr = self.lc.llama_token_data_array(data=self._data, size=n, selected=-1, sorted=False)
        self.lc.llama_sampler_apply(grammar, ctypes.byref(arr))
        self.checked += n
        kept = view[: arr.size]
        return kept["id"][kept["logit"] != -np.inf].astype(np.int32)

    def allows(self, grammar, token: int, logits: np.ndarray) -> bool:
        return self.allowed(grammar, np.array([token], dtype=np.int32), logits).size == 1

    def argmax(self, grammar, logits: np.ndarray) -> int:
        """The highest-logit token the grammar allows (lowest id among equals, as np.argmax).

        The best SHORTLIST tokens are tried one by one first; the whole vocabulary goes through the grammar
        only when none of them is allowed, or when the one found ties with the cut-off (a token outside the
        shortlist could then tie with it)."""
        top = np.argpartition(-logits, SHORTLIST)[:SHORTLIST]
        top = top[np.lexsort((top, -logits[top]))]
        floor = logits[top[-1]]
        for token in top:
            if logits[token] == floor:
                break
            if self.allows(grammar, int(token), logits):
                return int(token)
        allowed = self.allowed(grammar, self._all, logits)
        if allowed.size == 0:
            raise ModelError("the response grammar allows no next token")
        return int(allowed[np.argmax(logits[allowed])])  # `allowed` is in id order: lowest id among equals

    def likely_allowed(self, grammar, logits: np.ndarray) -> np.ndarray:
        """The allowed tokens at least MIN_P as likely as the best allowed one (at temperature 1).

        Tokens go through the grammar in bands of logits WIDTH wide from the top down, until a band holds an
        allowed token (the first, mostly); the best of them is the best allowed token of the vocabulary, and
        the tokens down to WIDTH below it are checked too. A whole scan happens only when the grammar rejects
        every token the model finds likely."""
        lower, upper = float(logits.max()) - WIDTH, np.inf
        while True:
            band = np.flatnonzero((logits >= lower) & (logits < upper)).astype(np.int32)
            allowed = self.allowed(grammar, band, logits)
            if allowed.size:
                break
            if lower == -np.inf:
                raise ModelError("the response grammar allows no next token")
            upper, lower = lower, (lower - WIDTH if lower - WIDTH > logits.min() else -np.inf)
        floor = float(logits[allowed].max()) - WIDTH
        rest = np.flatnonzero((logits >= floor) & (logits < lower)).astype(np.int32)
        if rest.size:
            allowed = np.concatenate([allowed, self.allowed(grammar, rest, logits)])
        return allowed[logits[allowed] >= floor]


class TokenSampler:
    """One job's next-token choice, step after step: it owns the job's grammar state and random generator."""

    def __init__(self, job: Generation, check: GrammarCheck):
        lc = check.lc
        self.lc, self.job, self.check = lc, job, check
        self.grammar = None
        if job.grammar:
            self.grammar = lc.llama_sampler_init_grammar(check.vocab, job.grammar.encode("utf-8"), b"root")
            if not self.grammar:
                raise ModelError("llama.cpp rejected the response grammar")
        self.rng = np.random.default_rng(job.seed % 2**64) if job.temperature > 0 else None

    def candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The tokens a sampled step may pick, in id order, and their probabilities."""
        job = self.job
        if self.grammar is None:
            tokens = np.flatnonzero(logits >= float(logits.max()) - WIDTH).astype(np.int32)
        else:
            tokens = np.sort(self.check.likely_allowed(self.grammar, logits))
        values = logits[tokens].astype(np.float64)
        if job.top_k > 0 or job.top_p < 1.0:
            rank = np.lexsort((tokens, -values))  # best first, lowest id among equals
            if job.top_k > 0:
                rank = rank[: job.top_k]
            if job.top_p < 1.0:  # the best tokens whose temperature-1 probability reaches top_p, as llama.cpp
                mass = np.cumsum(np.exp(values[rank] - values[rank[0]]))
                rank = rank[: int(np.searchsorted(mass, job.top_p * mass[-1])) + 1]
            keep = np.sort(rank)
            tokens, values = tokens[keep], values[keep]
        weights = np.exp((values - values.max()) / job.temperature)
        return tokens, weights / weights.sum()

    def next(self, logits: np.ndarray) -> int:
        """The next token, accepted into the grammar."""
        if self.rng is None:
            token = int(np.argmax(logits))
            if self.grammar is not None and not self.check.allows(self.grammar, token, logits):
                token = self.check.argmax(self.grammar, logits)
        else:
            tokens, probs = self.candidates(logits)
            at = int(np.searchsorted(np.cumsum(probs), self.rng.random(), side="right"))
            token = int(tokens[min(at, len(tokens) - 1)])
        if self.grammar is not None:
            self.lc.llama_sampler_accept(self.grammar, token)
        return token

    def free(self) -> None:
        if self.grammar:
            self.lc.llama_sampler_free(self.grammar)
        self.grammar = None
