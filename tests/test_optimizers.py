"""What each registered optimizer produces, on fake LMs whose answers are fixed in advance.

`Oracle` is a DSPy engine. For the classify call of `intent.predict` it reads the query of the last user
turn and answers its gold label when a rule "knows" it (the rule sees the query, the demo queries shown
before it and the system prompt), and a wrong but valid label otherwise. Any other call (an instruction
proposal, a reflection) gets a schema-valid object whose strings are the oracle's `filler` text. So what
an optimizer should produce is known: which demos, which instruction, which candidate scores. The task
model and the teacher are two oracles with different fillers, so a proposal that came from the wrong
model shows. The sweep experiments run the optimizers on the real model.
"""

import json

import dspy
import numpy as np
import pytest
from dspy.lm15 import Message, Response, TextPart, Usage

from optimize.config import DataConfig
from optimize.data import load_splits
from optimize.errors import ConfigError
from optimize.optimizers import OPTIMIZERS, CompileInputs, compile_program, get_optimizer, resolve_settings, trajectory
from optimize.trial import adapter, get_program

QUERY = "[[ ## query ## ]]\n"  # how the adapter writes the query field in a user turn
MARK = "Name the exact banking intent of the request"  # the teacher's proposals; no "Word:" prefix (MIPRO strips it)


def fake_value(schema: dict, defs: dict, filler: str):
    if "$ref" in schema:
        return fake_value(defs[schema["$ref"].split("/")[-1]], defs, filler)
    if "enum" in schema:
        return schema["enum"][0]
    if "anyOf" in schema:
        return fake_value(schema["anyOf"][0], defs, filler)
    kind = schema.get("type")
    if kind == "object":
        return {k: fake_value(v, defs, filler) for k, v in schema.get("properties", {}).items()}
    if kind == "array":
        return [fake_value(schema.get("items", {}), defs, filler)]
    return {"integer": 1, "number": 1.0, "boolean": True}.get(kind, filler)


class Oracle:
    """A DSPy engine: the gold label of a known query when `knows(call)`, a wrong label otherwise."""

    supports_response_schema = True
    supported_params = frozenset({"response_format", "temperature", "max_tokens", "seed", "n"})

    def __init__(self, gold: dict[str, str], knows=lambda call: True, filler: str = "task model text"):
        self.gold, self.knows, self.filler = gold, knows, filler
        self.classified: list[dict] = []  # one {"query", "demos", "system"} per classify call
        self.other = 0  # calls that were not a classification (proposals, reflections)

    def complete(self, request):
        schema = (request.config.response_format or {}).get("schema") or {}
        users = [m.text or "" for m in request.messages if m.role == "user"]
        # intent.retrieve puts its retrieved examples before the query and the call's choices after it.
        queries = [u.split(QUERY, 1)[1].split("\n\nChoices for `intent`:")[0] for u in users if QUERY in u]
        system = request.system if isinstance(request.system, str) else "".join(p.text for p in request.system or [])
        if "intent" in schema.get("properties", {}) and queries and queries[-1] in self.gold:
            call = {"query": queries[-1], "demos": queries[:-1], "system": system}
            self.classified.append(call)
            gold = self.gold[call["query"]]
            label = gold if self.knows(call) else ("card_arrival" if gold != "card_arrival" else "exchange_rate")
            text = json.dumps({"intent": label})
        else:
            self.other += 1
            value = fake_value(schema, schema.get("$defs", {}), self.filler) if schema else None
            text = json.dumps(value) if schema else "[[ ## completed ## ]]"
        return Response(id=None, model=request.model, message=Message.assistant([TextPart(text)]),
                        finish_reason="stop", usage=Usage(input_tokens=1, output_tokens=1))

    def stream(self, request):
        from dspy import lm15

        return lm15.response_to_events(self.complete(request))

    def close(self):
        pass


def lm_of(engine: Oracle, name: str) -> dspy.LM:
    return dspy.LM(f"fake/{name}", engine=engine, cache=False, temperature=0.0)


@pytest.fixture(scope="module")
def splits():
    return load_splits(DataConfig(dataset="banking77", train=8, dev=4, test=2, seed=0))


@pytest.fixture(scope="module")
def gold(splits):
    rows = splits.train + splits.dev + splits.test
    table = {e.query: e.intent for e in rows}
    assert len(table) == len(rows)  # the oracle tells rows apart by their query
    return table


def compile_with(name, settings, splits, task: Oracle, teacher: Oracle | None = None, trainset=None):
    """Compile intent.predict with optimizer `name` the way optimize.trial does; task LM in context."""
    spec = get_program("intent.predict")
    opt = get_optimizer(name)
    ctx = CompileInputs(metric=spec.metric(splits.task), trainset=splits.train if trainset is None else trainset,
                        valset=splits.dev, teacher_lm=lm_of(teacher or task, "teacher"), seed=0, threads=2,
                        input_fields=splits.task.input_fields)
    with dspy.context(lm=lm_of(task, "task"), adapter=adapter()):
        return compile_program(opt, dict(resolve_settings(opt, settings)), spec.build(splits.task), ctx)


