"""math.expr on DummyLM: the grammar admits only the problem's numbers, the calculator answers, failures are
recorded, samples vote, the pool and settings survive save/load; and a short run on the embedded model."""

import json
import re

import dspy
import pytest
from dspy.utils.dummies import DummyLM
from dspy.lm15 import Message, Response, TextPart, Usage
from llama_cpp.llama_grammar import LlamaGrammar

from optimize.data import Task
from optimize.llm.adapter import CacheFriendlyAdapter
from optimize.llm.engine import schema_grammar
from optimize.trial import get_program
from programs.math import (chained_expression, demo_expression, expression_pattern, problem_numbers,
                           tidy_expression, transfer_expression)
from programs.retrieval import fill_retrievers

TASK = Task("svamp", "math", ("question",), "answer")
ADAPTER = CacheFriendlyAdapter()
POOL = [dspy.Example(question=q, answer=a, equation=e).with_inputs("question") for q, a, e in [
    ("Each pack of dvds costs 76 dollars. With a discount of 25 dollars, how much is a pack?", "51", "( 76.0 - 25.0 )"),
    ("Jerry had 7 action figures and added 3 more. How many does he have?", "10", "( 7.0 + 3.0 )"),
    ("Jerry had 4 action figures and added 2 more each day for 3 days. How many now?", "10", "( 4.0 + ( 2.0 * 3.0 ) )"),
    ("A baker made 12 cakes and sold 5 cakes. How many cakes are left?", "7", "( 12.0 - 5.0 )"),
    ("A tower of 9 cakes is shared by 2 people. How many each?", "4.5", "( 9.0 / 2.0 )"),
    ("Mary has 3 marbles and finds 1 more. How many marbles?", "4", "( 3.0 + 1.0 ) * 100.0"),  # wrong: dropped
]]
QUESTION = "Jerry had 8 action figures and added 2 more. How many does he have?"


def program(**settings):
    built = get_program("math.expr").build(TASK, **settings)
    fill_retrievers(built, POOL)
    return built


def ask(built, answers, question=QUESTION, adapter=ADAPTER):
    lm = DummyLM(answers, adapter=adapter)
    with dspy.context(lm=lm, adapter=adapter):
        return built(question=question), lm


def test_problem_numbers_drop_commas_and_repeats():
    assert problem_numbers("He paid $1,200.50 for 3 chairs, 3 tables and 12 lamps.") == ("1200.50", "3", "12")


def test_problem_numbers_read_number_words_in_their_place():
    # GSM8K writes many of the numbers its solutions use in words: "twice" and "half" need a 2, "%" a 100.
    text = "Twenty-five kids ate half of the 30 cakes, twice as many as a dozen; 20% tax, three times."
    assert problem_numbers(text) == ("25", "2", "30", "12", "20", "100", "3")
    assert problem_numbers("None of the one hundred") == ()  # "one" is no operand; "none" no number


def test_a_gsm8k_solution_with_a_number_in_words_becomes_a_demo_expression():
    rationale = "Half of 30 is <<30/2=15>>15. Then 15 + 4 = <<15+4=19>>19."
    example = {"question": "Tom had 30 apples and gave half away, then found 4. How many?", "answer": "19",
               "rationale": rationale}
    assert demo_expression(example, example["question"], "answer") == "(30 / 2) + 4"  # digits alone: no 2


def test_the_pattern_admits_only_the_problems_numbers():
    pattern = expression_pattern(problem_numbers("12 apples cost 3.5 dollars; 100 of them"))
    for ok in ("12 * 3.5", "(12 + 100) / 3.5", "((12 - 3.5) * 100)", "12"):
        assert re.fullmatch(pattern, ok), ok
    for bad in ("12 * 4", "1 + 2", "123", "1212", "12 ** 2", "3,5", "12 +", "12 % 100", "sqrt(12)", "12 = 3"):
        assert not re.fullmatch(pattern, bad), bad


