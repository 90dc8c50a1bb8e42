"""Sampling (temperature > 0) on the real embedded model, batched engine beside the sequential reference.

Both engines build llama.cpp's sampler chain the same way (top-k, typical, top-p, min-p, temperature,
then a seeded draw), so at temperature 1 a seed fixes the sample, on either engine, alone or decoded
beside other sequences. The engines here are private (not get_engine's shared ones), so the unseeded
draws below start from a known counter.
"""

from concurrent.futures import ThreadPoolExecutor

import pytest

from optimize.config import ModelConfig
from optimize.llm.engine import LlamaEngine, LocalLM

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
