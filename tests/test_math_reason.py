"""math.reason: the model reasons in its own words and boxes the answer; the adapter asks that way and reads
the box, a reply without one is a recorded failure and sampled again, samples vote. DummyLM replies stand in
for the model; the last test asks the real 0.5B model one GSM8K problem."""

import importlib.util

import dspy
import pytest
from dspy.utils.dummies import DummyLM
from dspy.utils.exceptions import AdapterParseError

from optimize.config import DataConfig, ModelConfig
from optimize.data import Task, load_splits
from optimize.llm.engine import build_lm
from optimize.llm.models import QWEN
from optimize.trial import adapter, get_program
from programs.contract import ProgramError
from programs.retrieval import fill_retrievers
from programs.reasoning import BOX_INSTRUCTIONS, BoxedAnswerAdapter, boxed_number, last_box

TASK = Task("gsm8k", "math", ("question",), "answer")
QUESTION = "Jerry had 8 action figures and added 2 more. How many does he have?"


class Replies:
    """What DummyLM needs of an adapter to write a reply: here the reply is the `reasoning` text as it is."""

    def format_field_with_value(self, fields, role=None):
        return next(value for field, value in fields.items() if field.name == "reasoning")


def run(replies, samples=1, max_retries=1, demos=(), train=()):
    built = get_program("math.reason").build(TASK, samples=samples, max_retries=max_retries)
    built.solve.demos = list(demos)
    fill_retrievers(built, [dspy.Example(question=f"problem {n}", answer=a).with_inputs("question")
                            for n, a in enumerate(train)])
    lm = DummyLM([{"reasoning": reply} for reply in replies], adapter=Replies())
    with dspy.context(lm=lm, adapter=adapter()):  # the run's JSON adapter: the program must not use it
        return built(question=QUESTION), lm


@pytest.mark.parametrize("text, box", [
    ("so 8 + 2 = 10.\nThe answer is \\(\\boxed{10}\\).", "10"),
    ("first \\boxed{3}, then again \\boxed{\\frac{35}{16}} hours", "\\frac{35}{16}"),  # the last, nested braces
    ("no box at all: 10", None),
    ("cut off at max_tokens: \\boxed{1", None),
])
def test_last_box(text, box):
    """Fails if the first box is read, nested braces end it early, or an unclosed box is read."""
    assert last_box(text) == box


@pytest.mark.parametrize("box, number", [
    ("18", 18), ("167,500", 167500), ("\\$13.50", 13.5), ("12 \\text{ apples}", 12), ("24 hours", 24),
    ("\\frac{35}{16}", 35 / 16), ("3 \\times 4", 12), ("20\\%", 20), ("-7", -7), ("80.", 80),
])
def test_boxed_number_reads_latex(box, number):
    """Fails if a LaTeX fraction, product, dollar sign, unit or thousands comma is misread."""
    assert boxed_number(box) == pytest.approx(number)


@pytest.mark.parametrize("box", ["x = 5", "3 or 4", "\\text{no answer}", ""])
def test_boxed_number_refuses_a_box_without_one_number(box):
    """Fails if the last number of an equation or of two candidates is taken for the answer."""
    with pytest.raises(ValueError, match="no single number in the box"):
        boxed_number(box)


def test_the_adapter_asks_as_a_chat_user_would():
    """Fails if a system message (JSON fields, a schema) is sent, the instructions do not follow the question,
    a labelled demo keeps GSM8K's calculator annotations or has no box, or a demo with no reasoning is shown."""
    signature = get_program("math.reason").build(TASK).solve.signature
    demos = [{"question": "Tom has 30 apples and gives half away. How many are left?", "answer": "15",
              "rationale": "Half of 30 is 30/2=<<30/2=15>>15."},
             {"question": "Ann has 3 cats and 1 dog. How many pets?", "answer": "4",
              "reasoning": "3 + 1 = 4, so \\boxed{4}."},
             {"question": "A question with no worked solution", "answer": "1"}]
    messages = BoxedAnswerAdapter().format(signature, demos, {"question": QUESTION})
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user"]
    assert messages[0]["content"] == f"{demos[0]['question']}\n{BOX_INSTRUCTIONS}"
    assert messages[1]["content"] == "Half of 30 is 30/2=15.\n\nThe final answer is $\\boxed{15}$."
    assert messages[3]["content"] == "3 + 1 = 4, so \\boxed{4}."  # already boxed: shown as it is
    assert messages[-1]["content"] == f"{QUESTION}\n{BOX_INSTRUCTIONS}"


def test_the_adapter_reads_the_box_and_rejects_a_reply_without_one():
    """Fails if the reasoning is not kept whole, or a reply with no box parses."""
    signature = get_program("math.reason").build(TASK).solve.signature
    reply = "8 + 2 = 10, so he has \\boxed{10} figures."
    assert BoxedAnswerAdapter().parse(signature, reply) == {"reasoning": reply, "answer": "10"}
    with pytest.raises(AdapterParseError, match="no \\\\boxed"):
        BoxedAnswerAdapter().parse(signature, "He has 10 figures.")


