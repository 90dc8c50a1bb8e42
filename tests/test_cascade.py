"""The cascade without a model: the confidence arithmetic, when the cascade escalates and what it records,
its config, the pipeline around it on DummyLM, and settings_search trading accuracy for seconds.
(tests/test_cascade_model.py runs it on the real models.)"""

import math

import dspy
import numpy as np
import pytest
from dspy.utils.dummies import DummyLM

from optimize import cost
from optimize.config import parse_experiment
from optimize.data import Splits, Task
from optimize.errors import ConfigError
from optimize.llm.confidence import ChoiceTracker
from optimize.llm.types import Usage, observers
from optimize.optimizers import SettingsSearch
from optimize.trial import adapter, run_trial
from programs.cascade import Cascade
from programs.contract import current_step, hear, listening
from programs.registry import Record

# -- confidence ---------------------------------------------------------------------------------------------
PIECES = {'"': (1,), '"red': (2,), '"re': (3,), 'd': (4,), 'dish': (5,), '"blue': (6,), ' "': (7,), '"}': (8,),
          'red': (9,), ' "blue': (10,)}
CHOICES = ("red", "reddish", "blue")


def logits(**by_token: float) -> np.ndarray:
    row = np.full(16, -1e9, dtype=np.float32)  # tokens that are not looked at get no probability
    for token, value in by_token.items():
        row[int(token.removeprefix("t"))] = value
    return row


def test_confidence_is_the_path_probability_among_the_deciding_tokens_and_its_margin():
    """Step 1 (before the quote): "red.. (t2) against "blue (t6) and " blue (t10); a bare quote (t1, t7) keeps
    every choice and decides nothing. Step 2, after "red: the closing "} (t8) against dish (t5).
    Fails if a neutral token is counted, if the probabilities are not a softmax over the deciding tokens,
    or if the margin is not taken against the best branch not taken."""
    tracker = ChoiceTracker(PIECES, "colour", CHOICES)
    tracker.step('{"colour": ', logits(t1=5.0, t7=5.0, t2=2.0, t6=1.0, t10=0.0), 0)
    tracker.step('{"colour": "red', logits(t8=1.0, t5=0.0), 1)
    tracker.step('{"colour": "red"}', logits(t8=1.0), 2)  # outside the value: nothing to decide
    assert len(tracker.steps) == 2
    first = np.exp([2.0, 1.0, 0.0]) / np.exp([2.0, 1.0, 0.0]).sum()
    second = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
    got = tracker.result([2, 8], '{"colour": "red"}')
    probability = first[0] * second[0]
    margin = probability - max(first[1], first[0] * second[1])
    assert got == {"field": "colour", "label": "red", "probability": round(probability, 6),
                   "margin": round(margin, 6), "steps": 2}


def test_a_neutral_step_and_an_unknown_label_are_not_judged():
    """The decoded token was a bare quote (decides nothing): no step counts, so no confidence; a label that is
    not a choice has none either."""
    tracker = ChoiceTracker(PIECES, "colour", CHOICES)
    tracker.step('{"colour": ', logits(t1=5.0, t2=2.0, t6=1.0), 0)
    assert tracker.result([1], '{"colour": "blue"}') is None
    assert tracker.result([2], '{"colour": "green"}') is None


# -- the cascade --------------------------------------------------------------------------------------------
class Scripted(dspy.Module):
    """Answers what the current model's script says, telling its confidence as the engine would."""

    def __init__(self, script):
        super().__init__()
        self.script = script

    def forward(self, query):
        name = dspy.settings.lm
        answer, probability, rejected, agreement = self.script[name][query]
        record = Record(steps=1)
        if probability is not None:
            hear({"field": "intent", "label": answer, "probability": probability, "margin": probability / 2})
        if rejected:
            record.fail("classify: not a label", "check_label", "not a label")
        return record.prediction(intent=answer, **({"agreement": agreement} if agreement is not None else {}))


SCRIPT = {"small": {"sure": ("a", 0.9, False, None), "unsure": ("b", 0.3, False, None),
                    "rejected": ("c", 0.9, True, None), "split": ("d", None, False, 0.5), "none": (None, None, False, None)},
          "big": {q: ("BIG", 0.8, False, None) for q in ("sure", "unsure", "rejected", "split", "none")}}


def cascade(**thresholds):
    return Cascade(Scripted(SCRIPT), [("small", "small"), ("big", "big")], "intent", **thresholds)


