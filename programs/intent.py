"""Intent classification: one-shot, with reasoning, and a two-stage chain (topic group, then label)."""

from __future__ import annotations

from collections import Counter
from typing import Any, Literal, Sequence

import dspy

from programs.contract import PER_CALL_CHOICES, ProgramError, step
from programs.metrics import LabelMatch
from programs.registry import ProgramSpec, Record, TaskLike, Tunable, UnreadableOutput, ask
from programs.retrieval import Retriever
from programs.validators import LabelError, check_label, normalize_label

CLASSIFY = "Classify the customer request."
# Words that join a label's name but say nothing of its topic (a library stop list drops "top" of "top_up").
LINKING_WORDS = ("a", "an", "and", "by", "for", "from", "in", "into", "is", "my", "not", "of", "on", "or", "the",
                 "to", "via", "why", "with")


def derive_groups(labels: Sequence[str], size: int = 0) -> dict[str, tuple[str, ...]]:
    """Topic groups of a label set, found from the label names alone so that any label set has them.

    Labels are clustered by the words of their names (TF-IDF over words, k-means with a fixed seed),
    into about sqrt(n) groups (or n / `size`); a group is named by its most telling word. Every label
    lands in exactly one group, groups keep the labels' order, and the result is the same on every run.
    """
    from sklearn.cluster import KMeans
    from sklearn.feature_extraction.text import TfidfVectorizer

    labels = list(labels)
    n_groups = max(1, min(len(labels), round(len(labels) / size) if size else round(len(labels) ** 0.5)))
    if n_groups == 1:
        return {"all": tuple(labels)}
    names = [" ".join(normalize_label(label).split("_")) for label in labels]
    vectorizer = TfidfVectorizer(token_pattern=r"[^\s]+", stop_words=list(LINKING_WORDS))
    vectors = vectorizer.fit_transform(names)
    assigned = KMeans(n_clusters=n_groups, n_init=10, random_state=0).fit_predict(vectors)
    words = vectorizer.get_feature_names_out()
    groups: dict[str, tuple[str, ...]] = {}
    for cluster in dict.fromkeys(assigned):  # in the order the labels first reach each cluster
        rows = [i for i, c in enumerate(assigned) if c == cluster]
        weights = vectors[rows].sum(axis=0).A1
        ranked = [words[j] for j in weights.argsort()[::-1] if weights[j] > 0]
        name = next((w for w in ranked if w not in groups), f"group_{len(groups) + 1}")
        groups[name] = tuple(labels[i] for i in rows)
    return groups


def _signature(
    task: TaskLike, outputs: dict[str, tuple[Any, str]], instructions: str, feedback: bool = False,
    examples: str = "",
) -> type[dspy.Signature]:
    fields: dict[str, Any] = {"examples": (str, dspy.InputField(desc=examples))} if examples else {}
    fields.update({name: (str, dspy.InputField()) for name in task.input_fields})
    if feedback:
        fields["feedback"] = (str, dspy.InputField(desc="why earlier answers were rejected"))
    fields.update({name: (kind, dspy.OutputField(desc=desc)) for name, (kind, desc) in outputs.items()})
    return dspy.Signature(fields, instructions)


def _choose(predictor: dspy.Module, output: str, inputs: dict[str, Any], labels: Sequence[str], record: Record) -> str:
    """One LM call whose answer must be one of `labels`; raises LabelError (or UnreadableOutput) otherwise."""
    record.steps += 1
    value, note = ask(predictor, output, inputs, record)
    label = check_label(str(value), labels)
    record.accept("check_label", value)
    record.note(note)
    return label


def _retry(predictor: dspy.Module, output: str, inputs: dict[str, Any], labels: Sequence[str], rejections: list[str],
           record: Record, max_retries: int, name: str) -> str | None:
    """Choose again over all `labels`, told why earlier answers were rejected, until one passes the label
    check or `max_retries` is spent. The feedback grows with each rejection, so no retry repeats the same
    input (and DSPy's cached output)."""
    while record.retries < max_retries:
        record.retry()
        with step(name):
            try:
                return _choose(predictor, output, {**inputs, "feedback": "\n".join(rejections)}, labels, record)
            except (LabelError, UnreadableOutput) as e:
                rejections.append(f"retry {record.retries}: {e}")
                record.fail(rejections[-1], "check_label", e.value)
    return None


class IntentClassifier(dspy.Module):
    """Query → label in one call (Predict), or after a reasoning field (ChainOfThought)."""

    def __init__(self, task: TaskLike, reasoning: bool = False):
        super().__init__()
        self.inputs, self.output, self.labels = tuple(task.input_fields), task.answer_field, tuple(task.labels)
        signature = _signature(task, {self.output: (Literal[self.labels], "the intent label")}, CLASSIFY)
        self.classify = dspy.ChainOfThought(signature) if reasoning else dspy.Predict(signature)

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        record = Record()
        inputs = {name: kwargs[name] for name in self.inputs}
        label = None
        with step("classify"):
            try:
                label = _choose(self.classify, self.output, inputs, self.labels, record)
            except (LabelError, UnreadableOutput) as e:
                record.fail(f"classify: {e}", "check_label", e.value)
        return record.prediction(**{self.output: label})


