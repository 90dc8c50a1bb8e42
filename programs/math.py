"""Math word problems: one-shot, with reasoning, a decomposed chain whose arithmetic a calculator does,
one expression over the problem's own numbers, decoded under a grammar that admits nothing else, and
free reasoning in the model's own words with the answer in a box."""

from __future__ import annotations

import ast
import re
from collections import Counter
from typing import Any, Iterable, Iterator, Sequence, Sized

import dspy
import pydantic

from programs.contract import OUTPUT_SCHEMA, ProgramError, step
from programs.metrics import NumericMatch
from programs.reasoning import BOX_INSTRUCTIONS, BOXED, REASONING, boxed_number
from programs.registry import ProgramSpec, Record, TaskLike, Tunable, UnreadableOutput, ask
from programs.retrieval import AnswerDomain, Retriever
from programs.validators import CalculatorError, Number, calculate, evaluate_steps, format_number, parse_number

NO_FEEDBACK = "none"  # the planner's feedback on a first try; a constant, so demos and cache stay stable


def _inputs(task: TaskLike) -> dict[str, Any]:
    return {name: (str, dspy.InputField()) for name in task.input_fields}


class MathSolver(dspy.Module):
    """Question → number in one call (Predict), or after a reasoning field (ChainOfThought)."""

    def __init__(self, task: TaskLike, reasoning: bool = False):
        super().__init__()
        self.inputs, self.output = tuple(task.input_fields), task.answer_field
        signature = dspy.Signature(
            {**_inputs(task), self.output: (float, dspy.OutputField(desc="the final answer as a number"))},
            "Solve the math word problem.",
        )
        self.solve = dspy.ChainOfThought(signature) if reasoning else dspy.Predict(signature)

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        record = Record(steps=1)
        answer = value = None
        with step("solve"):
            try:
                value, note = ask(self.solve, self.output, {name: kwargs[name] for name in self.inputs}, record)
                answer = parse_number(value)
                record.accept("parse_number", value)
                record.note(note)
            except ValueError as e:  # UnreadableOutput, or no number in the raw answer
                record.fail(f"solve: {e}", "parse_number", value)
        return record.prediction(**{self.output: answer})


class Step(pydantic.BaseModel):  # the GSM8K socratic shape; the docstring goes into the JSON schema, so it is short
    """A sub-question and the arithmetic that answers it."""

    question: str = pydantic.Field(description="a small sub-question")
    expression: str = pydantic.Field(description="arithmetic that answers it, e.g. 16 - 3 - 4 or #1 * 2")