def test_the_boxed_answer_is_the_programs_answer():
    """Fails if the program runs under the run's JSON adapter (DummyLM's plain reply would not parse) or the
    box is not read as a number."""
    prediction, lm = run(["8 + 2 = 10. So Jerry has \\(\\boxed{10}\\) figures."])
    assert prediction.answer == 10 and prediction.agreement == 1.0
    assert prediction.steps == 1 and prediction.validator_failures == 0
    assert prediction.trace_notes == ["boxed: 10 = 10"]
    assert [m["role"] for m in lm.history[0]["messages"]] == ["user"]


def test_a_reply_without_a_box_is_recorded_and_sampled_again():
    """Fails if the failure is not counted, the retry is not made, or the retry is greedy again (the same
    input at temperature 0 would give the same unboxed reply)."""
    prediction, lm = run(["Jerry has ten figures.", "8 + 2 = 10, \\boxed{10}"])
    assert prediction.answer == 10
    assert (prediction.steps, prediction.retries, prediction.validator_failures, prediction.parse_failures) == (2, 1, 1, 1)
    assert prediction.trace_notes[0].startswith("attempt 1: the answer could not be read")
    assert lm.history[1]["kwargs"]["temperature"] > 0


def test_no_readable_reply_gives_no_answer():
    """Fails if a box without a number becomes an answer, or more calls are made than max_retries allows."""
    prediction, _ = run(["\\boxed{x = 5}", "\\boxed{3 or 4}", "never asked"], max_retries=1)
    assert prediction.answer is None and prediction.agreement == 0.0
    assert (prediction.steps, prediction.validator_failures) == (2, 2)


def test_samples_vote_and_agreement_is_the_winners_share():
    """Fails if the greedy reply wins against two agreeing samples, or agreement is not 2 of 3."""
    prediction, _ = run(["\\boxed{12}", "\\boxed{10}", "\\boxed{10.0}"], samples=3)
    assert prediction.answer == 10 and prediction.agreement == pytest.approx(2 / 3)
    assert prediction.trace_notes[-1] == "vote: 10 from 2 of 3 samples"


def test_an_answer_unlike_every_training_answer_is_sampled_again():
    """Fails if the training split is not learned (the fraction would be the answer) or the rejection is
    not recorded as the answer-domain check's."""
    prediction, lm = run(["\\boxed{2.4}", "\\boxed{4}"], train=["12", "7", "1,200"])
    assert prediction.answer == 4 and (prediction.steps, prediction.retries, prediction.validator_failures) == (2, 1, 1)
    assert prediction.trace_notes[0] == "attempt 1: 2.4 = 2.4 is not a whole number; every training answer is"
    assert lm.history[1]["kwargs"]["temperature"] > 0


def test_with_no_training_split_any_number_is_an_answer():
    """Fails if an empty domain rejects answers (an eval with train = 0 would answer nothing)."""
    prediction, _ = run(["\\boxed{-2.5}"])
    assert prediction.answer == -2.5 and prediction.validator_failures == 0


def test_the_learned_domain_survives_save_and_load(tmp_path):
    """Fails if an exported program forgets what the training answers were like."""
    built = get_program("math.reason").build(TASK)
    fill_retrievers(built, [dspy.Example(question="q", answer="3").with_inputs("question")])
    built.save(str(tmp_path / "program.json"))
    restored = get_program("math.reason").build(TASK)
    restored.load(str(tmp_path / "program.json"))
    assert restored.domain.implausible(-1) == "-1 is negative; no training answer is"
    assert restored.domain.implausible(0.5) == "0.5 is not a whole number; every training answer is"


def test_bad_settings_are_one_line():
    with pytest.raises(ProgramError, match="math.reason needs samples >= 1"):
        get_program("math.reason").build(TASK, samples=0)


installed = pytest.mark.skipif(importlib.util.find_spec(QWEN.packages[0]) is None,
                               reason="needs the chainopt[qwen] extra")


@installed
@pytest.mark.model
def test_real_qwen_reasons_and_boxes_a_gsm8k_answer():
    """A GSM8K test problem the 0.5B model solves when asked its own way (240 apples in total), through
    chainopt's engine. Fails if the engine or the adapter change the prompt away from the model's own chat
    format (no system message: the template's default) or the reply's box is not read."""
    splits = load_splits(DataConfig(dataset="gsm8k", train=0, test=2, seed=0))
    problem = splits.test[1]
    lm = build_lm(ModelConfig(spec="qwen2.5-coder-0.5b", engine="sequential", cache=False, max_tokens=512,
                              n_ctx=2048))
    with dspy.context(lm=lm, adapter=adapter()):
        prediction = get_program("math.reason").build(splits.task)(question=problem.question)
    assert problem.answer == "240" and prediction.answer == 240, prediction.trace_notes
    assert lm.history[-1]["messages"] == [{"role": "user", "content": f"{problem.question}\n{BOX_INSTRUCTIONS}"}]