class Recorder:
    """A DSPy engine that answers one expression and keeps each request's schema and sampling settings."""

    supports_response_schema = True
    supported_params = frozenset({"response_format", "temperature", "max_tokens", "seed"})

    def __init__(self, answer: str):
        self.answer, self.requests = answer, []

    def complete(self, request):
        self.requests.append(request.config)
        return Response(id=None, model=request.model, message=Message.assistant(
            [TextPart(json.dumps({"expression": self.answer}))]), finish_reason="stop",
            usage=Usage(input_tokens=1, output_tokens=1))

    def close(self):
        pass


def test_the_engine_gets_a_grammar_of_the_problems_numbers():
    """DSPy drops pydantic constraints from its response schema: the adapter adds the pattern, and llama.cpp
    turns it into a grammar that names the problem's numbers and nothing else."""
    engine = Recorder("8 + 2")
    with dspy.context(lm=dspy.LM("fake/recorder", engine=engine, cache=False), adapter=ADAPTER):
        prediction = program(choices=0)(question=QUESTION)
    schema = engine.requests[-1].response_format["schema"]
    assert schema["properties"]["expression"]["pattern"] == expression_pattern(("8", "2"))
    grammar = schema_grammar(json.dumps(schema))
    LlamaGrammar.from_string(grammar, verbose=False)  # llama.cpp accepts it
    rule = next(line for line in grammar.splitlines() if line.startswith("expression ::="))
    assert '"8"' in rule and '"2"' in rule and not re.search(r'"[013-79]"|\[0-9', rule)
    assert prediction.answer == 10 and prediction.expression == "8 + 2"


def test_the_plan_of_math_chain_is_capped_by_its_schema():
    engine = Recorder("unused")
    with dspy.context(lm=dspy.LM("fake/recorder", engine=engine, cache=False), adapter=ADAPTER):
        get_program("math.chain").build(TASK, max_steps=3, max_retries=0)(question=QUESTION)
    steps = engine.requests[-1].response_format["schema"]["properties"]["steps"]
    assert (steps["minItems"], steps["maxItems"]) == (1, 3)
    grammar = schema_grammar(json.dumps(engine.requests[-1].response_format["schema"]))
    rule = next(line for line in grammar.splitlines() if line.startswith("steps ::="))
    assert rule.count("steps-item") == 3 and "*" not in rule  # one to three steps, never more


def test_the_calculator_answers_and_demos_come_nearest_last():
    prediction, lm = ask(program(k=3), [{"expression": "8 + 2"}])
    assert prediction.answer == 10 and prediction.steps == 1 and prediction.validator_failures == 0
    system, *demos, request = lm.history[-1]["messages"]
    users = [m["content"] for m in demos if m["role"] == "user"]
    assistants = [m["content"] for m in demos if m["role"] == "assistant"]
    assert len(users) == 3 and "Jerry had 7 action figures and added 3 more" in users[-1]
    assert '"7 + 3"' in assistants[-1]  # SVAMP's equation, tidied into the problem's own numbers
    assert QUESTION in request["content"] and "8" not in system["content"]
    _, nearest_first = ask(program(k=3, nearest_last=0), [{"expression": "8 + 2"}])
    assert "Jerry had 7 action figures" in [m["content"] for m in nearest_first.history[-1]["messages"][1:-1]
                                             if m["role"] == "user"][0]


def test_the_system_prompt_is_the_same_for_every_problem():
    built = program()
    _, first = ask(built, [{"expression": "8 + 2"}])
    _, second = ask(built, [{"expression": "12 - 5"}], "A baker made 12 cakes and sold 5. How many are left?")
    assert first.history[-1]["messages"][0] == second.history[-1]["messages"][0]


@pytest.mark.parametrize("expression, failure", [
    ("8 / (2 - 2)", "division by zero"),
    ("8 + 3", "not an expression over the problem's numbers"),
    ("8 +", "not an expression over the problem's numbers"),
])
def test_a_bad_expression_is_a_recorded_failure(expression, failure):
    # ChatAdapter has no decoding grammar: what the model writes reaches the program's own check.
    prediction, _ = ask(program(max_retries=0), [{"expression": expression}],
                        adapter=dspy.ChatAdapter(use_json_adapter_fallback=False))
    assert prediction.answer is None and prediction.validator_failures == 1
    assert failure in prediction.trace_notes[-1]


