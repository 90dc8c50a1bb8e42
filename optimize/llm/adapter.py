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
"""

from __future__ import annotations

from typing import Any, Literal, get_origin

import dspy
from dspy.adapters.utils import get_annotation_name
from dspy.signatures.signature import Signature


def _is_choice(annotation: Any) -> bool:
    return get_origin(annotation) is Literal


class CacheFriendlyAdapter(dspy.JSONAdapter):
    """JSONAdapter with the static parts of the prompt first and the per-example input last."""

    def format_system_message(self, signature: type[Signature]) -> str:
        parts = [self.format_field_description(signature), self.format_field_structure(signature),
                 self.user_message_output_requirements(signature), self.format_task_description(signature)]
        return "\n".join(parts)

    def format_field_description(self, signature: type[Signature]) -> str:
        text = super().format_field_description(signature)
        for name, field in {**signature.input_fields, **signature.output_fields}.items():
            if _is_choice(field.annotation):
                text = text.replace(f"`{name}` ({get_annotation_name(field.annotation)})", f"`{name}` (one of the choices below)")
        return text

    def user_message_output_requirements(self, signature: type[Signature]) -> str:
        text = super().user_message_output_requirements(signature)
        for field in signature.output_fields.values():
            if _is_choice(field.annotation):
                text = text.replace(f"(must be formatted as a valid Python {get_annotation_name(field.annotation)})",
                                    "(exactly one of the choices listed above)")
        return text

    def format_user_message_content(self, signature: type[Signature], inputs: dict[str, Any], prefix: str = "",
                                    suffix: str = "", main_request: bool = False) -> str:
        # The output requirements already sit in the system message, ahead of every input.
        return super().format_user_message_content(signature, inputs, prefix=prefix, suffix=suffix, main_request=False)
