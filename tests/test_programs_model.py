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
from multilabel_data import write

pytestmark = pytest.mark.model

DATASET = {"intent": "banking77", "math": "gsm8k"}


@pytest.fixture(scope="module")
def lm():
    return build_lm(ModelConfig(cache=False, max_tokens=200, n_ctx=4096))


def _data(kind: str, tmp_path) -> DataConfig:
    """A named dataset, or for multilabel the file tests/multilabel_data.py builds from Banking77."""
    if kind == "multilabel":
        return DataConfig(path=str(write(tmp_path / "multilabel.jsonl", train=200, test=3)), inputs={"query": "text"},
                          split_column="split", train=200, test=3)
    return DataConfig(dataset=DATASET[kind], train=200, test=3, seed=0)


@pytest.mark.parametrize("spec", list_programs(), ids=lambda s: s.name)
def test_program_on_three_real_examples(spec, lm, tmp_path):
    splits = load_splits(_data(spec.kind, tmp_path))
    program = spec.build(splits.task)
    fill_retrievers(program, splits.train)  # as the pipeline does: retrieval searches the training split
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
        if spec.kind == "multilabel" and record.predicted is not None:
            assert set(record.predicted) <= set(splits.task.labels)