@pytest.mark.parametrize("query, thresholds, answer, why", [
    ("sure", {"min_probability": 0.5}, "a", ""),
    ("unsure", {"min_probability": 0.5}, "BIG", "probability 0.300 < 0.5"),
    ("unsure", {"min_probability": 0.2}, "b", ""),
    ("sure", {"min_margin": 0.5}, "BIG", "margin 0.450 < 0.5"),
    ("rejected", {}, "BIG", "validator: classify: not a label"),
    ("split", {"min_agreement": 0.6}, "BIG", "agreement 0.50 < 0.6"),
    ("split", {"min_agreement": 0.5}, "d", ""),
    ("none", {}, "BIG", "no answer"),
])
def test_the_cascade_escalates_exactly_on_doubt(query, thresholds, answer, why):
    """Fails if a confident, valid answer is escalated, or a doubtful one (low probability or margin, a
    validator rejection, low sample agreement, no answer) is not; or if the record does not say who answered and why."""
    pred = cascade(**thresholds)(query=query)
    assert pred.intent == answer
    assert pred.answered_by == ("big" if why else "small") and pred.escalation == why
    assert [t["model"] for t in pred.cascade] == (["small", "big"] if why else ["small"])
    assert pred.steps == (2 if why else 1)


def test_the_cascade_keeps_its_thresholds_and_shares_its_models_when_copied():
    program = cascade(min_probability=0.7)
    copy = program.deepcopy()
    assert copy.models is program.models  # the LMs are never copied
    copy.settings.values["min_probability"] = 0.1
    assert program.settings["min_probability"] == 0.7
    assert program.dump_state()["settings"] == {"min_probability": 0.7, "min_margin": 0.0, "min_agreement": 0.0}


def test_a_cascade_needs_two_models():
    with pytest.raises(ValueError, match="at least two models"):
        Cascade(Scripted(SCRIPT), [("small", "small")], "intent")


def test_listening_hears_only_its_own_block_and_stage_prefixes_the_step():
    from programs.contract import stage, step

    hear({"outside": True})  # nobody listens: dropped
    with listening() as outer:
        hear({"n": 1})
        with listening() as inner, stage("m1"), step("classify"):
            hear({"n": 2})
            assert current_step() == "m1/classify"
    assert outer == [{"n": 1}] and inner == [{"n": 2}]
    assert current_step() == "predict"


def test_the_engine_tells_a_cached_or_computed_confidence_to_the_listening_program():
    """The pipeline's observer passes what LocalLM reads from a response (computed or from DSPy's cache) to the
    program listening. Fails if trial.py does not register it."""
    import optimize.trial  # noqa: F401  (registers the observer)

    with listening() as heard:
        for observer in observers():
            if observer.heard is not None:
                observer.heard({"field": "intent", "label": "a", "probability": 0.5, "margin": 0.1})
    assert heard == [{"field": "intent", "label": "a", "probability": 0.5, "margin": 0.1}]


# -- config -------------------------------------------------------------------------------------------------
def experiment(**cascade):
    return {"name": "c", "models": [{"spec": "smollm2-135m"}, {"spec": "qwen2.5-coder-0.5b"}],
            "programs": [{"name": "intent.retrieve"}], "optimizers": [{"name": "none"}, {"name": "settings_search"}],
            "cascade": cascade}


def test_a_cascade_is_one_more_trial_per_program_and_optimizer():
    """The cascade's optimizers replace the program's own list for the cascade alone: the single models run
    `none`, the cascade also tunes its thresholds. Fails if either list leaks into the other's trials."""
    raw = experiment(min_probability=0.6, optimizers=["none", "settings_search"])
    raw["programs"][0]["optimizers"] = ["none"]
    exp = parse_experiment(raw)
    trials = exp.combinations()
    assert [t.run_name for t in trials] == [
        "intent.retrieve+none+smollm2-135m+s0", "intent.retrieve+none+qwen2.5-coder-0.5b+s0",
        "intent.retrieve+none+cascade(smollm2-135m>qwen2.5-coder-0.5b)+s0",
        "intent.retrieve+settings_search+cascade(smollm2-135m>qwen2.5-coder-0.5b)+s0"]
    last = trials[-1]
    assert [m.spec for m in last.cascade.models] == ["smollm2-135m", "qwen2.5-coder-0.5b"]
    assert last.cascade.min_probability == 0.6 and last.model.spec == "smollm2-135m"
    assert len({t.config_hash() for t in trials}) == 4


def test_a_trial_without_a_cascade_hashes_as_before():
    """Stored runs are found by their config hash: adding the cascade key must not change a plain trial's."""
    import hashlib
    import json

    (trial,) = parse_experiment({"name": "c"}).combinations()
    old = hashlib.sha256(json.dumps(trial.model_dump(mode="json", exclude={"cascade"}), sort_keys=True)
                         .encode()).hexdigest()[:16]
    assert trial.config_hash() == old and "cascade" not in json.dumps(trial.flat_params())


