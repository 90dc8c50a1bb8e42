"""`[optimizers.teacher]`: a compile that asks another model than the one it evaluates.

tests/data/teacher.toml runs bootstrap_fewshot with the task model on the batched engine and the teacher
(the same GGUF file) on the sequential engine: two engines of this process, each counting its own calls.
"""

import pytest
from mlflow.tracking import MlflowClient

from optimize.cli import main
from optimize.config import load_experiment
from optimize.llm.engine import get_engine

pytestmark = pytest.mark.model


def test_the_teacher_model_bootstraps_and_the_task_model_is_evaluated(mlflow_store, tmp_path, monkeypatch, root,
                                                                      smollm_info):
    """Every compile call goes to the teacher's engine and every evaluation call to the task model's; the
    run records the teacher and what its compile spent. Fails if the teacher setting is ignored (the task
    engine would also get the bootstrap calls), if the teacher answers the evaluation, or if the run does
    not record the teacher."""
    exp = load_experiment(root / "tests/data/teacher.toml")
    (trial,) = exp.combinations()
    task_engine = get_engine(trial.model.model_copy(update={"seed": trial.seed}))  # what run_trial will get
    teacher_engine = get_engine(trial.optimizer.teacher)
    assert task_engine is not teacher_engine
    before = {engine: (engine.totals.calls, engine.totals.tokens) for engine in (task_engine, teacher_engine)}
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(root / "tests/data/teacher.toml"), "--quiet"]) == 0
    (task_calls, task_tokens), (teacher_calls, teacher_tokens) = (
        (engine.totals.calls - calls, engine.totals.tokens - tokens) for engine, (calls, tokens) in before.items())

    (run,) = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("teacher").experiment_id],
                                        "tags.`chainopt.kind` = 'child'")
    assert run.info.status == "FINISHED"
    metrics, params = run.data.metrics, run.data.params
    # Bootstrap asks the teacher once per training row until it has a demo; the task model answers the test rows.
    assert 1 <= teacher_calls <= exp.data.train
    assert task_calls == metrics["lm_calls"] == metrics["n"] == exp.data.test
    assert metrics["compile_tokens"] == teacher_tokens > 0
    assert metrics["tokens_total"] == task_tokens
    assert params["optimizer.teacher.engine"] == "sequential" and params["model.engine"] == "batched"
    assert params["teacher.sha256"] == smollm_info.sha256 and params["teacher.quantization"] == "Q4_1"
