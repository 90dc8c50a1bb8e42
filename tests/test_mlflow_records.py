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


def test_a_dataset_another_run_logged_at_the_same_moment_is_reused(mlflow_store, monkeypatch):
    """Two runs starting together on a team store log the same slice at once; the second insert hits the
    dataset's unique key (seen with PostgreSQL). Fails if that ends the run instead of logging again."""
    from mlflow.exceptions import MlflowException

    experiment_id = tracking.setup("records-race", mlflow_store)
    real, calls = MlflowClient.log_inputs, []

    def first_insert_collides(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MlflowException("duplicate key value violates unique constraint", error_code="INTERNAL_ERROR")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "log_inputs", first_insert_collides)
    logged = _logged(experiment_id, _trial())
    assert sorted(logged) == ["eval", "training", "validation"] and len(calls) == 4


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


def _record(index: int, error: str | None = None):
    from optimize.evaluate import ChainRecord
    from optimize.llm.types import Usage

    start = 1_700_000_000_000_000_000 + index * 10**9
    call = {"kind": "lm", "model": "m", "input_computed": 20, "input_reused": 50, "output": 5, "cached": False}
    return ChainRecord(index=index, example_id=f"x-{index}", inputs={"query": f"q{index}"}, gold="lost_card",
                       predicted=None if error else "lost_card", success=not error, score=0.0 if error else 1.0,
                       steps=1, error=error, start_ns=start, seconds=0.25,
                       usage=Usage(input_computed=20, input_reused=50, output=5, calls=1, seconds=0.1),
                       events=[{**call, "step": "classify", "start_ns": start + 10**6, "end_ns": start + 10**8}])


def test_traces_are_one_per_chain_for_the_first_examples_with_the_verdict(mlflow_store):
    """Fails if more chains than the sample are traced, if they are not the first by index, if a trace is not
    in the run, or if its root span lacks the verdict and times or a chain's error does not mark it ERROR."""
    experiment_id = tracking.setup("records-traces", mlflow_store)
    records = [_record(i) for i in (3, 0, 2)] + [_record(1, error="parse failure")]
    with mlflow.start_run(experiment_id=experiment_id) as run:
        assert tracking.log_chain_traces(records, 2, "intent.chain") == 2
    traces = mlflow.search_traces(locations=[experiment_id], run_id=run.info.run_id, return_type="list")
    assert len(traces) == 2
    by_name = {next(s for s in t.data.spans if s.parent_id is None).name: t for t in traces}
    assert set(by_name) == {"intent.chain x-0", "intent.chain x-1"}  # the first two by index
    assert by_name["intent.chain x-0"].info.state.value == "OK"
    failed = by_name["intent.chain x-1"]
    assert failed.info.state.value == "ERROR"
    root = next(s for s in failed.data.spans if s.parent_id is None)
    assert root.attributes["chainopt.error"] == "parse failure" and root.attributes["chainopt.success"] is False
    assert (root.start_time_ns, root.end_time_ns) == (records[3].start_ns, records[3].start_ns + 250_000_000)
    (step,) = [s for s in failed.data.spans if s.parent_id is not None]
    assert (step.name, step.attributes["chainopt.input_tokens_computed"], step.attributes["chainopt.output_tokens"]) \
        == ("classify", 20, 5)


def test_the_logged_model_names_the_gguf_and_copies_it_only_when_asked(mlflow_store, tmp_path):
    """Fails if the GGUF is copied into the logged model by default, or not copied with model_file = true
    (`gguf` artifact, which optimize/serving.py loads instead of the spec), or if the model lacks its signature
    or requirements. (No GGUF is loaded: the folder and the file are stand-ins.)"""
    from optimize.export import SERVING

    experiment_id = tracking.setup("records-model", mlflow_store)
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "manifest.json").write_text('{"model": {"sha256": "abc"}}')
    gguf = tmp_path / "stand-in.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))
    copied = {}
    for model_file in (None, gguf):
        with mlflow.start_run(experiment_id=experiment_id):
            model_id = tracking.log_program_model(folder, SERVING, [{"query": "a"}, {"query": "b"}], ["x", "y"],
                                                  tracking.requirements(), {"accuracy": 0.5}, model_file=model_file)
        local = mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path / model_id))
        meta = mlflow.models.Model.load(local)
        assert meta.signature is not None and "chainopt==" in (tmp_path / model_id / "requirements.txt").read_text()
        copied[model_file is not None] = sorted(p.name for p in (tmp_path / model_id).rglob("*.gguf"))
    assert copied == {False: [], True: ["stand-in.gguf"]}
