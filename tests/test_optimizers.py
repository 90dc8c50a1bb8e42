"""Every registered optimizer compiles a real program through DSPy, with a fake LM that answers any schema.

The fake engine reads the JSON schema the adapter sends and returns a valid object (first enum value,
numbers, short strings): the optimizers' wiring is the point here, not the model. The sweep experiments
run them on the real model.
"""

import json

import dspy
import pytest
from dspy.lm15 import Message, Response, TextPart, Usage

from optimize.config import DataConfig
from optimize.data import load_splits
from optimize.errors import ConfigError
from optimize.optimizers import OPTIMIZERS, CompileInputs, compile_program, get_optimizer, resolve_settings, trajectory
from optimize.trial import get_program


def fake_value(schema: dict, defs: dict):
    if "$ref" in schema:
        return fake_value(defs[schema["$ref"].split("/")[-1]], defs)
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        return fake_value(schema["anyOf"][0], defs)
    kind = schema.get("type")
    if kind == "object":
        return {k: fake_value(v, defs) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        return [fake_value(schema.get("items", {}), defs)]
    return {"integer": 1, "number": 1.0, "boolean": True}.get(kind, "a short proposed instruction")


class SchemaEngine:
    supports_response_schema = True
    supported_params = frozenset({"response_format", "temperature", "max_tokens", "seed"})

    def __init__(self):
        self.calls = 0

    def complete(self, request):
        self.calls += 1
        self.last_turns = len(request.messages)
        schema = (request.config.response_format or {}).get("schema") or {}
        text = json.dumps(fake_value(schema, schema.get("$defs", {}))) if schema else "[[ ## completed ## ]]"
        return Response(id=None, model=request.model, message=Message.assistant([TextPart(text)]),
                        finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1))

    def stream(self, request):
        from dspy import lm15

        return lm15.response_to_events(self.complete(request))

    def close(self):
        pass


@pytest.fixture(scope="module")
def splits():
    return load_splits(DataConfig(dataset="banking77", train=8, dev=4, test=2, seed=0))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_compiles_intent_program(name, splits):
    engine = SchemaEngine()
    lm = dspy.LM("fake/schema", engine=engine, cache=False, temperature=0.0)
    spec = get_program("intent.predict")
    student = spec.build(splits.task)
    opt = get_optimizer(name)
    settings = resolve_settings(opt, {"max_metric_calls": 12} if name == "gepa" else {})
    ctx = CompileInputs(metric=spec.metric(splits.task), trainset=splits.train, valset=splits.dev, teacher_lm=lm,
                        seed=0, threads=2, input_fields=splits.task.input_fields)
    with dspy.context(lm=lm, adapter=dspy.JSONAdapter()):
        compiled, teleprompter = compile_program(opt, dict(settings), student, ctx)
        pred = compiled(**splits.test[0].inputs())
    assert pred.intent in splits.task.labels
    assert isinstance(trajectory(compiled, teleprompter), list)
    if name == "none":
        assert compiled is student and engine.calls == 1
    if name == "labeled_fewshot":
        assert len(compiled.classify.demos) == 4
    if name == "knn_fewshot":  # demos are chosen per input at call time: they show up as earlier turns
        assert engine.last_turns > 1


def test_unknown_optimizer_suggests():
    with pytest.raises(ConfigError, match="did you mean 'mipro_v2'"):
        get_optimizer("miprov2")


def test_unknown_setting_lists_allowed():
    with pytest.raises(ConfigError, match="has no setting 'kk'; allowed: .*k"):
        resolve_settings(get_optimizer("labeled_fewshot"), {"kk": 3})


def test_none_takes_no_settings():
    with pytest.raises(ConfigError, match="takes no settings"):
        resolve_settings(get_optimizer("none"), {"k": 1})


def test_bad_embedder():
    with pytest.raises(ConfigError, match="embedder 'bert'"):
        compile_program(get_optimizer("knn_fewshot"), {"k": 2, "embedder": "bert"}, dspy.Predict("q -> a"),
                        CompileInputs(metric=lambda *a: 1, trainset=[], valset=[], teacher_lm=None, seed=0,
                                      threads=1, input_fields=("q",)))


def test_tfidf_embedder_finds_the_lexical_neighbour():
    from optimize.optimizers import tfidf_embedder

    train = [dspy.Example(query=q).with_inputs("query") for q in
             ["my card has not arrived", "exchange rate for euros", "top up failed again"]]
    emb = tfidf_embedder(train, ("query",))
    vectors = emb(["when will my card arrive", "euros exchange rate please"])
    assert vectors.shape[0] == 2


def test_two_tfidf_embedders_never_share_cached_vectors():
    """Two runs fit two vocabularies; DSPy's embedding cache must not hand one's vectors to the other."""
    from optimize.optimizers import tfidf_embedder

    small = [dspy.Example(query=q).with_inputs("query") for q in ["card arrived", "top up"]]
    large = [dspy.Example(query=q).with_inputs("query") for q in
             ["card arrived late", "top up failed", "exchange rate euros", "lost my phone and card"]]
    query = ["has my card arrived"]
    assert tfidf_embedder(large, ("query",))(query).shape[1] != tfidf_embedder(small, ("query",))(query).shape[1]