@pytest.mark.parametrize("cascade, message", [
    ({"models": ["smollm2-135m", "gemma3-270m"]}, "cascade.models names 'gemma3-270m', but no \\[\\[models\\]\\] entry"),
    ({"models": ["smollm2-135m"]}, "at least two different"),
    ({"optimizers": ["gepa"]}, "cascade lists optimizer gepa, which the experiment does not run"),
    ({"min_probability": 1.5}, "cascade.min_probability = 1.5"),
    ({"threshold": 0.5}, "unknown key 'cascade.threshold'"),
])
def test_a_bad_cascade_is_one_line(cascade, message):
    with pytest.raises(ConfigError, match=message) as info:
        parse_experiment(experiment(**cascade), "exp.toml")
    assert "\n" not in str(info.value)


# -- the pipeline on DummyLM ----------------------------------------------------------------------------------
LABELS = ("card_arrival", "lost_card", "exchange_rate")
TASK = Task("mine", "intent", ("query",), "intent", LABELS)


def example(query, label):
    return dspy.Example(query=query, intent=label).with_inputs("query")


def test_a_cascade_trial_records_who_answered_why_and_the_rates(monkeypatch):
    """intent.predict; the small DummyLM answers a label outside the set for the 2nd example (its validator
    rejects it), the big one answers right. Fails if the rejected answer is not escalated, if the records
    or metrics do not say so, or if the first model's own accuracy is not measured on every example."""
    import optimize.trial as trial_module

    small = DummyLM({"card never came": {"intent": "card_arrival"}, "lost it": {"intent": "not_a_label"},
                     "rate?": {"intent": "lost_card"}}, adapter=adapter())
    big = DummyLM([{"intent": "lost_card"}], adapter=adapter())
    monkeypatch.setattr(trial_module, "build_lm", lambda cfg: small if cfg.spec == "smollm2-135m" else big)
    monkeypatch.setattr(trial_module, "describe", lambda spec: _Info(spec))
    exp = parse_experiment({"name": "c", "models": [{"spec": "smollm2-135m"}, {"spec": "qwen2.5-coder-0.5b"}],
                            "programs": [{"name": "intent.predict"}], "eval": {"threads": 1}, "cascade": {}})
    trial = exp.combinations()[-1]
    tests = [example("card never came", "card_arrival"), example("lost it", "lost_card"),
             example("rate?", "exchange_rate")]
    outcome = run_trial(trial, Splits(TASK, [], [], tests))
    records = outcome.records
    assert [r.answered_by for r in records] == ["smollm2-135m", "qwen2.5-coder-0.5b", "smollm2-135m"]
    assert records[1].escalation.startswith("validator: classify:") and records[0].escalation == ""
    assert [r.success for r in records] == [True, True, False]
    assert [r.first_success for r in records] == [True, False, False]
    m = outcome.metrics
    assert m["accuracy"] == pytest.approx(2 / 3) and m["escalation_rate"] == pytest.approx(1 / 3)
    assert m["model1.accuracy_alone"] == pytest.approx(1 / 3) and m["escalated_accuracy"] == 1.0
    assert (m["model1.answered"], m["model2.answered"]) == (2, 1)
    assert m["model1.lm_calls"] == m["model2.lm_calls"] == 0  # DummyLM meters nothing: the model test counts calls
    assert outcome.params["cascade"] == "cascade(smollm2-135m>qwen2.5-coder-0.5b)"
    row = records[1].row()
    assert row["answered_by"] == "qwen2.5-coder-0.5b" and row["cascade"][0]["answer"] is None
    assert row["cascade"][0]["doubt"] == records[1].escalation and row["cascade"][1]["answer"] == "lost_card"


class _Info:
    def __init__(self, spec):
        self.name, self.sha256, self.quantization = spec, spec * 2, "Q"

    def as_params(self):
        return {"model.sha256": self.sha256}


# -- settings_search against seconds per success ------------------------------------------------------------
class Priced(dspy.Module):
    """Right on every example at min_probability >= 0.5 (it 'escalates'), on half of them below; each call
    reports LM seconds as the engine would: 1 s cheap, 4 s when escalated."""

    def __init__(self):
        super().__init__()
        from programs.registry import Tunable

        self.settings = Tunable(min_probability=0.0)

    def forward(self, n):
        escalate = self.settings["min_probability"] >= 0.5
        cost.record(Usage(calls=1, seconds=1.0))
        if escalate:
            cost.record(Usage(calls=1, seconds=4.0))
        return dspy.Prediction(answer=n if escalate or n % 2 else -1)


@pytest.mark.parametrize("objective, tolerance, chosen", [
    ("accuracy", 0.0, 0.5), ("seconds_per_success", 0.0, 0.5), ("seconds_per_success", 0.5, 0.0)])