def test_samples_vote_over_computed_values():
    answers = [{"expression": "8 - 2"}, {"expression": "8 + 2"}, {"expression": "(8 + 2)"}, {"expression": "8 / 0"}]
    prediction, lm = ask(program(samples=4, max_retries=0), answers,
                         adapter=dspy.ChatAdapter(use_json_adapter_fallback=False))
    assert prediction.answer == 10 and prediction.expression == "8 + 2" and prediction.agreement == 0.5
    assert prediction.steps == 4 and prediction.validator_failures == 1
    assert "vote: 10 from 2 of 4 samples" in prediction.trace_notes
    # The first sample is greedy, the others sampled with their own seeds.
    configs = [entry["kwargs"] for entry in lm.history]
    assert "temperature" not in configs[0] and [c["seed"] for c in configs[1:]] == [1, 2, 3]


def test_an_answer_unlike_every_training_answer_is_retried_sampled():
    # Every training answer here is a whole number >= 0 (the 4.5 one left out): 2 - 8 and 2 / 8 are rejected,
    # and another expression is sampled in their place, each retry with its own seed.
    built = get_program("math.expr").build(TASK)
    fill_retrievers(built, [e for e in POOL if e.answer != "4.5"])
    answers = [{"expression": "2 - 8"}, {"expression": "2 / 8"}, {"expression": "8 + 2"}]
    prediction, lm = ask(built, answers)
    assert prediction.answer == 10 and prediction.expression == "8 + 2"
    assert (prediction.steps, prediction.validator_failures, prediction.retries) == (3, 2, 2)
    notes = "\n".join(prediction.trace_notes)
    assert "attempt 1: 2 - 8 = -6 is negative; no training answer is" in notes
    assert "attempt 2: 2 / 8 = 0.25 is not a whole number; every training answer is" in notes
    assert [entry["kwargs"].get("seed") for entry in lm.history] == [None, 1, 2]
    given_up, _ = ask(built, [{"expression": "2 - 8"}] * 3)
    assert given_up.answer is None and given_up.validator_failures == 3  # 1 + max_retries (2) tries
    fractions_allowed = program()  # the full POOL has 4.5: a fraction is a possible answer, a negative is not
    assert fractions_allowed.retrieve.implausible(0.25) is None and fractions_allowed.retrieve.implausible(-1)


def test_repair_reads_a_negative_difference_the_other_way_round():
    built = get_program("math.expr").build(TASK, repair=1)
    fill_retrievers(built, [e for e in POOL if e.answer != "4.5"])
    prediction, lm = ask(built, [{"expression": "2 - 8"}])
    assert prediction.answer == 6 and prediction.expression == "8 - 2" and len(lm.history) == 1
    assert (prediction.validator_failures, prediction.retries) == (1, 0)  # the slip is still on record
    assert "repaired: 8 - 2 = 6" in prediction.trace_notes
    # Only a difference is reversed: a negative product is retried as before.
    prediction, lm = ask(built, [{"expression": "(2 - 8) * 2"}, {"expression": "8 + 2"}])
    assert prediction.answer == 10 and len(lm.history) == 2
    # A repaired sample votes like any other: 8 - 2 twice outvotes 8 + 2 once.
    voting = get_program("math.expr").build(TASK, repair=1, samples=3)
    fill_retrievers(voting, [e for e in POOL if e.answer != "4.5"])
    prediction, _ = ask(voting, [{"expression": "8 + 2"}, {"expression": "2 - 8"}, {"expression": "8 - 2"}])
    assert prediction.answer == 6 and prediction.agreement == 2 / 3


def test_reversed_difference_negates_only_a_last_subtraction():
    from programs.math import reversed_difference

    assert reversed_difference("5 - 18") == "18 - 5"
    assert reversed_difference("12 - (3 + 20)") == "3 + 20 - 12"
    assert reversed_difference("3 - 4 - 5") == "5 - (3 - 4)"
    assert reversed_difference("(2 - 9) * 3") is None and reversed_difference("7") is None


