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
"""

from __future__ import annotations

from typing import Any

import dspy
from dspy.signatures.signature import Signature


class CacheFriendlyAdapter(dspy.JSONAdapter):
    """JSONAdapter with the static parts of the prompt first and the per-example input last."""

    def format_system_message(self, signature: type[Signature]) -> str:
        parts = [self.format_field_description(signature), self.format_field_structure(signature),
                 self.user_message_output_requirements(signature), self.format_task_description(signature)]
        return "\n".join(parts)

    def format_user_message_content(self, signature: type[Signature], inputs: dict[str, Any], prefix: str = "",
                                    suffix: str = "", main_request: bool = False) -> str:
        # The output requirements already sit in the system message, ahead of every input.
        return super().format_user_message_content(signature, inputs, prefix=prefix, suffix=suffix, main_request=False)
