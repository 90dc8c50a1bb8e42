"""A JSONAdapter whose prompts keep everything static in front, so the KV cache can share it.

DSPy's JSONAdapter ends the last user message with "Respond with a JSON object ... `intent` (must be
formatted as a valid Python Literal[...77 labels...])": ~670 tokens placed after the per-example
input, so they are recomputed for every example. Here that reminder moves into the system message,
and the system message is ordered from the most to the least stable part across a sweep:

  field descriptions, field structure, output requirements   fixed by the signature's fields
  task description (instructions)                             changed by instruction optimizers
  demos                                                       changed by demo optimizers
  the example's inputs                                        changed by every call

so every call of a predictor shares all of its prompt but the last user message, and two candidate
instructions still share the signature part. Parsing, the response schema (hence the decoding
grammar) and the assistant format are JSONAdapter's, unchanged.

A choice field (`Literal[...]`) lists its choices once, in the output structure ("must exactly match
one of: a; b; ..."), where JSONAdapter lists them three times (also as `Literal[...]` in the field
list and in the output requirements). For Banking77's 77 labels the system prompt drops from 1,980
to 714 tokens: every later token attends over them, so listing them once makes each call cheaper, and the
decoding grammar still admits only the choices.

A choice field narrowed per call (a retrieval program offers only its neighbours' labels) is marked
`per_call_choices` in its field's extras: its choices differ from call to call, so they go last, after
the example's inputs, and the system message and demos stay the same for every call.

A set of choices (`list[Literal[...]]`, a multi-label answer) is treated alike: its choices are listed
once ("a list of one or more of: a; b; ..."), or after the inputs when narrowed per call, in place of
JSONAdapter's JSON schema and Python type; the schema it sends (an array of enums) still makes the
decoding grammar admit only those labels.

An output field may carry JSON-schema keywords in its `output_schema` extra (a `pattern` that admits
only a problem's numbers, a `maxItems` on a plan): they are added to that field's response schema, which
DSPy builds from the bare type, so the decoding grammar enforces them. The prompt does not show them.
"""

from __future__ import annotations

import json
from typing import Any, Literal, get_args, get_origin

import dspy
from dspy.adapters.utils import _get_json_schema, get_annotation_name
from dspy.signatures.signature import Signature


PER_CALL = "per_call_choices"  # programs.contract.PER_CALL_CHOICES: the choices change with every call
OUTPUT_SCHEMA = "output_schema"  # programs.contract.OUTPUT_SCHEMA: JSON-schema keywords for an output field
GIVEN = "one of the choices given with the request"
GIVEN_SET = "a list of one or more of the choices given with the request"


def _is_choice(annotation: Any) -> bool:
    return get_origin(annotation) is Literal


def _is_choice_set(annotation: Any) -> bool:
    return get_origin(annotation) is list and len(get_args(annotation)) == 1 and _is_choice(get_args(annotation)[0])


def _choices(annotation: Any) -> tuple[Any, ...]:
    """The choices of a choice field or a set-of-choices field."""
    return (get_args(annotation)[0] if _is_choice_set(annotation) else annotation).__args__


def _per_call(field: Any) -> bool:
    return ((_is_choice(field.annotation) or _is_choice_set(field.annotation))
            and bool((field.json_schema_extra or {}).get(PER_CALL)))


class CacheFriendlyAdapter(dspy.JSONAdapter):
    """JSONAdapter with the static parts of the prompt first and the per-example input last."""

    def _prepare_response_format(self, lm: Any, lm_kwargs: dict[str, Any], signature: type[Signature]) -> None:
        super()._prepare_response_format(lm, lm_kwargs, signature)
        format_ = lm_kwargs.get("response_format")
        extras = {name: (field.json_schema_extra or {}).get(OUTPUT_SCHEMA)
                  for name, field in signature.output_fields.items()}
        extras = {name: keywords for name, keywords in extras.items() if keywords}
        if not extras or not hasattr(format_, "model_json_schema"):
            return  # no keywords to add, or JSON mode without a schema
        schema = format_.model_json_schema()
        schema = {**schema, "properties": {name: {**prop, **extras.get(name, {})}
                                           for name, prop in schema["properties"].items()}}
        format_.model_json_schema = lambda *args, **kwargs: schema  # a model made for this call alone

    def format_system_message(self, signature: type[Signature]) -> str:
        parts = [self.format_field_description(signature), self.format_field_structure(signature),
                 self.user_message_output_requirements(signature), self.format_task_description(signature)]
        return "\n".join(parts)

    def format_field_description(self, signature: type[Signature]) -> str:
        text = super().format_field_description(signature)
        for name, field in {**signature.input_fields, **signature.output_fields}.items():
            if _is_choice(field.annotation) or _is_choice_set(field.annotation):
                one = _is_choice(field.annotation)
                where = ((GIVEN if one else GIVEN_SET) if _per_call(field)
                         else "one of the choices below" if one else "a list of the choices below")
                text = text.replace(f"`{name}` ({get_annotation_name(field.annotation)})", f"`{name}` ({where})")
        return text

    def format_field_structure(self, signature: type[Signature]) -> str:
        text = super().format_field_structure(signature)
        for field in signature.output_fields.values():
            if not (_is_choice(field.annotation) or _is_choice_set(field.annotation)):
                continue
            listed = "; ".join(map(str, _choices(field.annotation)))
            if _is_choice_set(field.annotation):  # the schema's note, as JSONAdapter writes it inside a JSON string
                schema = json.dumps(_get_json_schema(field.annotation), ensure_ascii=False)
                note = json.dumps(f"must adhere to the JSON schema: {schema}", ensure_ascii=False)[1:-1]
                text = text.replace(note, f"must be {GIVEN_SET}" if _per_call(field)
                                    else f"must be a list of one or more of: {listed}")
            elif _per_call(field):
                text = text.replace(f"must exactly match (no extra characters) one of: {listed}", f"must be {GIVEN}")
        return text

    def user_message_output_requirements(self, signature: type[Signature]) -> str:
        text = super().user_message_output_requirements(signature)
        for field in signature.output_fields.values():
            if _is_choice(field.annotation) or _is_choice_set(field.annotation):
                one = _is_choice(field.annotation)
                where = ((f"exactly {GIVEN}" if one else f"a JSON list of {GIVEN.removeprefix('one of ')}")
                         if _per_call(field) else "exactly one of the choices listed above" if one
                         else "a JSON list of the choices listed above")
                text = text.replace(f"(must be formatted as a valid Python {get_annotation_name(field.annotation)})",
                                    f"({where})")
        return text

    def format_user_message_content(self, signature: type[Signature], inputs: dict[str, Any], prefix: str = "",
                                    suffix: str = "", main_request: bool = False) -> str:
        # The output requirements already sit in the system message, ahead of every input; choices that
        # change per call follow the inputs of the request itself (not of its demos).
        if main_request:
            suffix = "\n".join([*(f"Choices for `{name}`: " + "; ".join(map(str, _choices(field.annotation)))
                                   for name, field in signature.output_fields.items() if _per_call(field)), suffix])
        return super().format_user_message_content(signature, inputs, prefix=prefix, suffix=suffix, main_request=False)