class MathChain(dspy.Module):
    """The model plans, the calculator computes: a tiny model is better at splitting a problem than at sums.

    `plan` emits a list of steps, each a sub-question and an arithmetic expression that may use earlier
    results as `#1`, `#2`…; every expression is computed by `validators.calculate` and the answer is the
    last result, so no LM call does arithmetic. When the plan is unreadable, empty, or an expression fails,
    the plan is asked again with the calculator's errors in `feedback`, up to `max_retries` times; the
    feedback grows with each failure, so a retry never repeats an input (and its cached output).
    """

    def __init__(self, task: TaskLike, max_retries: int = 2, max_steps: int = 8):
        super().__init__()
        if max_steps < 1:
            raise ProgramError(f"math.chain needs max_steps >= 1, got {max_steps}")
        self.inputs, self.output = tuple(task.input_fields), task.answer_field
        self.max_retries, self.max_steps = max_retries, max_steps
        signature = dspy.Signature(
            {
                **_inputs(task),
                "feedback": (str, dspy.InputField(desc="errors in earlier steps to fix, or none")),
                "steps": (list[Step], dspy.OutputField(desc="the steps; the last one answers the question")),
            },
            "Break the math word problem into small steps. For each step ask a sub-question and write one "
            "arithmetic expression that answers it, with numbers from the problem or earlier results as #1, #2.",
        )
        # The grammar ends the list after max_steps, so a tiny model cannot loop on steps up to max_tokens.
        self.plan = dspy.Predict(signature.with_updated_fields(
            "steps", **{OUTPUT_SCHEMA: {"minItems": 1, "maxItems": max_steps}}))

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        record = Record()
        inputs = {name: kwargs[name] for name in self.inputs}
        errors: list[str] = []
        answer: Number | None = None
        while answer is None and (not errors or record.retries < self.max_retries):
            if errors:
                record.retry()
            feedback = "\n".join(errors) if errors else NO_FEEDBACK
            record.steps += 1
            with step("plan" if not errors else "plan.retry"):
                steps = None
                try:
                    steps, note = ask(self.plan, "steps", {**inputs, "feedback": feedback}, record)
                    record.note(note)
                    answer = self._compute(steps, record)
                    record.accept("evaluate_steps", steps)
                except (CalculatorError, UnreadableOutput) as e:
                    errors.append(f"attempt {len(errors) + 1}: {e}")
                    record.fail(errors[-1], "evaluate_steps", steps)
        return record.prediction(**{self.output: answer})

    def _compute(self, steps: Any, record: Record) -> Number:
        if not isinstance(steps, list):
            raise CalculatorError(f"the steps are not a list: {str(steps)[:80]!r}")
        if len(steps) > self.max_steps:  # reached only where no grammar bounds the list
            raise CalculatorError(f"the plan has {len(steps)} steps; use at most {self.max_steps}")
        expressions = [_expression(s) for s in steps]
        results = evaluate_steps(expressions)
        for number, (expression, result) in enumerate(zip(expressions, results), start=1):
            record.note(f"#{number}: {expression} = {format_number(result)}")
        return results[-1]


def _expression(item: Any) -> str:
    """A step's expression, also from the raw dicts of a plan that failed to parse as `Step`s."""
    if isinstance(item, Step):
        return item.expression
    return str(item.get("expression", "")) if isinstance(item, dict) else str(item)


# ---------------------------------------------------------------- one expression over the problem's numbers

EXPRESSION = "expression"  # the output field of math.expr, and the key its pool adds to training examples
MAX_OPERANDS = 8  # numbers in one expression: a GSM8K solution rarely needs more
MAX_NESTING = 3  # parentheses opened (or closed) next to one number
SAMPLE_TEMPERATURE = 0.7  # for the samples after the first, greedy one

