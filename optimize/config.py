"""Experiment configuration: a TOML file maps one-to-one onto these frozen, typed objects.

The CLI and the Python API take the same objects. Unknown keys are rejected with a suggestion,
and every problem in a file is reported at once.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from optimize.errors import ConfigError
from optimize.llm.settings import ModelConfig
from optimize.registry import did_you_mean


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


SplitName = Literal["train", "dev", "test"]


class DataConfig(Section):
    """Which examples: a named dataset (chainopt datasets list) or a user's own file or Hub dataset."""

    dataset: str = "banking77"
    train: int = Field(50, ge=0)
    compile_train: int | None = Field(None, ge=1, description="training examples optimizers compile on "
                                      "(the first of the train split); default: all. Retrieval always sees all")
    dev: int = Field(0, ge=0)
    test: int = Field(50, ge=0)
    seed: int = 0
    # A user's own data: a local .jsonl/.csv/.parquet path or hf:<dataset> (online), with field mapping.
    path: str | None = None
    split: str | None = Field(None, description="Hub split to read, e.g. 'train'")
    inputs: dict[str, str] | None = Field(None, description="program input name -> column in the file")
    answer: str | None = Field(None, description="column holding the gold answer")
    task: Literal["intent", "multilabel", "math", "qa"] | None = Field(
        None, description="multilabel: the answer column holds a list of labels per row (found by itself when "
        "task is not set and the answer column holds lists)")
    skip_malformed: bool = False
    # Splits a user made: a column naming each row's split, or separate train and test files (instead of path).
    split_column: str | None = Field(None, description="column whose value puts a row in train, dev or test")
    split_values: dict[SplitName, str] = Field(default_factory=dict, description="split -> its value in "
                                               "split_column; default: the split's own name")
    train_path: str | None = Field(None, description="file of training rows (dev is carved from it by seed)")
    test_path: str | None = Field(None, description="file of test rows")

    @model_validator(mode="after")
    def _one_source(self) -> "DataConfig":
        if (self.train_path is None) != (self.test_path is None):
            raise ValueError("data.train_path and data.test_path go together")
        if self.train_path and self.path:
            raise ValueError("use data.path or data.train_path/test_path, not both")
        if (self.split_column or self.split_values) and not self.path:
            raise ValueError("data.split_column and data.split_values split the file of data.path")
        if self.split_values and not self.split_column:
            raise ValueError("data.split_values needs data.split_column")
        return self

    def split_value(self, split: SplitName) -> str:
        """The split_column value that puts a row in `split`."""
        return self.split_values.get(split, split)

    def files(self) -> tuple[str, ...]:
        """The user's data sources, local or hf:, as written."""
        return tuple(p for p in (self.path, self.train_path, self.test_path) if p)


class ProgramConfig(Section):
    name: str = "intent.predict"
    settings: dict[str, Any] = Field(default_factory=dict)
    optimizers: tuple[str, ...] | None = Field(None, description="run this program only with these of the "
                                                "experiment's optimizers (default: with all of them)")


class OptimizerConfig(Section):
    name: str = "none"
    settings: dict[str, Any] = Field(default_factory=dict)
    teacher: ModelConfig | None = Field(None, description="teacher / prompt / reflection model; default: the task model")


class BudgetConfig(Section):
    run_tokens: int | None = Field(None, ge=1, description="hard ceiling on all tokens of one child run")
    chain_tokens: int | None = Field(None, ge=1, description="hard ceiling on the tokens of one chain")
    max_retries: int = Field(2, ge=0, description="validator-driven retries per step")


class CostConfig(Section):
    """Prices for the money column; energy falls back to CPU-seconds x watts when RAPL is unreadable."""

    usd_per_hour: float = Field(0.0, ge=0)
    usd_per_m_input: float = Field(0.0, ge=0)
    usd_per_m_output: float = Field(0.0, ge=0)
    watts_per_core: float = Field(15.0, ge=0)


