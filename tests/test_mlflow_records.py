"""MLflow's own records of a trial, without a model: its data slices as dataset inputs, its predictors'
instructions in the Prompt Registry. (The logged model, which needs the GGUF to serve, is in
tests/test_mlflow_model.py.)"""

import mlflow
from mlflow.tracking import MlflowClient

from optimize import tracking
from optimize.config import (BudgetConfig, CostConfig, DataConfig, EvalConfig, ModelConfig, OptimizerConfig,
                             ProgramConfig, Trial)
from optimize.data import DATA_DIR, load_splits
from optimize.experiment import data_slices, retrieves


def _trial(program: str = "intent.predict", optimizer: str = "none", **data) -> Trial:
    cfg = DataConfig(dataset="banking77", train=6, dev=2, test=3, **data)
    return Trial(experiment="records", model=ModelConfig(), data=cfg, program=ProgramConfig(name=program),
                 optimizer=OptimizerConfig(name=optimizer), seed=0, budget=BudgetConfig(),
                 cost=CostConfig(), eval=EvalConfig())


def _logged(experiment_id: str, trial: Trial) -> dict:
    splits = load_splits(trial.data)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        tracking.log_datasets(data_slices(trial, splits, retrieves=retrieves(trial, splits)))
    inputs = MlflowClient().get_run(run.info.run_id).inputs.dataset_inputs
    return {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}


def test_each_slice_is_a_dataset_input_with_its_context_and_the_same_digest_for_the_same_slice(mlflow_store):
    """Fails if a slice is not logged, gets another name, source or context, if its schema lacks the columns,
    or if two runs on the same slice show different digests (or runs on other slices the same one)."""
    experiment_id = tracking.setup("records-datasets", mlflow_store)
    first, again = _logged(experiment_id, _trial()), _logged(experiment_id, _trial())
    assert sorted(first) == ["eval", "training", "validation"]
    assert {c: d.name for c, d in first.items()} == {"training": "banking77.train", "validation": "banking77.dev",
                                                    "eval": "banking77.test"}
    assert {c: d.digest for c, d in first.items()} == {c: d.digest for c, d in again.items()}
    assert len({d.digest for d in first.values()}) == 3  # three different slices
    assert str(DATA_DIR / "banking77" / "train.csv") in first["training"].source
    assert str(DATA_DIR / "banking77" / "test.csv") in first["eval"].source
    assert {"query", "intent"} <= {c["name"] for c in __import__("json").loads(first["eval"].schema)["mlflow_colspec"]}
    other = _logged(experiment_id, _trial(seed=1))  # another shuffle: other examples
    assert other["eval"].digest != first["eval"].digest


def test_a_retrieving_program_also_logs_the_pool_it_retrieves_from(mlflow_store):
    """Fails if intent.retrieve's (or a KNN optimizer's) whole training split is not logged as its retrieval
    source, or if a program that retrieves nothing logs one."""
    experiment_id = tracking.setup("records-pool", mlflow_store)
    pool = _logged(experiment_id, _trial("intent.retrieve", compile_train=2))
    assert pool["retrieval"].name == "banking77.train.pool"
    assert pool["retrieval"].profile != pool["training"].profile  # 6 rows retrieved from, 2 compiled on
    assert '"num_rows": 6' in pool["retrieval"].profile and '"num_rows": 2' in pool["training"].profile
    assert "retrieval" in _logged(experiment_id, _trial(optimizer="knn_fewshot"))
    assert "retrieval" not in _logged(experiment_id, _trial())


def _state(instructions: str, demos: list[dict]) -> dict:
    """DSPy's JSON state of a one-predictor program, as program.save() writes it."""
    return {"classify": {"traces": [], "train": [], "demos": demos,
                         "signature": {"instructions": instructions, "fields": []}, "lm": None},
            "metadata": {"dependency_versions": {}}}


def test_prompts_get_a_new_version_only_when_the_text_changes_and_are_linked_to_each_run(mlflow_store):
    """Fails if every run registers a new version of the same text, if a changed instruction or other demos
    do not make a new version, if the demos are not summarised, or if a run is not linked to its version."""
    experiment_id = tracking.setup("records-prompts", mlflow_store)
    client = MlflowClient()
    states = [_state("Classify the request.", []), _state("Classify the request.", []),
              _state("Classify the customer's request.", []),
              _state("Classify the customer's request.", [{"id": "x-1", "query": "card lost", "intent": "lost_card"}])]
    linked = []
    for state in states:
        with mlflow.start_run(experiment_id=experiment_id) as run:
            (version,) = tracking.register_prompts(tracking.predictor_prompts(state), "records", "intent.predict",
                                                   run.info.run_id)
        linked.append(client.get_run(run.info.run_id).data.tags["mlflow.linkedPrompts"])
        assert f'"version": "{version.version}"' in linked[-1]
    name = tracking.prompt_name("records", "intent.predict", "classify")
    assert sorted(int(v.version) for v in client.search_prompt_versions(name)) == [1, 2, 3]
    assert linked[0] == linked[1] != linked[2]  # the unchanged text: the same version, linked to both runs
    latest = client.load_prompt(f"prompts:/{name}@latest")
    assert latest.template.startswith("Classify the customer's request.\n\nDemos (1):")
    assert 'query: "card lost"; intent: "lost_card"' in latest.template and "x-1" not in latest.template