def test_the_answers_domain_is_saved_with_the_program(tmp_path):
    # A training answer of -3 whose equation is wrong: not in the pool, but negatives are possible answers.
    # Judged again from the saved pool alone, a restored program would reject them.
    built = get_program("math.expr").build(TASK)
    fill_retrievers(built, [*POOL, dspy.Example(question="It was 2 degrees and fell 5", answer="-3",
                                                equation="( 2.0 + 5.0 )").with_inputs("question")])
    assert not built.retrieve.domain.non_negative and all(e["answer"] != "-3" for e in built.retrieve.examples)
    path = tmp_path / "program.json"
    built.save(str(path))
    restored = get_program("math.expr").build(TASK)
    restored.load(str(path))
    assert not restored.retrieve.domain.non_negative and restored.retrieve.implausible(-3) is None


def test_a_tie_goes_to_the_greedy_sample():
    answers = [{"expression": "8 - 2"}, {"expression": "8 + 2"}]
    prediction, _ = ask(program(samples=2), answers, adapter=dspy.ChatAdapter(use_json_adapter_fallback=False))
    assert prediction.answer == 6 and prediction.agreement == 0.5


def test_the_pool_keeps_only_examples_whose_expression_checks_out():
    pool = program().retrieve.examples
    assert len(pool) == len(POOL) - 1 and all("expression" in e for e in pool)
    assert [e["expression"] for e in pool[:3]] == ["76 - 25", "7 + 3", "4 + (2 * 3)"]


def test_gsm8k_annotations_chain_into_one_expression():
    rationale = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72 clips."
    assert chained_expression(rationale, ("48",)) == "48 + (48 / 2)"
    assert chained_expression("<<20*.01=.2>>", ("20",)) is None  # `.01` is no number a problem writes so
    assert tidy_expression("( ( 10.0 - 7.0 ) * 2.0 )") == "(10 - 7) * 2"


def test_saved_program_carries_its_pool_and_settings(tmp_path):
    built = program(k=3)
    built.settings.values["samples"] = 3  # as a settings search would leave it
    path = tmp_path / "program.json"
    built.save(str(path))
    state = json.loads(path.read_text())
    assert len(state["retrieve"]["examples"]) == len(POOL) - 1 and state["settings"]["samples"] == 3
    restored = get_program("math.expr").build(TASK)  # defaults, no pool: all comes from the file
    restored.load(str(path))
    assert restored.settings["k"] == 3 and restored.settings["samples"] == 3
    assert restored.retrieve.examples == built.retrieve.examples
    prediction, _ = ask(restored, [{"expression": "8 + 2"}] * 3)
    assert prediction.answer == 10 and prediction.steps == 3


@pytest.mark.model
def test_on_the_embedded_model_answers_are_expressions_over_the_problems_numbers(sequential_lm):
    from optimize.config import DataConfig
    from optimize.data import load_splits

    splits = load_splits(DataConfig(dataset="svamp", train=700, test=4, seed=0))
    built = get_program("math.expr").build(splits.task)
    fill_retrievers(built, splits.train)
    with dspy.context(lm=sequential_lm, adapter=ADAPTER):
        for example in splits.test:
            prediction = built(question=example.question)
            assert isinstance(prediction.answer, (int, float)), prediction.trace_notes
            numbers = set(problem_numbers(example.question))
            assert set(re.findall(r"\d+(?:\.\d+)?", prediction.expression)) <= numbers, prediction.expression
            assert prediction.parse_failures == 0 and prediction.validator_failures == 0


def test_a_plan_longer_than_max_steps_is_a_recorded_failure(tmp_path):
    # Without a grammar (ChatAdapter) a long plan reaches the check; the cap survives save and load.
    built = get_program("math.chain").build(TASK, max_steps=2, max_retries=0)
    path = tmp_path / "program.json"
    built.save(str(path))
    built.load(str(path))
    assert built.plan.signature.output_fields["steps"].json_schema_extra["output_schema"]["maxItems"] == 2
    plan = {"steps": [{"question": "q", "expression": "8 + 2"}] * 3}
    prediction, _ = ask(built, [plan], adapter=dspy.ChatAdapter(use_json_adapter_fallback=False))
    assert prediction.answer is None and "the plan has 3 steps; use at most 2" in prediction.trace_notes[-1]


