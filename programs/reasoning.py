"""Reasoning in the model's own words, the answer read from a box.

An instruction-tuned model learned to show its work one way: asked "Please reason step by step, and put your
final answer within \\boxed{}." (Qwen2.5's prompt for maths), it writes its steps and then `\\boxed{42}`. Asked
for JSON fields, with a schema in a system message, a 0.5B model reasons less and worse: `math.cot` through
chainopt's JSON adapter got 0% of 50 GSM8K problems on Qwen2.5-Coder-0.5B (21 unparsed; the issue's
measurement); the same model asked its own way got 9 of 30 in a probe (README). `BoxedAnswerAdapter` is a DSPy adapter that asks that way; a
program runs its predictor under it (`dspy.context(adapter=...)`), so optimizers still see a plain
`dspy.Predict` whose instructions and demos they can change.
"""

from __future__ import annotations

import re
from typing import Any

import dspy
from dspy.signatures.signature import Signature
from dspy.utils.exceptions import AdapterParseError

from programs.validators import CalculatorError, Number, calculate, parse_number

BOX_INSTRUCTIONS = "Please reason step by step, and put your final answer within \\boxed{}."
REASONING = "reasoning"  # the output field holding the whole reply
RATIONALE = "rationale"  # a dataset's worked solution (GSM8K's), shown as a demo's reasoning when it has none
_ANNOTATION = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations, `<<48/2=24>>`: not how a model writes
_BOX = "\\boxed{"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


class BoxedAnswerAdapter(dspy.Adapter):
    """Messages as a person would write them in a chat: no system message (the model's chat template puts its
    own default there), each request its inputs followed by the signature's instructions, and each demo's
    reply its reasoning ending in its boxed answer. The whole reply is the `reasoning` field; the content of
    its last `\\boxed{...}` is the answer field, as text (`boxed_number` reads a number from it). A reply
    without a box is an AdapterParseError."""

    def format(self, signature: type[Signature], demos: list[dict[str, Any]],
               inputs: dict[str, Any]) -> list[dict[str, Any]]:
        messages = []
        for demo in demos:
            reply = self._reply(signature, demo)
            if reply is not None:
                messages += [{"role": "user", "content": self._request(signature, demo)},
                             {"role": "assistant", "content": reply}]
        return [*messages, {"role": "user", "content": self._request(signature, inputs)}]

    def parse(self, signature: type[Signature], completion: str) -> dict[str, Any]:
        answer = last_box(completion)
        if answer is None:
            raise AdapterParseError(adapter_name=type(self).__name__, signature=signature, lm_response=completion,
                                    message="the reply has no \\boxed{...} answer")
        return {REASONING: completion, _answer_field(signature): answer}

    @staticmethod
    def _request(signature: type[Signature], values: dict[str, Any]) -> str:
        text = "\n\n".join(str(values.get(name, "")) for name in signature.input_fields)
        return f"{text}\n{signature.instructions}" if signature.instructions else text

    @staticmethod
    def _reply(signature: type[Signature], demo: dict[str, Any]) -> str | None:
        """A demo's reply: its reasoning (or, for a labelled example, its rationale without calculator
        annotations) and its answer in a box; None when it has no answer or no reasoning to show."""
        answer = demo.get(_answer_field(signature))
        reasoning = demo.get(REASONING) or _ANNOTATION.sub("", str(demo.get(RATIONALE) or "")).strip()
        if answer is None or not reasoning:
            return None
        return reasoning if last_box(reasoning) is not None else f"{reasoning}\n\nThe final answer is $\\boxed{{{answer}}}$."


BOXED = BoxedAnswerAdapter()  # it keeps no state: one serves every call


def _answer_field(signature: type[Signature]) -> str:
    return next(name for name in signature.output_fields if name != REASONING)


def last_box(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text`, nested braces included; None when there is none, or
    when it is never closed (a reply cut off by max_tokens)."""
    start = text.rfind(_BOX)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOX)
    for index in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[begin:index].strip()
    return None


_LATEX = ((re.compile(r"\\[dt]?frac\{([^{}]*)\}\{([^{}]*)\}"), r"(\1)/(\2)"),
          (re.compile(r"\\text\{[^{}]*\}|\\[,!;: ]|\\\$|\$|\\%|%|\\left|\\right|\^\\circ|\\circ"), ""),
          (re.compile(r"\\times|\\cdot"), "*"), (re.compile(r"\\div"), "/"),
          (re.compile(r"(?<=\d),(?=\d{3}\b)"), ""))


def boxed_number(text: str) -> Number:
    """The number a box holds: `18`, `167,500`, `\\$13.50`, `12 \\text{ apples}`, `\\frac{35}{16}`, `3 \\times 4`
    (an arithmetic box is computed by the calculator); ValueError when it holds none or more than one
    (`x = 5`, `3 or 4`, `\\text{no}`)."""
    plain = str(text)
    for pattern, replacement in _LATEX:
        plain = pattern.sub(replacement, plain)
    plain = plain.strip().rstrip(".")
    try:
        return calculate(plain)
    except CalculatorError:
        numbers = _NUMBER.findall(plain)
        if len(numbers) != 1 or "=" in plain:  # `x = 5`, `3 or 4`: which number answers is a guess
            raise ValueError(f"no single number in the box {text[:80]!r}") from None
        return parse_number(numbers[0])
