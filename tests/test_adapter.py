"""CacheFriendlyAdapter: static parts first, the example's input last, JSONAdapter's schema and parsing."""

from typing import Literal

import dspy
from dspy.utils.dummies import DummyLM

from optimize.llm.adapter import CacheFriendlyAdapter


class Pick(dspy.Signature):
    """Pick the colour named in the sentence."""

    sentence: str = dspy.InputField()
    colour: Literal["red", "green", "blue"] = dspy.OutputField()


def test_per_example_input_comes_last_and_requirements_move_to_the_system_message():
    adapter = CacheFriendlyAdapter()
    first = adapter.format(Pick, [], {"sentence": "A red car."})
    second = adapter.format(Pick, [], {"sentence": "Green grass."})
    assert first[:-1] == second[:-1]  # everything but the last message is shared
    assert first[-1] == {"role": "user", "content": "[[ ## sentence ## ]]\nA red car."}
    system = first[0]["content"]
    assert "Respond with a JSON object" in system
    assert system.index("Respond with a JSON object") < system.index("your objective is")


def test_choices_are_listed_once():
    system = CacheFriendlyAdapter().format(Pick, [], {"sentence": "A red car."})[0]["content"]
    stock = dspy.JSONAdapter().format(Pick, [], {"sentence": "A red car."})
    stock_text = "".join(m["content"] for m in stock)
    assert stock_text.count("green") == 3 and system.count("green") == 1
    assert "one of: red; green; blue" in system


def test_demos_come_before_the_input():
    messages = CacheFriendlyAdapter().format(Pick, [{"sentence": "Blue sea.", "colour": "blue"}], {"sentence": "A red car."})
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert '"colour": "blue"' in messages[2]["content"]


def test_parse_round_trip_with_dummy_lm():
    adapter = CacheFriendlyAdapter()
    with dspy.context(lm=DummyLM([{"colour": "green"}], adapter=adapter), adapter=adapter):
        assert dspy.Predict(Pick)(sentence="Green grass.").colour == "green"


def test_response_schema_equals_json_adapters():
    class SchemaLM:
        """Just what _prepare_response_format reads from an LM."""

        supported_params = frozenset({"response_format"})
        supports_response_schema = True

    schemas = []
    for adapter in (dspy.JSONAdapter(), CacheFriendlyAdapter()):
        kwargs: dict = {}
        adapter._prepare_response_format(SchemaLM(), kwargs, Pick)
        schemas.append(kwargs["response_format"].model_json_schema())
    assert schemas[0] == schemas[1]
