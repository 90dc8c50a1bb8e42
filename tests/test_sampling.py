"""Sampling (temperature > 0) on the real embedded model, batched engine beside the sequential reference,
and the token choice both engines share (optimize.llm.sampling) against whole-vocabulary grammar scans.

Both engines pick sampled tokens through the same TokenSampler (grammar mask, top-k, top-p, temperature,
then a draw seeded by the call's seed), so a seed fixes the sample, on either engine, alone or decoded
beside other sequences. The engines here are private (not get_engine's shared ones), so the unseeded
draws below start from a known counter.
"""

import ctypes
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from optimize.config import ModelConfig
from optimize.llm.batched import BatchedBackend
from optimize.llm.engine import LlamaEngine, LocalLM, load_llama, schema_grammar
from optimize.llm.sampling import MIN_P, GrammarCheck, TokenSampler
from optimize.llm.types import Generation

pytestmark = pytest.mark.model

PROMPT = "Write a short sentence about the sea."  # open-ended: many likely continuations
SEEDS = (1, 2, 3)


def _engine(info, engine: str) -> LlamaEngine:
    return LlamaEngine(info, ModelConfig(engine=engine, n_ctx=1024, parallel=4, kv_cache_mb=200, max_tokens=12,
                                         temperature=1.0, seed=0, cache=False))


@pytest.fixture(scope="module")
def engines(smollm_info):
    made = {name: _engine(smollm_info, name) for name in ("batched", "sequential")}
    yield made
    for engine in made.values():
        engine.close()


def _lm(engine: LlamaEngine, **kwargs) -> LocalLM:
    return LocalLM(f"llamacpp/sampling-{engine.cfg.engine}", engine=engine, temperature=1.0, max_tokens=12,
                   cache=False, num_retries=0, **kwargs)


def _sample(engine: LlamaEngine, seed: int | None = None) -> str:
    return _lm(engine, **({} if seed is None else {"seed": seed}))(PROMPT)[0]


@pytest.fixture(scope="module")
def reference(engines):
    """The sequential engine's sample for each seed."""
    return {seed: _sample(engines["sequential"], seed) for seed in SEEDS}


def test_unseeded_samples_draw_fresh_seeds_from_the_configured_one(engines, reference):
    """Without a seed, the n-th call on an engine configured with seed 0 samples with seed n (the engine's
    counter), on both engines. Runs first, on fresh engines. Fails if unseeded calls repeat one sample
    (the configured seed reused), or if an engine ignores the seed it is given."""
    for engine in engines.values():
        assert [_sample(engine) for _ in SEEDS] == [reference[seed] for seed in SEEDS]


def test_a_seed_fixes_the_batched_sample(engines, reference):
    """Fails if the batched engine ignores the request's seed or keeps sampler state between requests."""
    batched = engines["batched"]
    again = {seed: [_sample(batched, seed) for _ in range(2)] for seed in SEEDS}
    assert all(a == b for a, b in again.values())


def test_different_seeds_give_different_samples(reference, engines):
    """Fails if temperature is dropped on the way to llama.cpp (temperature 0 gives one answer for every seed)."""
    assert len(set(reference.values())) > 1
    greedy = {_lm(engines["batched"], seed=seed).copy(temperature=0.0)(PROMPT)[0] for seed in SEEDS}
    assert len(greedy) == 1


def test_batched_samples_equal_the_sequential_reference_even_decoded_together(engines, reference):
    """Each sequence has its own seeded sampler: decoded together in one batch, every seed still gives the
    sequential engine's sample. Fails if the batched engine shares or reseeds one sampler across sequences
    or builds a different sampler chain from the reference."""
    batched = engines["batched"]
    assert {seed: _sample(batched, seed) for seed in SEEDS} == reference
    with ThreadPoolExecutor(len(SEEDS)) as pool:
        together = dict(zip(SEEDS, pool.map(lambda seed: _sample(batched, seed), SEEDS)))
    assert together == reference


WORDS = "root ::= [a-z]+"  # thousands of tokens allowed, most of the vocabulary not
COLOUR = schema_grammar(json.dumps({"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}},
                                    "required": ["colour"]}))


@pytest.fixture(scope="module")
def llama(smollm_info):
    return load_llama(smollm_info, ModelConfig(n_ctx=512))


@pytest.fixture(scope="module")
def check(llama):
    return GrammarCheck(llama._model.vocab)


def full_scan(check: GrammarCheck, grammar_text: str, logits: np.ndarray) -> np.ndarray:
    """The tokens a fresh grammar allows first, by llama.cpp over the whole vocabulary (the reference)."""
    import llama_cpp as lc

    grammar = lc.llama_sampler_init_grammar(check.vocab, grammar_text.encode(), b"root")
    data = (lc.llama_token_data * check.n_vocab)()
    view = np.ctypeslib.as_array(data)
    view["id"], view["logit"] = np.arange(check.n_vocab, dtype=np.int32), logits
    arr = lc.llama_token_data_array(data=data, size=check.n_vocab, selected=-1, sorted=False)
    lc.llama_sampler_apply(grammar, ctypes.byref(arr))
    lc.llama_sampler_free(grammar)
    kept = view[: arr.size]
    return np.sort(kept["id"][kept["logit"] != -np.inf])