class IntentChain(dspy.Module):
    """Two stages, so a small model picks from ~10 options twice instead of from 77 once.

    `group` picks a topic group; `fine['<group>']` picks the label within it (a one-label group needs no
    call). There is one fine predictor per group, each with its own Literal, so optimizers see them as
    named predictors and save/load keeps each group's instructions and demos apart. When a stage's answer
    fails the label check, `retry` picks from all labels, told why the earlier answers were rejected;
    the feedback grows with each rejection, so no retry repeats the same input (and cached output).
    """

    def __init__(self, task: TaskLike, max_retries: int = 2):
        super().__init__()
        self.inputs, self.output, self.labels = tuple(task.input_fields), task.answer_field, tuple(task.labels)
        self.groups = derive_groups(self.labels)
        self.max_retries = max_retries
        self.group = dspy.Predict(
            _signature(
                task, {"group": (Literal[tuple(self.groups)], "the topic of the request")},
                "Choose the topic group of the customer request.",
            )
        )
        self.fine = {
            name: dspy.Predict(_signature(task, {self.output: (Literal[members], "the intent label")}, CLASSIFY))
            for name, members in self.groups.items()
            if len(members) > 1
        }
        self.retry = dspy.Predict(
            _signature(
                task, {self.output: (Literal[self.labels], "the intent label")},
                f"{CLASSIFY} Earlier answers were rejected for the reasons given in feedback.",
                feedback=True,
            )
        )

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        record = Record()
        inputs = {name: kwargs[name] for name in self.inputs}
        rejections: list[str] = []
        group = label = None
        try:
            with step("group"):
                group = _choose(self.group, "group", inputs, list(self.groups), record)
            members = self.groups[group]
            if len(members) == 1:
                label = members[0]
            else:
                with step("label"):
                    label = _choose(self.fine[group], self.output, inputs, members, record)
        except (LabelError, UnreadableOutput) as e:
            stage = "group" if group is None else f"label in group {group}"
            rejections.append(f"{stage}: {e}")
            record.fail(rejections[-1], "check_label", e.value)
        if label is None:
            label = _retry(self.retry, self.output, inputs, self.labels, rejections, record, self.max_retries,
                           "label.retry")
        return record.prediction(**{self.output: label, "group": group})