def test_transfer_puts_this_problems_numbers_in_a_neighbours_places():
    assert transfer_expression("12 - 5", ("12", "5"), ("30", "8")) == "30 - 8"
    assert transfer_expression("4 + (2 * 3)", ("4", "2", "3"), ("1.50", "7", "9")) == "1.50 + (7 * 9)"
    assert transfer_expression("5 - 12", ("12", "5"), ("30", "8")) == "8 - 30"  # by place, not by size
    assert transfer_expression("4 + (2 * 3)", ("4", "2", "3"), ("1", "7")) is None  # no third number here
    assert transfer_expression("4 * 100", ("4", "2"), ("1", "7")) is None  # 100 is not in its problem


def test_choices_narrow_the_answer_to_the_neighbours_expressions_transferred():
    # The nearest three: "7 + 3" (→ 8 + 2), "4 + (2 * 3)" (three numbers: does not transfer), and a
    # subtraction "12 - 5" (→ 2 - 8 = -6: negative, where no training answer is, so left out).
    question = "Jerry had 2 action figures and added 8 more. How many does he have?"
    engine = Recorder("2 + 8")
    with dspy.context(lm=dspy.LM("fake/recorder", engine=engine, cache=False), adapter=ADAPTER):
        prediction = program(k=5, choices=4)(question=question)
        free = program(k=5, choices=0)(question=question)
    narrowed, open_ = (r.response_format["schema"]["properties"]["expression"] for r in engine.requests)
    assert narrowed["enum"] == ["2 + 8", "2 / 8"] and "pattern" not in narrowed
    assert open_["pattern"] == expression_pattern(("2", "8")) and "enum" not in open_
    grammar = schema_grammar(json.dumps(engine.requests[0].response_format["schema"]))
    LlamaGrammar.from_string(grammar, verbose=False)
    assert prediction.answer == 10 and "choices: 2 + 8; 2 / 8" in prediction.trace_notes
    assert free.answer == 10


def test_choices_can_reach_further_than_the_demos():
    question = "Jerry had 2 action figures and added 8 more. How many does he have?"
    engine = Recorder("2 + 8")
    with dspy.context(lm=dspy.LM("fake/recorder", engine=engine, cache=False), adapter=ADAPTER):
        program(k=1, choices=4, choices_from=0)(question=question)
        program(k=1, choices=4, choices_from=5)(question=question)
        program(k=1, choices=1, choices_from=5)(question=question)
    enums = [r.response_format["schema"]["properties"]["expression"]["enum"] for r in engine.requests]
    assert enums == [["2 + 8"], ["2 + 8", "2 / 8"], ["2 + 8"]]
    _, lm = ask(program(k=1, choices=4, choices_from=5), [{"expression": "2 + 8"}], question)
    assert len([m for m in lm.history[-1]["messages"][1:-1] if m["role"] == "user"]) == 1  # one demo shown


def test_similar_problems_that_agree_answer_without_a_call():
    # Onto (5, 1, 2) two subtractions transfer as 5 - 1, the others to 5 / 1, 5 + 1, 5 + (1 * 2): with agree = 2
    # the value two neighbours give is the answer and the model is not asked (DummyLM has no answer to give).
    question = "Jerry had 5 action figures, gave away 1, then bought 2. How many does he have?"
    prediction, lm = ask(program(choices=4, choices_from=6, agree=2), [], question)
    assert (prediction.answer, prediction.expression, prediction.agreement) == (4, "5 - 1", 1.0)
    assert lm.history == [] and prediction.steps == 0
    assert "2 of 5 similar problems give 5 - 1 = 4: no call" in prediction.trace_notes
    prediction, lm = ask(program(choices=4, choices_from=6, agree=3), [{"expression": "5 + 1"}], question)
    assert len(lm.history) == 1 and prediction.answer == 6  # two do not make three: the model chooses
