"""The optimizer registry: a name and its settings become a DSPy teleprompter, compiled the DSPy way.

Each entry names the DSPy class, small defaults that finish on 2 cores, and which runtime objects it
takes (metric, teacher/prompt/reflection model, threads, seed). Every resolved setting is returned so
tracking can log it: MLflow's DSPy autolog misses constructor settings.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import dspy
import numpy as np
from dspy.teleprompt import Teleprompter

from optimize.errors import ConfigError
from optimize.registry import Registry
from programs.registry import Tunable
from programs.retrieval import MINILM_MISSING, minilm, minilm_installed, tfidf_vectorizer


@dataclass(frozen=True)
class CompileInputs:
    metric: Callable
    trainset: list[dspy.Example]
    valset: list[dspy.Example]
    teacher_lm: dspy.LM
    seed: int
    threads: int
    input_fields: tuple[str, ...]
    pool: list[dspy.Example] | None = None  # the whole training split, for retrieval (default: trainset)


class SettingsSearch(Teleprompter):
    """Searches a program's own settings (k, candidates, agree, ...: its `Tunable` values), which no DSPy
    optimizer reaches, with Optuna on the validation set (the training set when there is none): every
    combination of `space` when there are at most `trials` of them, else `trials` TPE draws. The best
    accuracy wins; on a tie, the fewest LM tokens per example (so the cheaper program of two equals).

    `objective = "seconds_per_success"` trades instead: among the settings within `tolerance` of the best
    accuracy (0.01: one point), the one whose LM calls took the fewest seconds per successful chain (a
    cascade's thresholds: tokens of two models cost differently, seconds compare them). An answer from
    DSPy's response cache counts the seconds its computing call took, so repeated candidates cost alike."""

    OBJECTIVES = ("accuracy", "seconds_per_success")

    def __init__(self, metric: Callable, space: dict[str, list[Any]], trials: int = 16, num_threads: int = 8,
                 seed: int = 0, objective: str = "accuracy", tolerance: float = 0.0):
        if not space or not all(isinstance(v, list) and v for v in space.values()):
            raise ConfigError("settings_search needs space = { <program setting> = [values, ...], ... }")
        if objective not in self.OBJECTIVES:
            raise ConfigError(f"settings_search objective {objective!r} is not one of: {', '.join(self.OBJECTIVES)}")
        if not (isinstance(tolerance, (int, float)) and 0 <= tolerance <= 1):
            raise ConfigError(f"settings_search tolerance must be a share of accuracy from 0 to 1, got {tolerance!r}")
        self.metric, self.space, self.trials, self.num_threads, self.seed = metric, space, trials, num_threads, seed
        self.objective, self.tolerance = objective, float(tolerance)
        self.candidate_programs: list[dict[str, Any]] = []

    def compile(self, student: dspy.Module, *, trainset: list[dspy.Example],
                valset: list[dspy.Example] | None = None) -> dspy.Module:
        import optuna

        from optimize import cost

        searchable(student, self.space)
        examples = valset or trainset
        grid = int(np.prod([len(v) for v in self.space.values()]))
        sampler = (optuna.samplers.GridSampler(self.space, seed=self.seed) if grid <= self.trials
                   else optuna.samplers.TPESampler(seed=self.seed))
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        study = optuna.create_study(direction="maximize", sampler=sampler)
        evaluate = dspy.Evaluate(devset=examples, metric=self.metric, num_threads=self.num_threads,
                                 display_progress=False, provide_traceback=False)

        def objective(trial: optuna.Trial) -> float:
            values = {name: trial.suggest_categorical(name, choices) for name, choices in self.space.items()}
            candidate = student.deepcopy()
            candidate.settings.values.update(values)
            with cost.metered(all_threads=True) as tally:
                score = float(evaluate(candidate).score) / 100
            tokens = tally.usage.tokens / max(1, len(examples))
            wins = round(score * len(examples))
            self.candidate_programs.append({"score": score, "settings": values, "tokens_per_example": tokens,
                                            "seconds_per_success": cost.per_success(tally.usage.seconds, wins),
                                            "seed": trial.number})
            return score

        study.optimize(objective, n_trials=min(grid, self.trials))
        if self.objective == "seconds_per_success":
            top = max(c["score"] for c in self.candidate_programs)
            near = [c for c in self.candidate_programs if c["score"] >= top - self.tolerance - 1e-9]
            best = min(near, key=lambda c: (c["seconds_per_success"], -c["score"], c["tokens_per_example"]))
        else:
            best = min(self.candidate_programs, key=lambda c: (-c["score"], c["tokens_per_example"]))
        compiled = student.deepcopy()
        compiled.settings.values.update(best["settings"])
        compiled.candidate_programs = sorted(self.candidate_programs, key=lambda c: (-c["score"], c["seed"]))
        return compiled


def searchable(student: dspy.Module, space: dict[str, Any]) -> None:
    """Refuse a search over settings the program does not have, before anything runs."""
    tunable = getattr(student, "settings", None)
    if not isinstance(tunable, Tunable):
        raise ConfigError(f"settings_search: program {type(student).__name__} has no settings to search; "
                          f"limit the program to other optimizers with its `optimizers` list")
    unknown = sorted(set(space) - set(tunable.values))
    if unknown:
        raise ConfigError(f"settings_search: the program has no setting {', '.join(unknown)}; "
                          f"it has: {', '.join(tunable.values)}")


@dataclass(frozen=True)
class OptimizerSpec:
    name: str
    cls: str | type | None  # the DSPy class (by name) or chainopt's own; None = zero-shot (no compile)
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)
    # runtime constructor arguments this optimizer takes, from CompileInputs
    runtime: Callable[[CompileInputs], dict[str, Any]] = lambda ctx: {}
    # compile(student, ...) keyword arguments
    compile_kwargs: Callable[[CompileInputs], dict[str, Any]] = lambda ctx: {"trainset": ctx.trainset}


