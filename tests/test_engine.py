"""The engine on the real embedded model: schema output parses, usage is exact, cache and threads behave."""

from typing import Literal

import dspy
import pytest
from dspy.utils.exceptions import ContextWindowExceededError

from optimize import cost
from optimize.config import ModelConfig
from optimize.llm.engine import build_lm

pytestmark = pytest.mark.model


class Pick(dspy.Signature):
    """Pick the colour named in the sentence."""

    sentence: str = dspy.InputField()
    colour: Literal["red", "green", "blue"] = dspy.OutputField()


def test_json_schema_output_parses_and_usage_is_exact(sequential_lm):
    with dspy.context(lm=sequential_lm, adapter=dspy.JSONAdapter(), track_usage=True), cost.metered() as tally:
        pred = dspy.Predict(Pick)(sentence="The sky is blue today.")
        usage = pred.get_lm_usage()
    assert pred.colour in {"red", "green", "blue"}
    assert tally.usage.calls == 1
    assert tally.usage.input_tokens > 100 and tally.usage.output > 0
    dspy_usage = next(iter(usage.values()))
    assert dspy_usage["prompt_tokens"] == tally.usage.input_tokens
    assert dspy_usage["completion_tokens"] == tally.usage.output
    assert dspy_usage["prompt_tokens_details"]["cached_tokens"] == tally.usage.input_reused


def test_second_call_reuses_the_shared_prefix(sequential_lm):
    with dspy.context(lm=sequential_lm, adapter=dspy.JSONAdapter()):
        dspy.Predict(Pick)(sentence="A green frog.")
        with cost.metered() as tally:
            dspy.Predict(Pick)(sentence="A red car.")
    # The system prompt and the start of the user turn are identical: only the rest is computed.
    assert tally.usage.input_reused > 50
    assert tally.usage.input_computed < tally.usage.input_tokens


def test_model_identity_keys_the_cache(sequential_lm, smollm_info):
    assert smollm_info.sha256[:16] in sequential_lm.model


def test_temperature_zero_is_deterministic(sequential_lm):
    prompts = ["Say a number.", "Name a fruit."]
    first = [sequential_lm(p)[0] for p in prompts]
    again = [sequential_lm(p)[0] for p in reversed(prompts)][::-1]
    assert first == again


def test_sampling_gives_different_samples_per_rollout(sequential_lm):
    hot = sequential_lm.copy(temperature=1.0)
    samples = {hot("Write one random word.", rollout_id=i)[0] for i in range(4)}
    assert len(samples) > 1


def test_explicit_seed_is_honoured(sequential_lm):
    hot = sequential_lm.copy(temperature=1.0, seed=1234)
    assert hot("Write one random word.", rollout_id=1)[0] == hot("Write one random word.", rollout_id=2)[0]


def test_threads_get_their_own_answers(sequential_lm):
    sentences = {i: f"My favourite colour is {c}." for i, c in enumerate(["red", "green", "blue"] * 3)}
    expected = {}
    with dspy.context(lm=sequential_lm, adapter=dspy.JSONAdapter()):
        for i, s in sentences.items():
            expected[i] = dspy.Predict(Pick)(sentence=s).colour
        program = dspy.Predict(Pick)
        got = {}

        def work(i):
            got[i] = program(sentence=sentences[i]).colour

        devset = [dspy.Example(i=i) for i in sentences]
        from dspy.utils.parallelizer import ParallelExecutor

        ParallelExecutor(num_threads=8, disable_progress_bar=True).execute(lambda ex: work(ex.i), devset)
    assert got == expected


def test_context_overflow_raises_dspy_error_with_numbers():
    lm = build_lm(ModelConfig(engine="sequential", cache=False, n_ctx=256, max_tokens=32))
    with pytest.raises(ContextWindowExceededError, match=r"prompt of \d+ tokens \+ max_tokens 32 exceeds .*n_ctx=256"):
        lm("word " * 400)


def test_context_overflow_truncates_when_configured():
    lm = build_lm(ModelConfig(engine="sequential", cache=False, n_ctx=256, max_tokens=16, overflow="truncate"))
    with cost.metered() as tally:
        out = lm("word " * 400)
    assert isinstance(out[0], str)
    assert tally.usage.input_tokens <= 256


def test_chain_budget_refuses_the_call_that_crosses_it(sequential_lm):
    # A ceiling, not a pre-check: the call that carries the chain past it is counted, then refused.
    from optimize.errors import BudgetExceeded
    from optimize.evaluate import find_cause

    with dspy.context(lm=sequential_lm, adapter=dspy.JSONAdapter()), cost.metered("chain", limit=10) as chain:
        with pytest.raises(Exception) as info:
            dspy.Predict(Pick)(sentence="Blue.")
    assert isinstance(find_cause(info.value, BudgetExceeded), BudgetExceeded)
    assert chain.usage.calls == 1 and chain.usage.tokens > 10


def test_an_answer_from_the_response_cache_replays_the_usage_it_was_computed_with():
    # A call DSPy's cache answers never reaches the engine. Before, it was metered as nothing, so a
    # re-run served from the cache looked free; now its recorded usage is replayed and marked cached.
    import uuid

    lm = build_lm(ModelConfig(engine="sequential", cache=True, max_tokens=16, n_ctx=2048))
    sentence = f"The {uuid.uuid4().hex[:8]} balloon is red."  # a prompt no earlier test asked
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        with cost.metered() as computed:
            first = dspy.Predict(Pick)(sentence=sentence)
        with cost.metered() as replayed:
            second = dspy.Predict(Pick)(sentence=sentence)
    assert first.colour == second.colour
    assert (computed.usage.calls, computed.usage.cached) == (1, 0)
    assert (replayed.usage.calls, replayed.usage.cached) == (1, 1)
    assert replayed.usage.tokens == computed.usage.tokens > 0
    assert replayed.usage.input_computed == computed.usage.input_computed
