"""Every registered program on 3 real examples with the embedded model: it runs, records, and parses."""

import dspy
import pytest

from optimize.config import DataConfig, ModelConfig
from optimize.data import load_splits
from optimize.llm.engine import build_lm
from optimize.evaluate import evaluate
from optimize.trial import adapter
from programs import list_programs
from programs.retrieval import fill_retrievers

pytestmark = pytest.mark.model

DATASET = {"intent": "banking77", "math": "gsm8k"}


@pytest.fixture(scope="module")
def lm():
    return build_lm(ModelConfig(cache=False, max_tokens=200, n_ctx=4096))


@pytest.mark.parametrize("spec", list_programs(), ids=lambda s: s.name)
def test_program_on_three_real_examples(spec, lm):
    splits = load_splits(DataConfig(dataset=DATASET[spec.kind], train=200, test=3, seed=0))
    program = spec.build(splits.task)
    fill_retrievers(program, splits.train)  # as the pipeline does: retrieval programs search the training split
    with dspy.context(lm=lm, adapter=adapter()):
        result = evaluate(program, splits.test, spec.metric(splits.task), splits.task.answer_field, threads=3)
    assert result.attempted == 3
    for record in result.records:
        assert record.error is None, record.error
        assert record.steps >= 1 and record.usage.calls >= 1
        assert record.usage.tokens > 0 and sum(u.calls for u in record.by_step.values()) == record.usage.calls
        if spec.name.endswith(".predict"):  # a bare answer decodes under its schema's grammar: it always parses
            assert not record.parse_failure
        # Free-text reasoning (cot, and chain's plan) can run past max_tokens before its JSON closes: recorded
        # as a parse failure, which then feeds a retry (checked in tests/test_programs.py), never an error.
        if spec.kind == "intent" and record.predicted is not None:
            assert record.predicted in splits.task.labels