def input_text(example: dspy.Example, input_fields: tuple[str, ...]) -> str:
    """What a lexical model reads of an example: its input fields joined, as the programs receive them."""
    return " ".join(str(example.get(f, "")) for f in input_fields)


def tfidf_embedder(trainset: list[dspy.Example], input_fields: tuple[str, ...]) -> dspy.Embedder:
    """A lexical embedder that works offline: TF-IDF fitted on the training inputs."""
    vectorizer = tfidf_vectorizer().fit([input_text(e, input_fields) for e in trainset])
    # No caching: DSPy's embedding cache is keyed on the texts, not on this vectorizer, so vectors of
    # another run's vocabulary would come back for the same query.
    return dspy.Embedder(lambda texts: np.asarray(vectorizer.transform(texts).todense(), dtype=np.float32),
                         caching=False)


def minilm_embedder() -> dspy.Embedder:
    """all-MiniLM-L6-v2 from the `minilm` extra (sentence-transformers; the model ships in the package)."""
    if not minilm_installed():
        raise ConfigError(MINILM_MISSING)
    model = minilm()
    return dspy.Embedder(lambda texts: model.encode(texts, convert_to_numpy=True), caching=False)


def _knn_runtime(ctx: CompileInputs, settings: dict[str, Any]) -> dict[str, Any]:
    embedder = settings.pop("embedder", "tfidf")
    if embedder not in ("tfidf", "minilm"):
        raise ConfigError(f"knn_fewshot embedder {embedder!r} is not one of: tfidf, minilm")
    pool = ctx.pool or ctx.trainset  # nearest neighbours come from the whole training split
    vectorizer = tfidf_embedder(pool, ctx.input_fields) if embedder == "tfidf" else minilm_embedder()
    return {"trainset": pool, "vectorizer": vectorizer, "metric": ctx.metric}


