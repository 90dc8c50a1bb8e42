"""The cascade's parts on the real models: the engine's confidence, the same from both backends and reaching the
program (computed or cached), and a whole cascade run, smollm2-135m then qwen2.5-coder-0.5b, two engines of one
process. (tests/test_cascade.py tests the logic without a model.)"""

import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import dspy
import pytest
from mlflow.tracking import MlflowClient

from optimize.cli import main
from optimize.config import ModelConfig, load_experiment
from optimize.llm.batched import BatchedBackend
from optimize.llm.engine import build_lm, get_engine, load_llama, schema_grammar
from optimize.llm.models import QWEN
from optimize.llm.sequential import SequentialBackend
from optimize.llm.types import Generation, final_choice
from optimize.trial import adapter
from programs.contract import listening

pytestmark = pytest.mark.model

COLOURS = {"type": "object", "properties": {"colour": {"enum": ["red", "reddish", "green", "blue", "grey"]}},
           "required": ["colour"]}


def test_both_backends_report_the_same_confidence_for_the_label_they_decoded(smollm_info):
    """Fails if the batched backend (which stops once the choice is settled) and the sequential one (which
    decodes to the end) disagree on a label's probability or margin, or if a confidence is not that of the
    label in the text."""
    llama = load_llama(smollm_info, ModelConfig(n_ctx=1024))
    grammar = schema_grammar(json.dumps(COLOURS))

    def chat(question):
        text = (f"<|im_start|>system\nAnswer in JSON.<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n"
                "<|im_start|>assistant\n")
        return tuple(llama.tokenize(text.encode(), add_bos=False, special=True))

    jobs = [Generation(tokens=chat(q), max_tokens=16, grammar=grammar, choice=final_choice(COLOURS))
            for q in ("What colour is the sky?", "What colour is grass?", "What colour is ash?",
                      "What colour is a tomato, roughly?")]
    expected = [SequentialBackend(llama).generate(job) for job in jobs]
    batched = BatchedBackend(llama, parallel=4)
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            got = list(pool.map(batched.generate, jobs))
    finally:
        batched.close()
    assert [g.confidence for g in got] == [e.confidence for e in expected]
    for done in expected:
        confidence = done.confidence
        assert confidence["label"] == json.loads(done.text)["colour"]
        assert 0 < confidence["probability"] <= 1 and -1 <= confidence["margin"] <= confidence["probability"]
    assert any(e.confidence["probability"] < 0.99 for e in expected)  # not a constant


class Pick(dspy.Signature):
    """Pick the colour the sentence names."""

    sentence: str = dspy.InputField()
    colour: Literal["red", "green", "blue"] = dspy.OutputField()


def test_the_program_hears_the_confidence_of_a_computed_and_of_a_cached_answer():
    """Fails if the confidence does not reach the listening program through DSPy, or is lost when DSPy's response
    cache answers (the cascade would then never doubt a cached answer)."""
    import uuid

    import optimize.trial  # noqa: F401  (the pipeline's observer passes confidences on)

    lm = build_lm(ModelConfig(engine="sequential", cache=True, max_tokens=16, n_ctx=1024))
    sentence = f"The {uuid.uuid4().hex[:6]} kite is green."
    with dspy.context(lm=lm, adapter=adapter()):
        with listening() as computed:
            first = dspy.Predict(Pick)(sentence=sentence)
        with listening() as cached:
            second = dspy.Predict(Pick)(sentence=sentence)
    assert first.colour == second.colour
    assert len(computed) == 1 and computed == cached
    assert computed[0]["field"] == "colour" and computed[0]["label"] == first.colour


qwen = pytest.mark.skipif(importlib.util.find_spec(QWEN.packages[0]) is None,
                          reason="the chainopt[qwen] extra is not installed")


@qwen
def test_a_cascade_run_escalates_to_the_bigger_model_exactly_when_in_doubt(mlflow_store, tmp_path, monkeypatch,
                                                                           root):
    """tests/data/cascade.toml: intent.retrieve on 4 Banking77 test examples, the 135M model first, the 0.5B one
    when the 135M's label got less than probability 1 (every label it chose). Fails if an example the 135M
    answered with a call is not escalated, if the 0.5B model is called for any other, if the records and
    metrics do not say who answered and why, or if the run is not recorded as the cascade."""
    exp = load_experiment(root / "tests/data/cascade.toml")
    small, big, cascade = exp.combinations()
    engines = [get_engine(cfg.model_copy(update={"seed": 0})) for cfg in cascade.cascade.models]
    assert engines[0] is not engines[1]
    before = [engine.totals.calls for engine in engines]
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(root / "tests/data/cascade.toml"), "--quiet"]) == 0
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("cascade-test").experiment_id],
                              "tags.`chainopt.kind` = 'child'")
    (run,) = [r for r in runs if r.data.params.get("cascade")]
    m = run.data.metrics
    rows = json.loads(open(client.download_artifacts(run.info.run_id, "predictions.json", str(tmp_path))).read())
    rows = [dict(zip(rows["columns"], values)) for values in rows["data"]]
    tried = lambda r: json.loads(r["cascade"]) if isinstance(r["cascade"], str) else r["cascade"]
    called = [r for r in rows if tried(r)[0]["probability"] is not None]
    escalated = [r for r in rows if r["escalation"]]
    assert escalated == called and len(called) >= 1
    assert all(r["answered_by"] == "qwen2.5-coder-0.5b" and r["escalation"].startswith("probability ")
               for r in escalated)
    assert all(r["answered_by"] == "smollm2-135m" for r in rows if r not in escalated)
    assert m["escalated"] == len(escalated) and m["escalation_rate"] == len(escalated) / 4
    assert m["model2.lm_calls"] == len(escalated) and m["model2.answered"] == len(escalated)
    assert m["model1.lm_calls"] >= len(called)
    assert m["cascade.min_probability"] == 1.0 and 0 <= m["model1.accuracy_alone"] <= 1
    assert run.data.params["cascade.model2.sha256"].startswith("1d9614638d18")
    # The single-model runs of the same examples stand beside it.
    assert {r.data.params["model.spec"] for r in runs if not r.data.params.get("cascade")} == \
        {"smollm2-135m", "qwen2.5-coder-0.5b"}
    singles = {r.data.params["model.spec"]: r.data.metrics["lm_calls"] for r in runs if not r.data.params.get("cascade")}
    calls = [engine.totals.calls - n for engine, n in zip(engines, before)]
    assert calls == [singles["smollm2-135m"] + m["model1.lm_calls"], singles["qwen2.5-coder-0.5b"] + m["model2.lm_calls"]]