def test_settings_search_trades_accuracy_for_seconds_within_its_tolerance(objective, tolerance, chosen):
    """Half accuracy at 2 s per success against full accuracy at 5 s: with no tolerance the accurate one wins
    either way; with 50 points of tolerance, seconds per success picks the cheap one."""
    examples = [dspy.Example(n=n, answer=n).with_inputs("n") for n in range(8)]
    search = SettingsSearch(lambda gold, pred, trace=None: gold.answer == pred.answer,
                            {"min_probability": [0.0, 0.5]}, num_threads=1, objective=objective, tolerance=tolerance)
    compiled = search.compile(Priced(), trainset=examples)
    assert compiled.settings["min_probability"] == chosen
    by = {c["settings"]["min_probability"]: c for c in search.candidate_programs}
    assert by[0.0]["seconds_per_success"] == pytest.approx(8 / 4) and by[0.5]["seconds_per_success"] == 5.0


def test_settings_search_refuses_an_unknown_objective():
    with pytest.raises(ConfigError, match="objective 'cheapest' is not one of: accuracy, seconds_per_success"):
        SettingsSearch(lambda *a: 1, {"x": [1]}, objective="cheapest")
    assert math.isinf(cost.per_success(1.0, 0))


# -- MLflow rows, the Pareto plot and the report ------------------------------------------------------------
def _store_cascade_experiment(name, tmp_path):
    """A parent with the two single-model runs and the cascade, shaped like `chainopt run`'s children."""
    import mlflow

    from optimize import tracking

    experiment_id = tracking.setup(name)
    base = {"n": 4, "latency_p50": 0.5, "latency_p95": 0.9, "parse_failures": 0, "tokens_total": 100}
    runs = [("small", "smollm2-135m", "", {"accuracy": 0.5, "seconds_per_success": 1.0}),
            ("big", "qwen2.5-coder-0.5b", "", {"accuracy": 1.0, "seconds_per_success": 4.0}),
            ("both", "smollm2-135m", "cascade(smollm2-135m>qwen2.5-coder-0.5b)",
             {"accuracy": 1.0, "seconds_per_success": 2.0, "escalation_rate": 0.5, "escalated": 2,
              "model1.accuracy_alone": 0.5, "escalated_accuracy": 1.0, "escalated_first_accuracy": 0.0})]
    with mlflow.start_run(experiment_id=experiment_id, run_name=name, tags={tracking.TAG_KIND: "parent"}) as parent:
        for run_name, spec, cascade_name, metrics in runs:
            with mlflow.start_run(run_name=run_name, nested=True, experiment_id=experiment_id,
                                  tags={tracking.TAG_KIND: "child"}):
                mlflow.log_params({"program.name": "intent.retrieve", "optimizer.name": "none", "model.spec": spec,
                                   "seed": 0, **({"cascade": cascade_name} if cascade_name else {})})
                tracking.log_metrics({**base, **metrics, "successes": 4 * metrics["accuracy"]})
        rows = tracking.child_rows(experiment_id, parent.info.run_id)
    return rows


def test_the_cascade_is_its_own_point_beside_its_models(mlflow_store, tmp_path, monkeypatch):
    """Fails if the cascade's row is not marked and named as the cascade, is left off the Pareto front it is on,
    is not drawn as its own (diamond) point named cascade beside the models named by model, or is missing
    from the report's cascade table with its escalation rate and its first model's accuracy alone."""
    import matplotlib.axes

    from optimize import tracking
    from optimize.report import write_report

    rows = _store_cascade_experiment("cascade-plot", tmp_path)
    by_name = {r["name"]: r for r in rows}
    assert by_name["both"]["cascade"] and by_name["both"]["model"] == "cascade(smollm2-135m>qwen2.5-coder-0.5b)"
    assert not by_name["big"]["cascade"]
    assert {r["name"] for r in rows if r["pareto"]} == {"small", "both"}  # the big model is dominated by the cascade
    drawn, named = [], []
    scatter, annotate = matplotlib.axes.Axes.scatter, matplotlib.axes.Axes.annotate
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter",
                        lambda self, *a, **k: drawn.append(k.get("marker")) or scatter(self, *a, **k))
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate",
                        lambda self, text, *a, **k: named.append(text) or annotate(self, text, *a, **k))
    tracking.pareto_plot(rows, tmp_path / "p.png")
    assert sorted(drawn) == ["D", "o", "o"]
    assert sorted(named) == ["cascade none", "qwen2.5-coder-0.5b none", "smollm2-135m none"]
    path, _ = write_report("cascade-plot", tmp_path / "r.html")
    html = path.read_text(encoding="utf-8")
    assert "Cascades against their models" in html
    table = html.split('<table class="cascades">')[1].split("</table>")[0]
    assert "both" in table and "small" in table and "big" in table and "0.5 (2)" in table