class IntentRetrieve(dspy.Module):
    """Retrieval, then one narrowed choice: the k training examples most like the query become its demos,
    and the answer must be one of their labels (the decoding grammar admits nothing else).

    The prompt keeps the instruction and any compiled demos first, shared by every call, then the
    retrieved demos (the most similar last, next to the query, unless `nearest_last` = 0), then the query
    and its choices. The retrieved demos are one compact input field (`inline` = 1, "text -> label" per
    line), or with `inline` = 0 a conversation turn each: on Banking77 with the embedded model, inline
    measured 68% at 350 tokens per example against turns' 60% at 480 (README). The choices are ranked by
    `ranker`: "votes", the neighbours' labels, most votes first, where a neighbour's vote is its similarity to
    the query to the power `weight` (0: one vote each), so a near copy of the request outweighs loose matches;
    or "logreg", the labels by their probability under a logistic regression over the whole pool (the
    retriever's `ranked`), which on Banking77 puts the gold label first more often than any vote. At most
    `candidates` of them are offered (0: the neighbours' labels). The first choice is the answer and no LM
    call is made when it is the only one, when at least `agree` of the k neighbours have it (0: never), or
    when its share is at least `sure` percent (0: never): its probability under the classifier, or its
    share of the weighted vote. With `per_choice` = n > 0 the demos are the n examples most like the query of
    each choice (`Retriever.nearest_of`) instead of the k nearest, so the model sees every option in use.
    An answer the label check rejects is retried over the whole label set, told why.
    """

    def __init__(self, task: TaskLike, k: int = 8, candidates: int = 0, nearest_last: int = 1, agree: int = 0,
                 inline: int = 1, max_retries: int = 1, weight: float = 4, embedder: str = "tfidf",
                 ranker: str = "votes", sure: int = 0, per_choice: int = 0):
        super().__init__()
        if k < 1:
            raise ProgramError(f"intent.retrieve needs k >= 1, got {k}")
        _check_ranker(ranker)
        self.inputs, self.output, self.labels = tuple(task.input_fields), task.answer_field, tuple(task.labels)
        self.settings = Tunable(k=k, candidates=candidates, nearest_last=nearest_last, agree=agree, inline=inline,
                                max_retries=max_retries, weight=weight, ranker=ranker, sure=sure,
                                per_choice=per_choice)
        self.retrieve = Retriever(task.input_fields, embedder=embedder)
        self.classify = dspy.Predict(_signature(task, {self.output: (str, "the intent label")}, CLASSIFY))
        self.classify_inline = dspy.Predict(_signature(
            task, {self.output: (str, "the intent label")}, CLASSIFY,
            examples="requests like this one with their labels, one per line, the most similar last"))
        self.retry = dspy.Predict(
            _signature(
                task, {self.output: (Literal[self.labels], "the intent label")},
                f"{CLASSIFY} Earlier answers were rejected for the reasons given in feedback.",
                feedback=True,
            )
        )

    def choices(self, neighbours: Sequence[tuple[dspy.Example, float]], inputs: dict[str, Any]
                ) -> tuple[tuple[str, ...], int, float]:
        """The choices, best first (by the ranker; ties of the vote: the nearer first), at most `candidates`
        of them (0: the neighbours' labels); how many neighbours have the first; and the first's share."""
        labels = [str(neighbour[self.output]) for neighbour, _ in neighbours]
        limit = self.settings["candidates"]
        if _check_ranker(self.settings["ranker"]) == "logreg":
            scores = dict(self.retrieve.ranked(self.output, **inputs))
        else:
            votes: Counter[str] = Counter()
            for label, (_, similarity) in zip(labels, neighbours):
                votes[label] += max(similarity, 0.0) ** self.settings["weight"]
            total = sum(votes.values())
            scores = {label: votes[label] / total if total else 0.0 for label in votes}
        pool = scores if limit else dict.fromkeys(labels)
        ranked = sorted((label for label in pool if label in self.labels and label in scores),
                        key=lambda label: -scores[label])
        if not ranked:
            return (), 0, 0.0
        return tuple(ranked[:limit] if limit else ranked), labels.count(ranked[0]), scores[ranked[0]]

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        record = Record()
        inputs = {name: kwargs[name] for name in self.inputs}
        with step("retrieve"):
            scored = self.retrieve.scored(self.settings["k"], **inputs)  # most similar first
        neighbours = [neighbour for neighbour, _ in scored]
        choices, top_votes, share = self.choices(scored, inputs)
        choices = choices or self.labels
        agree, sure = self.settings["agree"], self.settings["sure"]
        label, rejections = None, []
        if len(choices) == 1 or (agree and top_votes >= agree) or (sure and 100 * share >= sure):
            label = choices[0]
            record.note(f"{top_votes} of {len(neighbours)} neighbours have label {label}, its share "
                        f"{100 * share:.0f}%: no call")
        else:
            per_choice = self.settings["per_choice"]
            shown = ([e for e, _ in self.retrieve.nearest_of(self.output, choices, per_choice, **inputs)]
                     if per_choice else neighbours)
            demos = shown[::-1] if self.settings["nearest_last"] else shown
            with step("classify"):
                try:
                    label = _choose(*self._request(inputs, demos, choices), choices, record=record)
                except (LabelError, UnreadableOutput) as e:
                    rejections.append(f"classify: {e}")
                    record.fail(rejections[-1], "check_label", e.value)
        if label is None:
            label = _retry(self.retry, self.output, inputs, self.labels, rejections, record,
                           self.settings["max_retries"], "classify.retry")
        return record.prediction(**{self.output: label})

    def _request(self, inputs: dict[str, Any], demos: Sequence[dspy.Example], choices: tuple[str, ...]):
        """The predictor and its inputs: retrieved demos as turns or inline, the choices fixed for this call."""
        predictor = self.classify_inline if self.settings["inline"] else self.classify
        signature = predictor.signature.with_updated_fields(self.output, type_=Literal[choices],
                                                            **{PER_CALL_CHOICES: True})
        call = {**inputs, "signature": signature}
        if self.settings["inline"]:
            call["examples"] = "\n".join(f"{' '.join(str(d[f]) for f in self.inputs)} -> {d[self.output]}"
                                          for d in demos)
            call["demos"] = predictor.demos
        else:
            call["demos"] = [*predictor.demos, *demos]
        return predictor, self.output, call


RANKERS = ("votes", "logreg")


def _check_ranker(ranker: str) -> str:
    if ranker not in RANKERS:
        raise ProgramError(f"intent.retrieve's ranker {ranker!r} is not one of: {', '.join(RANKERS)}")
    return ranker


def _label_metric(task: TaskLike) -> LabelMatch:
    return LabelMatch(task.answer_field)


def _chain_metric(task: TaskLike) -> LabelMatch:
    return LabelMatch(task.answer_field, groups=derive_groups(tuple(task.labels)))


SPECS = (
    ProgramSpec("intent.predict", "intent", "one call: request → label", IntentClassifier, _label_metric),
    ProgramSpec(
        "intent.cot", "intent", "one call with reasoning before the label",
        lambda task: IntentClassifier(task, reasoning=True), _label_metric,
    ),
    ProgramSpec(
        "intent.chain", "intent", "topic group, then the label within it; validated, with retries",
        IntentChain, _chain_metric, settings={"max_retries": 2},
    ),
    ProgramSpec(
        "intent.retrieve", "intent",
        "k similar training examples as demos, the answer narrowed to their labels; validated, with a retry",
        IntentRetrieve, _label_metric,
        settings={"k": 8, "candidates": 0, "nearest_last": 1, "agree": 0, "inline": 1, "max_retries": 1,
                  "weight": 4, "embedder": "tfidf", "ranker": "votes", "sure": 0, "per_choice": 0},
    ),
)