OPTIMIZERS: Registry[OptimizerSpec] = Registry("optimizer", {spec.name: spec for spec in [
    OptimizerSpec("none", None, "zero-shot baseline: the program as written"),
    OptimizerSpec("labeled_fewshot", "LabeledFewShot", "k labelled training examples as demos", {"k": 4},
                  compile_kwargs=lambda c: {"trainset": c.trainset, "sample": True}),
    OptimizerSpec("bootstrap_fewshot", "BootstrapFewShot", "demos from the teacher's successful traces",
                  {"max_bootstrapped_demos": 4, "max_labeled_demos": 4, "max_rounds": 1},
                  runtime=lambda c: {"metric": c.metric, "teacher_settings": {"lm": c.teacher_lm}}),
    OptimizerSpec("bootstrap_random_search", "BootstrapFewShotWithRandomSearch",
                  "several bootstrapped demo sets, the best on the validation set",
                  {"max_bootstrapped_demos": 4, "max_labeled_demos": 4, "num_candidate_programs": 3},
                  runtime=lambda c: {"metric": c.metric, "teacher_settings": {"lm": c.teacher_lm},
                                     "num_threads": c.threads},
                  compile_kwargs=lambda c: {"trainset": c.trainset, "valset": c.valset or None}),
    OptimizerSpec("knn_fewshot", "KNNFewShot", "the k nearest training examples as demos (TF-IDF by default)",
                  {"k": 4, "embedder": "tfidf", "max_bootstrapped_demos": 0, "max_labeled_demos": 4},
                  compile_kwargs=lambda c: {}),
    OptimizerSpec("copro", "COPRO", "instruction search by coordinate ascent",
                  {"breadth": 3, "depth": 1, "init_temperature": 1.0},
                  runtime=lambda c: {"metric": c.metric, "prompt_model": c.teacher_lm},
                  compile_kwargs=lambda c: {"trainset": c.trainset,
                                            "eval_kwargs": {"num_threads": c.threads, "display_progress": False}}),
    OptimizerSpec("mipro_v2", "MIPROv2", "instructions and demos by Bayesian search (auto light/medium/heavy)",
                  {"auto": "light", "max_bootstrapped_demos": 2, "max_labeled_demos": 2},
                  runtime=lambda c: {"metric": c.metric, "prompt_model": c.teacher_lm,
                                     "teacher_settings": {"lm": c.teacher_lm}, "num_threads": c.threads,
                                     "seed": c.seed, "verbose": False},
                  compile_kwargs=lambda c: {"trainset": c.trainset, "valset": c.valset or None,
                                            "requires_permission_to_run": False}),
    OptimizerSpec("simba", "SIMBA", "stochastic mini-batch ascent with self-reflective rules and demos",
                  {"bsize": 8, "num_candidates": 2, "max_steps": 2, "max_demos": 2},
                  runtime=lambda c: {"metric": c.metric, "prompt_model": c.teacher_lm, "num_threads": c.threads},
                  compile_kwargs=lambda c: {"trainset": c.trainset, "seed": c.seed}),
    OptimizerSpec("settings_search", SettingsSearch,
                  "the program's own settings (k, candidates, agree...) by grid or TPE search on the dev split",
                  {"space": {"agree": [0, 4, 5, 6]}, "trials": 16},
                  runtime=lambda c: {"metric": c.metric, "num_threads": c.threads, "seed": c.seed},
                  compile_kwargs=lambda c: {"trainset": c.trainset, "valset": c.valset or None}),
    OptimizerSpec("gepa", "GEPA", "reflective prompt evolution with textual feedback (reflection model configurable)",
                  {"max_metric_calls": 60, "reflection_minibatch_size": 3, "track_stats": True},
                  runtime=lambda c: {"metric": c.metric, "reflection_lm": c.teacher_lm, "num_threads": c.threads,
                                     "seed": c.seed},
                  compile_kwargs=lambda c: {"trainset": c.trainset, "valset": c.valset or None}),
]})


def teleprompter_class(spec: OptimizerSpec) -> type:
    return getattr(dspy, spec.cls) if isinstance(spec.cls, str) else spec.cls


def get_optimizer(name: str) -> OptimizerSpec:
    return OPTIMIZERS.get(name)