_PROBLEM_NUMBER = re.compile(r"(?<![\d.,])(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
# Numbers a problem writes in words, as the number an expression needs: "twice" and "half" both need a 2
# (× 2, ÷ 2), "a dozen" 12, "20%" a 100. On GSM8K, 3,850 of the 7,473 training solutions are one expression
# over the problem's numbers with these, 2,320 over its digits alone.
_UNITS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_TENS = {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90}
NUMBER_WORDS = {**{word: str(n) for n, word in enumerate(_UNITS[1:], start=2)},
                "ten": "10", "eleven": "11", "twelve": "12", **{word: str(n) for word, n in _TENS.items()},
                "twice": "2", "double": "2", "half": "2", "triple": "3", "thrice": "3", "quarter": "4",
                "dozen": "12", "percent": "100", "%": "100"}
_NUMBER_WORD = re.compile(rf"%|\b(?:({'|'.join(_TENS)})-({'|'.join(_UNITS)})|"
                          rf"{'|'.join(w for w in NUMBER_WORDS if w.isalpha())})\b", re.IGNORECASE)
_TOKEN = re.compile(r"\d+(?:\.\d+)?|[-+*/()]")
_CALCULATION = re.compile(r"<<([^=<>]+)=([^<>]+)>>")


def problem_numbers(text: str) -> tuple[str, ...]:
    """The numbers written in a problem, each once, in order: in digits, commas dropped (`$1,200` → `1200`),
    or in words (`three`, `twenty-five`, `twice` → 2, `half` → 2, `a dozen` → 12, `20%` → 20 and 100)."""
    found = [(m.start(), m[0].replace(",", "")) for m in _PROBLEM_NUMBER.finditer(text)]
    for m in _NUMBER_WORD.finditer(text):
        tens, unit = m[1], m[2]
        found.append((m.start(), str(_TENS[tens.lower()] + _UNITS.index(unit.lower()) + 1) if tens
                      else NUMBER_WORDS[m[0].lower()]))
    return tuple(dict.fromkeys(number for _, number in sorted(found)))


def expression_pattern(numbers: Sequence[str]) -> str:
    """A regex for expressions over `numbers` alone: up to MAX_OPERANDS of them joined by + - * /, each
    with up to MAX_NESTING parentheses either side. Written in the subset that llama.cpp's JSON-schema
    converter turns into a grammar (groups without `?:`, a dot as `[.]`), so decoding obeys it too."""
    if not numbers:
        raise ValueError("no numbers to build an expression from")
    alternatives = "|".join(n.replace(".", "[.]") for n in sorted(numbers, key=lambda n: (-len(n), n)))
    operand = rf"\({{0,{MAX_NESTING}}}({alternatives})\){{0,{MAX_NESTING}}}"
    return rf"^{operand}( ?[+*/-] ?{operand}){{0,{MAX_OPERANDS - 1}}}$"


def tidy_expression(text: str) -> str | None:
    """`( 76.0 - 25.0 )` → `76 - 25`: numbers as a problem writes them, spaces around operators only, no
    parentheses around the whole; None when the text holds anything but numbers, + - * / and parentheses."""
    if _TOKEN.sub("", text).strip():
        return None
    tokens = [format_number(float(t)) if t[0].isdigit() else t for t in _TOKEN.findall(text)]
    tidy = " ".join(tokens).replace("( ", "(").replace(" )", ")")
    while tidy.startswith("(") and _closing(tidy) == len(tidy) - 1:
        tidy = tidy[1:-1]
    return tidy


def _closing(text: str) -> int:
    """Index of the parenthesis that closes the one at index 0 (-1 if none does)."""
    depth = 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth == 0:
            return index
    return -1


def chained_expression(rationale: str, numbers: Sequence[str]) -> str | None:
    """One expression for a GSM8K solution: its calculator annotations (`<<48/2=24>>`) in order, each
    earlier result that is not a number of the problem replaced by the expression that made it."""
    made: dict[str, str] = {}
    last = None
    for expression, result in _CALCULATION.findall(rationale):
        tidy = tidy_expression(expression)
        if tidy is None:
            return None
        last = _TOKEN.sub(lambda m: f"({made[m[0]]})" if m[0] in made and m[0] not in numbers else m[0], tidy)
        try:
            made[format_number(parse_number(result))] = last
        except ValueError:
            return None
    return tidy_expression(last) if last else None


def demo_expression(example: dict[str, Any], question: str, answer_field: str) -> str | None:
    """The expression that answers a training example, or None: its own `expression` (a saved pool),
    SVAMP's `equation`, or GSM8K's chained annotations; kept only when it uses the problem's numbers alone,
    fits the pattern the model's answers must fit, and computes the gold answer."""
    numbers = problem_numbers(question)
    if EXPRESSION in example:
        expression = str(example[EXPRESSION])
    elif "equation" in example:
        expression = tidy_expression(str(example["equation"]))
    elif "rationale" in example:
        expression = chained_expression(str(example["rationale"]), numbers)
    else:
        return None
    if not expression or not numbers or not re.fullmatch(expression_pattern(numbers), expression):
        return None
    try:
        right = abs(calculate(expression) - parse_number(example.get(answer_field))) < 1e-6
    except ValueError:  # CalculatorError, or a gold answer with no number
        return None
    return expression if right else None


class ExpressionPool(Retriever):
    """A retriever over the training examples that have an expression (`demo_expression`), added to each
    as `expression`: only those can show the model what to write. It also learns what an answer looks
    like (`AnswerDomain`: when every training answer is whole, or none is negative, an answer that is not
    is implausible)."""

    def __init__(self, input_fields: Sequence[str], answer_field: str, embedder: str = "tfidf"):
        super().__init__(input_fields, embedder=embedder)
        self.answer_field = answer_field
        self.domain = AnswerDomain(answer_field)

    def fill(self, examples: Iterable[dspy.Example | dict[str, Any]]) -> None:
        rows = [dict(e.toDict() if isinstance(e, dspy.Example) else e) for e in examples]
        self.domain = AnswerDomain(self.answer_field)  # a new one: copies of this pool keep theirs
        self.domain.fill(rows)
        with_expressions = [(row, demo_expression(row, self.text(row), self.answer_field)) for row in rows]
        super().fill([{**row, EXPRESSION: expression} for row, expression in with_expressions if expression])

    def implausible(self, value: Number) -> str | None:
        return self.domain.implausible(value)

    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        return {**super().dump_state(json_mode), **self.domain.dump_state()}

    def load_state(self, state: dict[str, Any]) -> "ExpressionPool":
        super().load_state(state)  # fill() judges the saved examples only: the whole split's verdict is saved
        self.domain.load_state(state)
        return self


class MathExpression(dspy.Module):
    """One arithmetic expression over the problem's own numbers, computed by the calculator.

    A tiny model cannot do sums and drifts when it reasons, but it can copy the shape of a similar solved
    problem. The k most similar training problems are its demos, with their expressions (the most similar
    last, unless `nearest_last` = 0); the answer decodes under a grammar that admits only the numbers written
    in the problem, + - * / and parentheses; `validators.calculate` computes it. With `choices` > 0 (the
    default) the grammar is narrower still: the answer is one of the expressions of the `choices_from` nearest
    problems with this problem's numbers put in their places (`options`), choosing being easier for a small
    model than writing, and retries go back to the open grammar. With `agree` > 0, when at least `agree` of
    those problems' expressions give the first choice's value, it is the answer and no LM call is made
    (on GSM8K the 135M model chooses worse than such neighbours; on SVAMP better). With `samples` > 1 the first
    expression is greedy and the others sampled, and the value most of them compute wins (ties: the earlier);
    its share of the samples is returned as `agreement`. An expression outside the pattern (possible only
    without the grammar), one the calculator refuses, or a value no training answer resembles (negative, or
    a fraction, where none of them is: `ExpressionPool.implausible`) is a recorded failure, and another
    expression is sampled in its place, up to `max_retries` more calls. With `repair` = 1, a difference that
    comes out negative where no training answer is (`a - b`, the small model's commonest slip on "how many
    more" problems) is read the other way round (`b - a`, `reversed_difference`) instead: the failure is still
    recorded, and the repaired expression counts as the attempt's answer.
    """

    def __init__(self, task: TaskLike, k: int = 4, samples: int = 1, nearest_last: int = 1, max_retries: int = 2,
                 choices: int = 8, choices_from: int = 32, agree: int = 0, embedder: str = "tfidf",
                 repair: int = 0):
        super().__init__()
        if k < 1 or samples < 1 or max_retries < 0 or choices < 0 or choices_from < 0 or agree < 0:
            raise ProgramError(f"math.expr needs k >= 1, samples >= 1, max_retries >= 0, choices >= 0, "
                               f"choices_from >= 0 and agree >= 0, got k={k}, samples={samples}, "
                               f"max_retries={max_retries}, choices={choices}, choices_from={choices_from}, "
                               f"agree={agree}")
        self.inputs, self.output = tuple(task.input_fields), task.answer_field
        self.settings = Tunable(k=k, samples=samples, nearest_last=nearest_last, max_retries=max_retries,
                                choices=choices, choices_from=choices_from, agree=agree, repair=repair)
        self.retrieve = ExpressionPool(task.input_fields, task.answer_field, embedder=embedder)
        self.write = dspy.Predict(dspy.Signature(
            {**_inputs(task),
             EXPRESSION: (str, dspy.OutputField(desc="arithmetic over the problem's numbers, e.g. (12 + 3) * 4"))},
            "Write one arithmetic expression that answers the math word problem, using only numbers written in "
            "the problem and + - * / ( ).",
        ))

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        record = Record()
        inputs = {name: kwargs[name] for name in self.inputs}
        numbers = problem_numbers(self.retrieve.text(inputs))
        if not numbers:
            record.fail("the problem has no numbers to write an expression with", "problem_numbers")
            return record.prediction(**{self.output: None, EXPRESSION: None, "agreement": 0.0})
        pattern = expression_pattern(numbers)
        with step("retrieve"):
            reach = self.settings["choices_from"] if self.settings["choices"] else 0
            nearest = self.retrieve(max(self.settings["k"], reach), **inputs)  # most similar first
        neighbours = nearest[:self.settings["k"]]
        ranked = self.options(nearest[:reach or self.settings["k"]], numbers)
        options = [expression for expression, _, _ in ranked]
        if options:
            record.note(f"choices: {'; '.join(options)}")
        if ranked and self.settings["agree"] and ranked[0][2] >= self.settings["agree"]:
            expression, value, votes = ranked[0]
            record.note(f"{votes} of {len(nearest[:reach])} similar problems give {expression} = "
                        f"{format_number(value)}: no call")
            # agreement 1: the answer does not depend on the model, so a cascade has no reason to ask another
            return record.prediction(**{self.output: value, EXPRESSION: expression, "agreement": 1.0})
        call = {**inputs, "demos": [*self.write.demos, *(neighbours[::-1] if self.settings["nearest_last"]
                                                          else neighbours)]}
        free = self.write.signature.with_updated_fields(EXPRESSION, **{OUTPUT_SCHEMA: {"pattern": pattern}})
        narrowed = (self.write.signature.with_updated_fields(EXPRESSION, **{OUTPUT_SCHEMA: {"enum": options}})
                    if options else free)
        computed: list[tuple[Number, str]] = []
        samples = self.settings["samples"]
        for attempt, config, name in sampling(record, samples, self.settings["max_retries"], computed, "expression"):
            with step(name):
                text = value = None
                try:
                    signature = narrowed if attempt < samples else free  # a retry: any expression
                    text, note = ask(self.write, EXPRESSION, {**call, "signature": signature, "config": config}, record)
                    record.note(note)
                    value = _compute_expression(str(text).strip(), pattern)
                    record.accept("calculate", text)
                    if reason := self.retrieve.implausible(value):
                        record.fail(f"attempt {attempt + 1}: {str(text).strip()} = {reason}", "answer_domain", value)
                        fixed = reversed_difference(str(text).strip()) if self.settings["repair"] else None
                        if fixed and not self.retrieve.implausible(-value):  # b - a is -(a - b)
                            computed.append((-value, fixed))
                            record.note(f"repaired: {fixed} = {format_number(-value)}")
                    else:
                        record.accept("answer_domain", value)
                        computed.append((value, str(text).strip()))
                        record.note(f"{computed[-1][1]} = {format_number(value)}")
                except (CalculatorError, UnreadableOutput) as e:
                    record.fail(f"attempt {attempt + 1}: {e}", "calculate", text)
        if not computed:
            return record.prediction(**{self.output: None, EXPRESSION: None, "agreement": 0.0})
        value, agreement = majority([value for value, _ in computed], self.settings["samples"], record)
        expression = next(text for v, text in computed if v == value)
        return record.prediction(**{self.output: value, EXPRESSION: expression, "agreement": agreement})

    def options(self, neighbours: list[dict[str, Any]], numbers: Sequence[str]) -> list[tuple[str, Number, int]]:
        """With `choices` = n > 0, the expressions the answer must be one of, each with its value and the
        number of neighbours that give it: each neighbour's (the `choices_from` nearest, the k demos when 0:
        more reach further than the demos can show) expression with its numbers replaced, by their order in
        its problem, by this problem's (`transfer_expression`), one per computed value, the value most
        neighbours give first (ties: the nearer), a value no training answer resembles left out; at most n.
        Empty (any expression over the numbers) when n = 0 or none transfers."""
        if not self.settings["choices"]:
            return []
        votes: Counter[Number] = Counter()
        first: dict[Number, str] = {}  # each value's expression from the nearest neighbour that gives it
        for neighbour in neighbours:
            expression = transfer_expression(neighbour[EXPRESSION], problem_numbers(self.retrieve.text(neighbour)),
                                             numbers)
            try:
                value = calculate(expression) if expression else None
            except CalculatorError:
                continue
            if value is None or self.retrieve.implausible(value):
                continue
            votes[value] += 1
            first.setdefault(value, expression)
        ranked = sorted(first, key=lambda v: -votes[v])  # stable: the nearer first among equal votes
        return [(first[value], value, votes[value]) for value in ranked[:self.settings["choices"]]]


def sampling(record: Record, samples: int, max_retries: int, kept: Sized,
             name: str) -> Iterator[tuple[int, dict[str, Any], str]]:
    """The calls of a program that samples, as (attempt, call config, step name): the first greedy, the
    other `samples` - 1 sampled at SAMPLE_TEMPERATURE (seeded by the attempt), then sampled retries while
    fewer than `samples` answers were `kept`, up to `max_retries`. Counts each call and retry on `record`."""
    attempt = 0
    while len(kept) < samples and attempt < samples + max_retries:
        if attempt >= samples:
            record.retry()
        record.steps += 1
        yield (attempt, {"temperature": SAMPLE_TEMPERATURE, "seed": attempt} if attempt else {},
               name if not attempt else f"{name}.sample" if attempt < samples else f"{name}.retry")
        attempt += 1


def majority(values: Sequence[Number], samples: int, record: Record) -> tuple[Number, float]:
    """The value most of `values` are (ties: the earlier) and its share of the `samples` asked for: a sample
    with no value counts against it. The vote is noted when there was one."""
    votes = Counter(values)
    value = max(votes, key=votes.__getitem__)  # the first value to reach the top count
    if samples > 1:
        record.note(f"vote: {format_number(value)} from {votes[value]} of {samples} samples")
    return value, votes[value] / samples


def transfer_expression(expression: str, source: Sequence[str], numbers: Sequence[str]) -> str | None:
    """`expression`, written over the numbers `source` of another problem, with each replaced by the number in
    the same place among `numbers` (`12 - 5` over (12, 5) → `30 - 8` over (30, 8)); None when it uses a number
    past the end of `numbers`, or one not in `source`."""
    place = {number: index for index, number in enumerate(source)}
    tokens = []
    for token in _TOKEN.findall(expression):
        if token[0].isdigit():
            index = place.get(token, len(numbers))
            if index >= len(numbers):
                return None
            token = numbers[index]
        tokens.append(token)
    return " ".join(tokens).replace("( ", "(").replace(" )", ")")  # as tidy as `expression`, numbers as written


def reversed_difference(expression: str) -> str | None:
    """`b - a` for an expression whose last operation is `a - b` (its value negated); None for any other."""
    try:
        tree = ast.parse(expression, mode="eval").body
    except SyntaxError:
        return None
    if not (isinstance(tree, ast.BinOp) and isinstance(tree.op, ast.Sub)):
        return None
    return ast.unparse(ast.BinOp(tree.right, ast.Sub(), tree.left))


def _compute_expression(text: str, pattern: str) -> Number:
    if not re.fullmatch(pattern, text):
        raise CalculatorError(f"{text!r} is not an expression over the problem's numbers with + - * / ( )")
    return calculate(text)


# ---------------------------------------------------------------- the model's own way of showing work

class MathReason(dspy.Module):
    """Free reasoning in the model's own words, the answer in a box (programs.reasoning).

    An instruction-tuned model was trained to solve a word problem one way: step by step in plain text,
    then `\\boxed{answer}`; asked so, with nothing else in the prompt, Qwen2.5-Coder-0.5B solves GSM8K
    problems that it fails through a JSON adapter (math.cot) or under an expression grammar (math.expr). The
    reply is free text, so no grammar narrows sampling; the box is read by `boxed_number`. A reply without
    one (cut off by max_tokens, or never boxed), or a value no training answer resembles (negative, or a
    fraction, where none of them is: `AnswerDomain`), is a recorded failure, sampled again up to
    `max_retries` more calls. With `samples` > 1 the first reply is greedy and the others sampled, and the
    value most of them box wins (ties: the earlier); its share of the samples is returned as `agreement`,
    the doubt signal a cascade reads.
    """

    def __init__(self, task: TaskLike, samples: int = 1, max_retries: int = 1):
        super().__init__()
        if samples < 1 or max_retries < 0:
            raise ProgramError(f"math.reason needs samples >= 1 and max_retries >= 0, got samples={samples}, "
                               f"max_retries={max_retries}")
        self.inputs, self.output = tuple(task.input_fields), task.answer_field
        self.settings = Tunable(samples=samples, max_retries=max_retries)
        self.domain = AnswerDomain(task.answer_field)  # filled with the training split, like a retriever
        self.solve = dspy.Predict(dspy.Signature(
            {**_inputs(task), REASONING: (str, dspy.OutputField(desc="the steps, in the model's own words")),
             self.output: (str, dspy.OutputField(desc="the final answer, boxed"))},
            BOX_INSTRUCTIONS,
        ))

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        record = Record()
        inputs = {name: kwargs[name] for name in self.inputs}
        computed: list[Number] = []
        samples = self.settings["samples"]
        for attempt, config, name in sampling(record, samples, self.settings["max_retries"], computed, "reason"):
            with step(name), dspy.context(adapter=BOXED):
                boxed = None
                try:
                    boxed, note = ask(self.solve, self.output, {**inputs, "config": config}, record)
                    record.note(note)
                    value = boxed_number(str(boxed))
                    record.accept("boxed_number", boxed)
                    if reason := self.domain.implausible(value):
                        record.fail(f"attempt {attempt + 1}: {boxed} = {reason}", "answer_domain", value)
                    else:
                        record.accept("answer_domain", value)
                        computed.append(value)
                        record.note(f"boxed: {boxed} = {format_number(value)}")
                except ValueError as e:  # UnreadableOutput (no box), or no number in the box
                    record.fail(f"attempt {attempt + 1}: {e}", "boxed_number", boxed)
        if not computed:
            return record.prediction(**{self.output: None, "agreement": 0.0})
        value, agreement = majority(computed, samples, record)
        return record.prediction(**{self.output: value, "agreement": agreement})


def _numeric_metric(task: TaskLike) -> NumericMatch:
    return NumericMatch(task.answer_field)


SPECS = (
    ProgramSpec("math.predict", "math", "one call: question → number", MathSolver, _numeric_metric),
    ProgramSpec(
        "math.cot", "math", "one call with reasoning before the number",
        lambda task: MathSolver(task, reasoning=True), _numeric_metric,
    ),
    ProgramSpec(
        "math.chain", "math", "sub-questions with expressions, computed by a calculator; retried on errors",
        MathChain, _numeric_metric, settings={"max_retries": 2, "max_steps": 8},
    ),
    ProgramSpec(
        "math.expr", "math",
        "one expression over the problem's numbers (grammar-constrained, similar solved problems as demos), "
        "computed by a calculator; optional self-consistency vote",
        MathExpression, _numeric_metric, settings={"k": 4, "samples": 1, "nearest_last": 1, "max_retries": 2,
                                                    "choices": 8, "choices_from": 32, "agree": 0,
                                                    "embedder": "tfidf", "repair": 0},
    ),
    ProgramSpec(
        "math.reason", "math",
        "free reasoning in the model's own words, the answer in a \\boxed{}; optional self-consistency vote",
        MathReason, _numeric_metric, settings={"samples": 1, "max_retries": 1},
    ),
)
