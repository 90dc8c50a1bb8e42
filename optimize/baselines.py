"""Classical baselines: TF-IDF classifiers fitted on the experiment's own training split, no LM at all.

An intent experiment asks whether an optimized LLM program is worth its cost; a lexical classifier on the
same examples is the bar it has to clear. Each baseline reads the text the programs read (the task's input
fields joined), is scored by the intent programs' metric on the same evaluation split, and returns an
`Outcome` like a trial's, so it is recorded, resumed, compared and plotted as any other child run.
Fitting counts as its compile phase; predicting, one example at a time, as its evaluation.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import dspy
import numpy as np
# Imported with the module, not while a baseline fits: the second sklearn takes to import is not fit time.
import sklearn.linear_model  # noqa: F401

from optimize import cost
from optimize.config import Experiment, ModelConfig, OptimizerConfig, ProgramConfig, Trial
from optimize.data import Splits, data_digest
from optimize.errors import ConfigError, DataError
from optimize.evaluate import ChainRecord, EvalResult
from optimize.optimizers import input_text
from optimize.registry import Registry
from optimize.trial import Outcome, chain_metrics, prices
from programs.metrics import LabelMatch
from programs.retrieval import LOGREG, TFIDF, logistic_regression, tfidf_vectorizer

NO_MODEL = "none"  # the model spec a baseline's run shows: it calls no LM

Predict = Callable[[str], str]


@dataclass(frozen=True)
class BaselineSpec:
    name: str
    description: str
    settings: dict[str, Any]  # logged as params and part of the run's identity
    fit: Callable[[list[str], list[str]], Predict]


def _tfidf_1nn(texts: list[str], labels: list[str]) -> Predict:
    """The label of the most similar training text by cosine (rows are L2-normed: a dot product); ties and a
    query sharing no term with any training text go to the earliest training example."""
    vectorizer = tfidf_vectorizer()
    matrix = vectorizer.fit_transform(texts).T.tocsr()  # term by example: a query's product reads its terms only
    return lambda text: labels[int(np.argmax((vectorizer.transform([text]) @ matrix).toarray()[0]))]


def _tfidf_logreg(texts: list[str], labels: list[str]) -> Predict:
    vectorizer = tfidf_vectorizer()
    model = logistic_regression().fit(vectorizer.fit_transform(texts), labels)
    return lambda text: str(model.predict(vectorizer.transform([text]))[0])


_TFIDF = {"vectorizer": "tfidf", **{k: ",".join(map(str, v)) if isinstance(v, tuple) else v for k, v in TFIDF.items()}}
BASELINES: Registry[BaselineSpec] = Registry("baseline", {spec.name: spec for spec in (
    BaselineSpec("tfidf_1nn", "TF-IDF 1-nearest-neighbour (cosine)", {**_TFIDF, "classifier": "1nn"}, _tfidf_1nn),
    BaselineSpec("tfidf_logreg", "TF-IDF logistic regression",
                 {**_TFIDF, "classifier": "logreg", **LOGREG}, _tfidf_logreg),
)})


def get_baseline(name: str) -> BaselineSpec:
    return BASELINES.get(name)


def check_baseline(spec: BaselineSpec, splits: Splits) -> None:
    """A baseline classifies intents into labels seen in training: refuse any other task, or no training data."""
    task = splits.task
    if task.kind != "intent":
        raise ConfigError(f"baseline {spec.name} is for intent tasks, but task {task.name} is {task.kind}")
    if not splits.train:
        raise ConfigError(f"baseline {spec.name} needs a training split: set data.train > 0")
    labels = {e.get(task.answer_field) for e in splits.train}
    if spec.name == "tfidf_logreg" and len(labels) < 2:
        raise ConfigError(f"baseline {spec.name} needs at least 2 labels in the training split "
                          f"(data.train = {len(splits.train)} gives {len(labels)})")


def baseline_trial(exp: Experiment, name: str) -> Trial:
    """The trial a baseline's run records: program `baseline.<name>`, optimizer `none`, model `none`, seed 0."""
    return Trial(experiment=exp.name, model=ModelConfig(spec=NO_MODEL), data=exp.data,
                 program=ProgramConfig(name=f"baseline.{name}"), optimizer=OptimizerConfig(name="none"), seed=0,
                 budget=exp.budget, cost=exp.cost, eval=exp.eval)


def identity(trial: Trial) -> str:
    """A baseline's work: its settings, the data (config and content hash), the split and the prices."""
    spec = get_baseline(trial.program.name.removeprefix("baseline."))
    blob = json.dumps({"baseline": spec.name, "settings": spec.settings, "data": data_digest(trial.data),
                       **trial.model_dump(mode="json", include={"data", "eval", "cost"})}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_baseline(trial: Trial, splits: Splits) -> Outcome:
    """Fit on the training split, predict each example of the evaluation split, and score it as the intent
    programs are scored: 0 LM tokens, CPU and wall time (and so joules and dollars) from `cost.spending`."""
    spec = get_baseline(trial.program.name.removeprefix("baseline."))
    check_baseline(spec, splits)
    task, watts = splits.task, trial.cost.watts_per_core
    metric = LabelMatch(task.answer_field)
    texts = [input_text(e, task.input_fields) for e in splits.train]
    with cost.spending(watts) as fitting:
        try:
            predict = spec.fit(texts, [str(e.get(task.answer_field)) for e in splits.train])
        except ValueError as exc:  # e.g. sklearn's "empty vocabulary": no word of 2+ letters in the training text
            raise DataError(f"baseline {spec.name} cannot be fitted: {exc}") from None
    records = []
    examples = getattr(splits, trial.eval.split)
    with cost.spending(watts) as scoring:
        for index, example in enumerate(examples):
            start = time.perf_counter()
            predicted = predict(input_text(example, task.input_fields))
            score = metric.score(example, dspy.Prediction(**{task.answer_field: predicted}))
            records.append(ChainRecord(index=index, example_id=str(example.get("id", index)),
                                       inputs=dict(example.inputs()), gold=example.get(task.answer_field),
                                       predicted=predicted, success=score >= 1.0, score=score,
                                       seconds=time.perf_counter() - start))
    spend = scoring["spend"]
    result = EvalResult(records, len(records), len(examples), False, spend.wall_seconds, spend.cpu_seconds)
    fit_cost = cost.spend_units(fitting["spend"], prices(trial))
    metrics = {**chain_metrics(records, result, spend, prices(trial)), "skipped_rows": splits.skipped,
               **{f"compile_{unit}": value for unit, value in fit_cost.items()}}
    params = {"program.name": trial.program.name, "optimizer.name": trial.optimizer.name,
              "model.spec": trial.model.spec, "seed": trial.seed, "config_hash": identity(trial),
              "baseline.name": spec.name, **{f"baseline.{k}": v for k, v in spec.settings.items()},
              **{f"data.{k}": v for k, v in trial.data.model_dump(mode="json").items()},
              **{f"eval.{k}": v for k, v in trial.eval.model_dump(mode="json").items()},
              **{f"cost.{k}": v for k, v in trial.cost.model_dump(mode="json").items()},
              "data.task": task.name, "data.train_size": len(splits.train), "data.dev_size": len(splits.dev),
              "data.test_size": len(splits.test), "data.skipped_rows": splits.skipped}
    return Outcome(trial, metrics, records, params, None,
                   {"baseline.json": {"name": spec.name, "description": spec.description, **spec.settings},
                    "task.json": dataclasses.asdict(task)})