def masked_distribution(allowed: np.ndarray, logits: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """The grammar-masked distribution at `temperature`, less the tokens below MIN_P times the best allowed one."""
    values = logits[allowed].astype(np.float64)
    keep = np.exp(values - values.max()) >= MIN_P
    weights = np.exp((values[keep] - values.max()) / temperature)
    return allowed[keep], weights / weights.sum()


def _sampler(check: GrammarCheck, grammar: str, temperature: float = 0.7, seed: int = 0, **kw) -> TokenSampler:
    return TokenSampler(Generation(tokens=(1,), max_tokens=1, temperature=temperature, seed=seed, grammar=grammar,
                                   **kw), check)


def test_grammar_argmax_shortlist_equals_a_full_scan(check):
    rng = np.random.default_rng(0)
    for rank in (2, 5, 40, 200):
        logits = rng.normal(size=check.n_vocab).astype(np.float32)
        allowed = full_scan(check, COLOUR, logits)
        best = int(allowed[np.argmax(logits[allowed])])
        logits[best] = np.sort(logits)[-rank] + 1e-3  # the best allowed token ranked about `rank`
        sampler = _sampler(check, COLOUR, temperature=0.0)
        try:
            assert sampler.next(logits) == best
        finally:
            sampler.free()


@pytest.mark.parametrize("case", ["best allowed on top", "best allowed below the top", "allowed only far below"])
def test_sampled_candidates_are_the_grammar_masked_distribution(check, case):
    """The bands find every token the whole-vocabulary mask and the min-p cut keep, with its probability,
    whether the best allowed token is the global best, below tokens the grammar rejects, or far below all
    of them (found only by a whole scan). Fails if a token that may be drawn is missed, a rejected or
    too unlikely one kept, or a whole scan made where the first bands suffice."""
    rng = np.random.default_rng(1)
    logits = (rng.normal(size=check.n_vocab) - 100).astype(np.float32)
    allowed = full_scan(check, WORDS, logits)
    banned = np.setdiff1d(np.arange(check.n_vocab), allowed)[:50]
    picks = rng.choice(allowed, 40, replace=False)
    logits[banned] = 10.0 - np.arange(50) * 0.5  # the top of the vocabulary, all rejected by the grammar
    if case == "best allowed on top":
        logits[picks] = 12.0 - np.arange(40) * 0.6  # down to -11.4: those above 12 - 9.2 are kept
    elif case == "best allowed below the top":
        logits[picks] = 5.0 - np.arange(40) * 0.5  # from 5: those above 5 - 9.2 are kept (two grammar checks)
    sampler, before = _sampler(check, WORDS), check.checked
    try:
        tokens, probs = sampler.candidates(logits)
    finally:
        sampler.free()
    want_tokens, want_probs = masked_distribution(allowed, logits, 0.7)
    assert tokens.tolist() == want_tokens.tolist()
    np.testing.assert_allclose(probs, want_probs, rtol=1e-12)
    if case != "allowed only far below":
        assert check.checked - before < 1000  # no whole scan was needed


def test_min_p_top_k_and_top_p_cut_the_masked_distribution(check):
    """Three allowed tokens of probability 0.6, 0.3, 0.1 and a fourth below MIN_P times the best: the fourth is
    never a candidate; top-k and top-p keep the best ones, renormalised. Fails if a cut is ignored."""
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=check.n_vocab) - 100).astype(np.float32)
    picks = rng.choice(full_scan(check, WORDS, logits), 4, replace=False)
    logits[picks] = np.log([0.6, 0.3, 0.1, 0.6 * MIN_P / 2])
    for kw, kept in (({"top_k": 2}, 2), ({"top_p": 0.7}, 2), ({"top_p": 0.5}, 1), ({}, 3)):
        sampler = _sampler(check, WORDS, temperature=1.0, **kw)
        try:
            tokens, probs = sampler.candidates(logits)
        finally:
            sampler.free()
        assert tokens.tolist() == np.sort(picks[:kept]).tolist(), kw
        want = dict(zip(picks[:kept].tolist(), np.array([0.6, 0.3, 0.1])[:kept] / [0.6, 0.9, 1.0][kept - 1]))
        np.testing.assert_allclose(probs, [want[t] for t in tokens.tolist()])


def test_draws_follow_the_probabilities(check):
    """Over 2,000 seeds the draw picks each allowed token as often as its probability says. Fails if the draw
    favours the best token (a greedy pick) or ignores the temperature."""
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=check.n_vocab) - 100).astype(np.float32)
    picks = rng.choice(full_scan(check, WORDS, logits), 3, replace=False)
    logits[picks] = 0.5 * np.log([0.6, 0.3, 0.1])  # at temperature 0.5: probabilities 0.6, 0.3, 0.1
    counts = {int(t): 0 for t in picks}
    for seed in range(2000):
        sampler = _sampler(check, WORDS, temperature=0.5, seed=seed)
        try:
            counts[sampler.next(logits)] += 1
        finally:
            sampler.free()
    np.testing.assert_allclose([counts[int(t)] / 2000 for t in picks], [0.6, 0.3, 0.1], atol=0.035)


def test_a_sampled_grammar_call_does_not_scan_the_vocabulary_per_token(llama):
    """A JSON answer sampled under its grammar: the grammar sees a small part of the vocabulary per decoded
    token. Fails if sampled decoding goes back to a whole-vocabulary grammar pass per token."""
    backend = BatchedBackend(llama, parallel=2, max_prefixes=0)
    try:
        text = "<|im_start|>user\nName a colour of the sea, as JSON.<|im_end|>\n<|im_start|>assistant\n"
        tokens = tuple(llama.tokenize(text.encode(), add_bos=False, special=True))
        out = backend.generate(Generation(tokens=tokens, max_tokens=20, temperature=1.0, seed=5, grammar=COLOUR))
        assert json.loads(out.text)["colour"] in ("red", "green", "blue")
        assert backend.check.checked < out.n_output * backend.n_vocab / 10
    finally:
        backend.close()