def rows(examples) -> list[tuple[str, str]]:
    return [(e.query, e.intent) for e in examples]


def scores(steps: list[dict]) -> list[float]:
    assert [s["step"] for s in steps] == list(range(len(steps)))  # one step per candidate, numbered in order
    return [s["score"] for s in steps]


COVERED = {"none", "labeled_fewshot", "bootstrap_fewshot", "bootstrap_random_search", "knn_fewshot", "copro",
           "mipro_v2", "simba", "gepa", "settings_search"}


def test_every_registered_optimizer_has_a_test_here():
    """Fails when an optimizer is registered (or renamed) without a test of what it produces below."""
    assert set(OPTIMIZERS) == COVERED


def test_none_returns_the_student_untouched(splits, gold):
    """Fails if the zero-shot baseline compiled anything or called the model."""
    task = Oracle(gold)
    compiled, teleprompter = compile_with("none", {}, splits, task)
    assert teleprompter is None and compiled.classify.demos == []
    assert task.classified == [] and task.other == 0
    assert trajectory(compiled, teleprompter) == []


def test_labeled_fewshot_puts_k_distinct_trainset_rows_on_the_predictor(splits, gold):
    """Fails if `k` does not reach LabeledFewShot, or its demos are not (query, gold label) training rows."""
    task = Oracle(gold)
    compiled, _ = compile_with("labeled_fewshot", {"k": 3}, splits, task)
    demos = rows(compiled.classify.demos)
    assert len(demos) == len(set(demos)) == 3
    assert set(demos) <= set(rows(splits.train))
    assert task.classified == []  # labelled demos need no model call


def test_bootstrap_fewshot_keeps_only_the_teachers_traces_that_pass_the_metric(splits, gold):
    """The teacher answers training rows 1, 4 and 6 right and the rest wrong: the demos are those three
    traces (in trainset order, marked augmented), then raw labelled rows from the others up to
    max_labeled_demos. Fails if the metric does not filter the traces, if a wrong answer becomes a demo,
    or if the teacher model is not the one bootstrapping (the task model must get no call)."""
    known = {splits.train[i].query for i in (1, 4, 6)}
    task = Oracle(gold)
    teacher = Oracle(gold, knows=lambda call: call["query"] in known)
    compiled, _ = compile_with("bootstrap_fewshot", {"max_bootstrapped_demos": 4, "max_labeled_demos": 5},
                               splits, task, teacher)
    demos = compiled.classify.demos
    assert rows(demos[:3]) == rows(splits.train[i] for i in (1, 4, 6))
    assert all(d.get("augmented") for d in demos[:3])
    assert len(demos) == 5
    others = set(rows(splits.train)) - set(rows(demos[:3]))
    assert set(rows(demos[3:])) <= others and not any(d.get("augmented") for d in demos[3:])
    assert task.classified == [] and len(teacher.classified) == len(splits.train)


def test_bootstrap_random_search_records_every_candidates_validation_score_in_order(splits, gold):
    """The task model is right only with demos in the prompt, and never on the last validation row. The
    candidates, in the order the optimizer tries them (zero-shot, labelled, bootstrapped, one shuffled
    bootstrap), score 0, 75, 75, 75 per cent of the 4 validation rows. Fails if the trajectory loses or
    reorders candidates, or if the validation set is not passed (all 8 training rows would score 100)."""
    hard = splits.dev[3].query
    task = Oracle(gold, knows=lambda call: bool(call["demos"]) and call["query"] != hard)
    compiled, teleprompter = compile_with("bootstrap_random_search", {"num_candidate_programs": 1,
                                                                      "max_bootstrapped_demos": 2,
                                                                      "max_labeled_demos": 2}, splits, task)
    assert scores(trajectory(compiled, teleprompter)) == [0.0, 75.0, 75.0, 75.0]
    assert compiled.classify.demos  # the best candidate is not the zero-shot one


# Training rows with distinct rare words (and no "the"): each query below shares rare words with exactly one
# row and a common word ("my", "how") with some other row, so the other query's row is not among its two
# nearest (character n-grams give every pair some similarity: the test checks the ranks).
KNN_TRAIN = [("A cash machine swallowed my card", "card_swallowed"),
             ("What exchange rate applies to euros", "exchange_rate"),
             ("My top-up failed again", "top_up_failed"),
             ("How do I change my PIN", "change_pin"),
             ("Can I get a refund for this purchase", "request_refund"),
             ("I lost my phone yesterday", "lost_or_stolen_phone")]