class TrackingConfig(Section):
    uri: str | None = Field(None, description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI or the project store")
    experiment: str | None = None
    model_file: bool = Field(False, description="copy the GGUF into each run's logged MLflow model (by default "
                             "the model names it by sha256 and loads it from where chainopt finds it)")
    traces: bool = Field(False, description="record an MLflow trace per evaluated chain for a sample of examples")
    trace_examples: int = Field(10, ge=1, description="how many examples of each run are traced (the first, by "
                                "index), when traces = true")


class EvalConfig(Section):
    threads: int = Field(16, ge=1, le=64)
    split: SplitName = "test"
    max_error_rate: float = Field(0.5, ge=0, le=1, description="share of chains ending in an error (not a wrong "
                                  "answer) above which the trial is FAILED, not a result")


class ExecutionConfig(Section):
    """`[execution]`: where the sweep's trials run. `local` (the default) runs them one after another in this
    process; `ray` runs them on a Ray cluster's workers (optimize/scale.py), each evaluation's examples
    sharded across them, while this process alone writes MLflow. How a sweep runs is no part of its results:
    it changes no run's identity, so a sweep started on one backend resumes on the other."""

    backend: Literal["local", "ray"] = "local"
    address: str | None = Field(None, description="Ray cluster to join: 'auto' (the one `ray start` began on this "
                                "machine), HOST:PORT or ray://HOST:10001; default: start a local one for this run")
    workers: int | None = Field(None, ge=1, description="Ray workers (each loads the models once); default: the "
                                "cluster's CPUs / cpus_per_worker")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs each Ray worker reserves: its llama.cpp threads")


class CascadeConfig(Section):
    """`[cascade]`: the experiment's programs also run as a cascade over its models (programs/cascade.py): the
    first answers, the next one only when that answer is in doubt (rejected by its validator, or less sure
    than these thresholds). Each single model still runs as usual, so the cascade stands beside them."""

    models: tuple[str, ...] | None = Field(None, description="specs of [[models]] entries, cheapest first; "
                                           "default: every [[models]] entry, in the file's order")
    min_probability: float = Field(0.0, ge=0, le=1, description="escalate a choice whose label got less probability")
    min_margin: float = Field(0.0, ge=0, le=1, description="escalate a choice whose margin over the next label is less")
    min_agreement: float = Field(0.0, ge=0, le=1, description="escalate an answer fewer of the samples agree on (math.expr)")
    optimizers: tuple[str, ...] | None = Field(None, description="run the cascade with these of the experiment's "
                                                "optimizers, in place of each program's own list (default: that list): "
                                                "settings_search over the thresholds is for the cascade alone")


class CascadeTrial(Section):
    """A cascade as one trial runs it: its models, resolved, in escalation order, and its thresholds."""

    models: tuple[ModelConfig, ...]
    min_probability: float = 0.0
    min_margin: float = 0.0
    min_agreement: float = 0.0

    @property
    def name(self) -> str:
        return "cascade(" + ">".join(m.spec.rsplit("/", 1)[-1] for m in self.models) + ")"

    def thresholds(self) -> dict[str, float]:
        return {"min_probability": self.min_probability, "min_margin": self.min_margin,
                "min_agreement": self.min_agreement}


class Experiment(Section):
    """A whole experiment file; `models x programs x optimizers x seeds` is the sweep."""

    name: str
    description: str = ""
    models: tuple[ModelConfig, ...] = (ModelConfig(),)
    data: DataConfig = DataConfig()
    programs: tuple[ProgramConfig, ...] = (ProgramConfig(),)
    optimizers: tuple[OptimizerConfig, ...] = (OptimizerConfig(),)
    seeds: tuple[int, ...] = (0,)
    budget: BudgetConfig = BudgetConfig()
    cost: CostConfig = CostConfig()
    tracking: TrackingConfig = TrackingConfig()
    eval: EvalConfig = EvalConfig()
    baselines: tuple[str, ...] = Field((), description="classical classifiers fitted on the same training split "
                                       "(optimize.baselines), each recorded as a child run beside the programs")
    cascade: CascadeConfig | None = Field(None, description="also run each program as a cascade over the models")
    execution: ExecutionConfig = ExecutionConfig()

    @model_validator(mode="after")
    def _non_empty(self) -> "Experiment":
        for key in ("models", "programs", "optimizers", "seeds"):
            if not getattr(self, key):
                raise ValueError(f"{key} must list at least one entry")
        named = {o.name for o in self.optimizers}
        for program in self.programs:
            missing = [name for name in program.optimizers or () if name not in named]
            if missing:
                raise ValueError(f"program {program.name} lists optimizer {', '.join(missing)}, which the "
                                 f"experiment does not run; its optimizers: {', '.join(sorted(named))}")
        twice = sorted({b for b in self.baselines if self.baselines.count(b) > 1})
        if twice:
            raise ValueError(f"baselines lists {', '.join(twice)} more than once")
        if self.cascade is not None:
            self.cascade_models()  # raises, naming what is wrong
            missing = [name for name in self.cascade.optimizers or () if name not in named]
            if missing:
                raise ValueError(f"cascade lists optimizer {', '.join(missing)}, which the experiment does not "
                                 f"run; its optimizers: {', '.join(sorted(named))}")
        return self

    def cascade_models(self) -> tuple[ModelConfig, ...]:
        """The cascade's models, cheapest first: each name is the spec of one [[models]] entry."""
        assert self.cascade is not None
        specs = [m.spec for m in self.models]
        names = self.cascade.models or tuple(specs)
        for name in names:
            if specs.count(name) != 1:
                found = "no" if not specs.count(name) else "more than one"
                raise ValueError(f"cascade.models names {name!r}, but {found} [[models]] entry has that spec; "
                                 f"the models: {', '.join(specs)}")
        if len(names) < 2 or len(set(names)) != len(names):
            raise ValueError(f"cascade.models must name at least two different [[models]] specs, got: "
                             f"{', '.join(names) or 'none'}")
        return tuple(self.models[specs.index(name)] for name in names)

    def combinations(self) -> list["Trial"]:
        trials = [Trial(experiment=self.name, model=m, data=self.data, program=p, optimizer=o, seed=s,
                        budget=self.budget, cost=self.cost, eval=self.eval)
                  for m, p, o, s in itertools.product(self.models, self.programs, self.optimizers, self.seeds)
                  if p.optimizers is None or o.name in p.optimizers]
        if self.cascade is not None:
            models = self.cascade_models()
            cascade = CascadeTrial(models=models, **{k: getattr(self.cascade, k) for k in
                                                     ("min_probability", "min_margin", "min_agreement")})
            trials += [Trial(experiment=self.name, model=models[0], data=self.data, program=p, optimizer=o, seed=s,
                             budget=self.budget, cost=self.cost, eval=self.eval, cascade=cascade)
                       for p, o, s in itertools.product(self.programs, self.optimizers, self.seeds)
                       if (o.name in self.cascade.optimizers if self.cascade.optimizers is not None
                           else p.optimizers is None or o.name in p.optimizers)]
        return trials


class Trial(Section):
    """One fully resolved combination of a sweep: what one MLflow child run records."""

    experiment: str
    model: ModelConfig
    data: DataConfig
    program: ProgramConfig
    optimizer: OptimizerConfig
    seed: int
    budget: BudgetConfig
    cost: CostConfig
    eval: EvalConfig
    cascade: CascadeTrial | None = None  # a cascade over several models (`model` is its first)

    @property
    def run_name(self) -> str:
        """How the child run, the progress lines and the result table name this combination."""
        model = self.cascade.name if self.cascade else self.model.spec
        return f"{self.program.name}+{self.optimizer.name}+{model}+s{self.seed}"

    def _dump(self, exclude: set[str] = set()) -> dict[str, Any]:
        # A trial with no cascade dumps (and hashes) as it did before the key existed: its stored run is reused.
        return self.model_dump(mode="json", exclude=exclude | (set() if self.cascade else {"cascade"}))

    def config_hash(self) -> str:
        """Identity of a trial's resolved config: a finished child run with this hash is not recomputed."""
        blob = json.dumps(self._dump(), sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def flat_params(self) -> dict[str, Any]:
        """Every setting as dotted MLflow params (autolog misses constructor settings)."""
        return dict(_flatten(self._dump({"experiment"})))


def _flatten(value: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flatten(v, f"{prefix}{k}.")]
    return [(prefix.rstrip("."), value)]


# TOML table names a user writes -> field names (singular tables read more naturally for one entry).
_ALIASES = {"model": "models", "program": "programs", "optimizer": "optimizers"}


def _normalise(raw: dict[str, Any], source: str) -> dict[str, Any]:
    data = dict(raw)
    for short, long in _ALIASES.items():
        if short in data:
            if long in data:
                raise ConfigError(f"{source}: use either [{short}] or [[{long}]], not both")
            value = data.pop(short)
            data[long] = value if isinstance(value, list) else [value]
    return data


def _format_errors(source: str, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            owner = _owner_model(item["loc"][:-1])
            allowed = sorted(owner.model_fields) if owner else []
            hint = did_you_mean(str(item["loc"][-1]), allowed)
            lines.append(f"{source}: unknown key {loc!r}{hint}; allowed: {', '.join(allowed)}")
        elif item["type"] == "value_error" and not isinstance(item.get("input"), (str, int, float)):
            lines.append(f"{source}: {item['ctx']['error']}")  # a section's own rule, which names its keys
        else:
            lines.append(f"{source}: {loc or '<top>'} = {item.get('input')!r}: {item['msg']}")
    return "\n".join(lines)


def _owner_model(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] | None = Experiment
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        candidates = [annotation, *args]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def parse_experiment(raw: dict[str, Any], source: str = "<config>") -> Experiment:
    try:
        return Experiment.model_validate(_normalise(raw, source))
    except ValidationError as exc:
        raise ConfigError(_format_errors(source, exc)) from None


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file; every error names the file, key, value and what is allowed.
    Its relative paths are resolved against its folder, so everything downstream sees absolute paths."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"experiment file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    raw.setdefault("name", path.stem)
    return _beside(parse_experiment(raw, str(path)), path.parent)


def _beside(exp: Experiment, folder: Path) -> Experiment:
    """Paths in an experiment file name files beside it, whichever folder chainopt runs in: a relative data
    path (path, train_path, test_path) or .gguf model spec becomes absolute against the file's folder (absolute and hf: ones stay)."""
    def local(value: str) -> str:
        keep = value.startswith("hf:") or Path(value).expanduser().is_absolute()
        return value if keep else str((folder / value).resolve())

    def model(cfg: ModelConfig) -> ModelConfig:
        return cfg.model_copy(update={"spec": local(cfg.spec)}) if cfg.spec.endswith(".gguf") else cfg

    return exp.model_copy(update={
        "models": tuple(model(m) for m in exp.models),
        "cascade": exp.cascade.model_copy(update={"models": tuple(model(ModelConfig(spec=s)).spec for s in exp.cascade.models)})
                   if exp.cascade and exp.cascade.models else exp.cascade,
        "optimizers": tuple(o.model_copy(update={"teacher": model(o.teacher)}) if o.teacher else o
                            for o in exp.optimizers),
        "data": exp.data.model_copy(update={key: local(value) for key in ("path", "train_path", "test_path")
                                            if (value := getattr(exp.data, key))})})
