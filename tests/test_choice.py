"""Settling a choice early: when the answer's last field is a choice and one choice alone fits what was
decoded, the rest is forced by the grammar and needs no decoding."""

import json

import pytest

from optimize.llm.types import final_choice, settle_choice

LABELS = ("card_arrival", "card_linking", "change_pin", "card")


@pytest.mark.parametrize("text, rest", [
    ('{"intent": "card_a', 'rrival"}'),
    ('{\n  "intent": "ch', 'ange_pin"}'),
    ('{"intent": "card', None),  # "card" itself and two longer labels still fit
    ('{"intent": "', None),
    ('{"intent": "card_arrival"', None),  # the value is closed: decoding goes on normally
    ('{"reasoning": "x \\"intent\\": \\"ch', None),  # escaped quotes inside an earlier string value
    ('{"intent": "zz', None),
])
def test_settle_choice(text, rest):
    assert settle_choice(text, "intent", LABELS) == rest


def test_settled_text_parses_to_the_choice():
    text = '{"reasoning": "lost it", "intent": "change_p'
    assert json.loads(text + settle_choice(text, "intent", LABELS)) == {"reasoning": "lost it", "intent": "change_pin"}


def test_final_choice_reads_the_last_required_enum():
    schema = {"type": "object", "properties": {"reasoning": {"type": "string"},
                                               "intent": {"enum": ["a", "b"], "type": "string"}},
              "required": ["reasoning", "intent"]}
    assert final_choice(schema) == ("intent", ("a", "b"))


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"intent": {"enum": ["a", "b"]}, "n": {"type": "integer"}}, "required": ["intent", "n"]},
    {"type": "object", "properties": {"intent": {"enum": ["a", "b"]}}, "required": []},
    {"type": "object", "properties": {"intent": {"enum": ['say "hi"', "b"]}}, "required": ["intent"]},
    {"type": "object", "properties": {"intent": {"enum": ["café", "b"]}}, "required": ["intent"]},
    {"type": "object", "properties": {"intent": {"enum": [1, 2]}}, "required": ["intent"]},
])
def test_final_choice_declines_what_it_cannot_settle(schema):
    # Not last, optional, or values JSON would escape: decoding runs to the end as usual.
    assert final_choice(schema) is None