KNN_QUERIES = {"That cash machine kept my card": 0, "How much exchange rate applies to dollars": 1}  # -> its row


def test_knn_fewshot_shows_each_query_the_training_row_it_shares_rare_words_with():
    """With the TF-IDF embedder (the default), the demos shown for a query include the one training row it
    shares rare words with, and not the row that belongs to the other query. Fails if the embedder does
    not rank lexical neighbours first, if demos are not chosen per input, or if `k` is ignored."""
    from optimize.optimizers import tfidf_embedder

    train = [dspy.Example(query=q, intent=i).with_inputs("query") for q, i in KNN_TRAIN]
    embed = tfidf_embedder(train, ("query",))
    similarity = embed(list(KNN_QUERIES)) @ embed([q for q, _ in KNN_TRAIN]).T
    assert similarity.argmax(axis=1).tolist() == [0, 1]
    nearest_two = np.argsort(-similarity, axis=1)[:, :2].tolist()
    assert 1 not in nearest_two[0] and 0 not in nearest_two[1]  # the other query's row is not a near one

    splits = load_splits(DataConfig(dataset="banking77", train=0, dev=0, test=1, seed=0))
    task = Oracle({**dict(KNN_TRAIN), **{q: KNN_TRAIN[row][1] for q, row in KNN_QUERIES.items()}})
    compiled, _ = compile_with("knn_fewshot", {"k": 2}, splits, task, trainset=train)
    with dspy.context(lm=lm_of(task, "task"), adapter=adapter()):
        for query in KNN_QUERIES:
            compiled(query=query)
    shown = {call["query"]: call["demos"] for call in task.classified}
    assert set(shown) == set(KNN_QUERIES)
    for query, row in KNN_QUERIES.items():
        other = KNN_TRAIN[1 - row][0]
        assert len(shown[query]) == 2
        assert KNN_TRAIN[row][0] in shown[query] and other not in shown[query]


@pytest.mark.parametrize("name, settings", [("copro", {}), ("mipro_v2", {}), ("gepa", {"max_metric_calls": 12})])
def test_instruction_optimizers_adopt_the_teachers_better_instruction(name, settings, splits, gold):
    """The task model is right only under the teacher's proposed instruction (MARK). Each optimizer must ask
    the teacher (prompt/reflection model), not the task model, for instructions, keep MARK, and record the
    original instruction's 0 and MARK's full score. Fails if the teacher is not wired as the proposer or
    the trajectory loses, duplicates or reorders steps."""
    task = Oracle(gold, knows=lambda call: MARK in call["system"])
    teacher = Oracle(gold, knows=lambda call: MARK in call["system"], filler=MARK)
    compiled, teleprompter = compile_with(name, settings, splits, task, teacher)
    assert compiled.classify.signature.instructions == MARK
    assert teacher.other > 0 and task.other == 0
    steps = scores(trajectory(compiled, teleprompter))
    full = 1.0 if name == "gepa" else 100.0
    if name == "copro":  # COPRO keeps its candidates best first, without the order it tried them in
        assert steps == [full, 0.0]
    else:  # in the order evaluated: the original program first
        assert steps[0] == 0.0 and max(steps) == full
    if name == "gepa":
        assert steps == [0.0, 1.0]


def test_simba_keeps_a_demo_from_a_successful_trajectory(splits, gold):
    """The task model knows half the training rows zero-shot and all of them with a demo. SIMBA's winner
    carries a demo that is a correctly answered training row; its candidates score the baseline's 0.5 and
    the winner's 1.0. Fails if SIMBA's settings or seed do not reach it, or a wrong trace becomes a demo."""
    known = {e.query for e in splits.train[:4]}
    task = Oracle(gold, knows=lambda call: bool(call["demos"]) or call["query"] in known)
    compiled, teleprompter = compile_with("simba", {"bsize": 4}, splits, task)
    demos = rows(compiled.classify.demos)
    assert demos and set(demos) <= set(rows(splits.train))
    steps = scores(trajectory(compiled, teleprompter))
    assert max(steps) == 1.0 and min(steps) == 0.5


def test_unknown_optimizer_suggests():
    with pytest.raises(ConfigError, match="did you mean 'mipro_v2'"):
        get_optimizer("miprov2")


def test_unknown_setting_lists_allowed():
    with pytest.raises(ConfigError, match="has no setting 'kk'; allowed: .*k"):
        resolve_settings(get_optimizer("labeled_fewshot"), {"kk": 3})


def test_none_takes_no_settings():
    with pytest.raises(ConfigError, match="takes no settings"):
        resolve_settings(get_optimizer("none"), {"k": 1})