def resolve_settings(spec: OptimizerSpec, settings: dict[str, Any]) -> dict[str, Any]:
    """Defaults overridden by the user's settings; a setting the DSPy class does not take is an error."""
    resolved = {**spec.defaults, **settings}
    if spec.cls is None:
        if settings:
            raise ConfigError(f"optimizer 'none' takes no settings, got: {', '.join(settings)}")
        return resolved
    params = inspect.signature(teleprompter_class(spec).__init__).parameters
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values()) and spec.cls != "COPRO"
    allowed = set(params) - {"self", "metric", "prompt_model", "task_model", "reflection_lm", "teacher_settings",
                             "trainset", "vectorizer"} | ({"embedder"} if spec.name == "knn_fewshot" else set())
    unknown = [key for key in settings if key not in allowed and not open_kwargs]
    if unknown:
        raise ConfigError(f"optimizer {spec.name!r} has no setting {', '.join(map(repr, unknown))}; "
                          f"allowed: {', '.join(sorted(allowed))}")
    return resolved


def compile_program(spec: OptimizerSpec, settings: dict[str, Any], student: dspy.Module,
                    ctx: CompileInputs) -> tuple[dspy.Module, Any]:
    """Compile `student`; returns the program and the teleprompter (for its trajectory)."""
    if spec.cls is None:
        return student, None
    kwargs = dict(settings)
    runtime = _knn_runtime(ctx, kwargs) if spec.name == "knn_fewshot" else spec.runtime(ctx)
    # What chainopt passes at run time (threads, seed) is a default: a user's setting of the same name wins.
    teleprompter = teleprompter_class(spec)(**{**runtime, **kwargs})
    return teleprompter.compile(student, **spec.compile_kwargs(ctx)), teleprompter


def knn_program(program: dspy.Module, settings: dict[str, Any], pool: list[dspy.Example], metric: Callable,
                input_fields: tuple[str, ...]) -> dspy.Module:
    """A `knn_fewshot` program rebuilt from its JSON state (`program`, loaded) and its training pool: KNNFewShot
    picks demos per input at call time from the pool, which the state does not hold. How a Ray worker scores
    its shard of one, and how an export predicts."""
    opt = get_optimizer("knn_fewshot")
    ctx = CompileInputs(metric=metric, trainset=pool, valset=[], teacher_lm=None, seed=0, threads=1,
                        input_fields=input_fields)
    return compile_program(opt, dict(resolve_settings(opt, settings)), program, ctx)[0]


def trajectory(compiled: dspy.Module, teleprompter: Any) -> list[dict[str, Any]]:
    """Candidate scores over the optimizer's steps, in the order it evaluated them, from one record per
    optimizer: MIPROv2's trial logs (it also keeps the same evaluations best first as candidate_programs),
    GEPA's validation aggregates, else the scored candidate list (put back in seed order where the
    candidates carry one, as BootstrapFewShotWithRandomSearch's do; COPRO and SIMBA keep theirs best first).
    A settings_search step also says which settings it scored and what they cost, so a reader of the run
    sees why the kept setting won."""
    logs = sorted((getattr(compiled, "trial_logs", None) or {}).items())
    details: list[dict[str, Any]] = []
    scores = [log.get("full_eval_score", log.get("score")) for _, log in logs if isinstance(log, dict)]
    scores = [score for score in scores if score is not None]
    if not scores:
        scores = list(getattr(getattr(compiled, "detailed_results", None), "val_aggregate_scores", None) or [])
    if not scores:
        candidates = [c for c in getattr(compiled, "candidate_programs", None) or []
                      if isinstance(c, dict) and "score" in c]
        if candidates and all("seed" in c for c in candidates):
            candidates.sort(key=lambda c: c["seed"])
        scores = [c["score"] for c in candidates]
        details = [{key: c[key] for key in ("settings", "tokens_per_example", "seconds_per_success") if key in c}
                   for c in candidates]
    if not scores and teleprompter:
        scores = list(getattr(teleprompter, "results_best", {}).get("__all__", []))
    return [{"step": i, "score": float(score), **(details[i] if details else {})} for i, score in enumerate(scores)]