def test_settings_override_the_defaults_and_keep_the_rest():
    """Fails if a user's setting is dropped or a default is lost (tracking logs what this returns)."""
    resolved = resolve_settings(get_optimizer("bootstrap_fewshot"), {"max_labeled_demos": 1})
    assert resolved == {"max_bootstrapped_demos": 4, "max_labeled_demos": 1, "max_rounds": 1}
    assert resolve_settings(get_optimizer("knn_fewshot"), {"embedder": "tfidf", "k": 2})["k"] == 2


def test_bad_embedder():
    with pytest.raises(ConfigError, match="embedder 'bert'"):
        compile_program(get_optimizer("knn_fewshot"), {"k": 2, "embedder": "bert"}, dspy.Predict("q -> a"),
                        CompileInputs(metric=lambda *a: 1, trainset=[], valset=[], teacher_lm=None, seed=0,
                                      threads=1, input_fields=("q",)))


def test_two_tfidf_embedders_never_share_cached_vectors():
    """Two runs fit two vocabularies; DSPy's embedding cache must not hand one's vectors to the other."""
    from optimize.optimizers import tfidf_embedder

    small = [dspy.Example(query=q).with_inputs("query") for q in ["card arrived", "top up"]]
    large = [dspy.Example(query=q).with_inputs("query") for q in
             ["card arrived late", "top up failed", "exchange rate euros", "lost my phone and card"]]
    query = ["has my card arrived"]
    assert tfidf_embedder(large, ("query",))(query).shape[1] != tfidf_embedder(small, ("query",))(query).shape[1]
    assert np.any(tfidf_embedder(large, ("query",))(query))


def search_retrieve(space, splits, task: Oracle, **more):
    """settings_search over intent.retrieve whose pool holds the dev rows: 1-NN alone answers them right."""
    from programs.retrieval import fill_retrievers

    spec, opt = get_program("intent.retrieve"), get_optimizer("settings_search")
    student = spec.build(splits.task, k=2)
    fill_retrievers(student, splits.train + splits.dev)
    ctx = CompileInputs(metric=spec.metric(splits.task), trainset=splits.train, valset=splits.dev,
                        teacher_lm=lm_of(task, "teacher"), seed=0, threads=2, input_fields=splits.task.input_fields)
    settings = resolve_settings(opt, {"space": space, **more})
    with dspy.context(lm=lm_of(task, "task"), adapter=adapter()):
        return compile_program(opt, dict(settings), student, ctx)


class MeteredOracle(Oracle):
    def complete(self, request):
        from optimize import cost

        cost.record(cost.Usage(calls=1, input_computed=100, output=5))
        return super().complete(request)


def test_settings_search_keeps_the_setting_that_scores_best(splits, gold):
    """A model that is always wrong: answering from agreeing neighbours (agree = 1) must win over asking it."""
    task = MeteredOracle(gold, knows=lambda call: False)
    compiled, teleprompter = search_retrieve({"agree": [0, 1]}, splits, task)
    assert compiled.settings["agree"] == 1 and compiled.settings["k"] == 2
    steps = trajectory(compiled, teleprompter)
    assert sorted(scores(steps)) == [0.0, 1.0]
    # Each step names the setting it scored: fails if the record keeps the scores alone.
    assert {step["settings"]["agree"]: step["score"] for step in steps} == {0: 0.0, 1: 1.0}
    assert all(step["tokens_per_example"] >= 0 and "seconds_per_success" in step for step in steps)


def test_settings_search_breaks_a_tie_by_fewer_tokens(splits, gold):
    """A model that is always right: both settings score 1.0; the one that makes no LM call wins."""
    task = MeteredOracle(gold)
    compiled, teleprompter = search_retrieve({"agree": [0, 1]}, splits, task)
    assert compiled.settings["agree"] == 1
    by_setting = {c["settings"]["agree"]: c for c in teleprompter.candidate_programs}
    assert by_setting[0]["score"] == by_setting[1]["score"] == 1.0
    assert by_setting[0]["tokens_per_example"] > by_setting[1]["tokens_per_example"] == 0


def test_a_users_setting_wins_over_the_runtime_default(splits, gold):
    """`num_threads` is also passed from [eval] threads: fails if the two collide (a TypeError) or the
    run's value overrides the user's."""
    _, teleprompter = search_retrieve({"agree": [0, 1]}, splits, Oracle(gold), num_threads=3, seed=7)
    assert (teleprompter.num_threads, teleprompter.seed) == (3, 7)


def test_settings_search_refuses_a_setting_the_program_lacks(splits, gold):
    with pytest.raises(ConfigError, match="has no setting kk; it has: k, candidates"):
        search_retrieve({"kk": [1, 2]}, splits, Oracle(gold))
    with pytest.raises(ConfigError, match="has no settings to search"):
        compile_with("settings_search", {}, splits, Oracle(gold))
