"""A run whose chains mostly end in an error is no result: its child run is FAILED with the most common error,
the sweep goes on, `chainopt run` exits 4, and a re-run does the failed combination again.

No model: `build_lm` is replaced by DSPy test LMs, one answering and one whose every call raises.
"""

from __future__ import annotations

import json

import dspy
import mlflow
import pytest
from dspy.utils.dummies import DummyLM
from mlflow.tracking import MlflowClient

from optimize import tracking
from optimize.cli import main
from optimize.evaluate import ChainRecord
from optimize.llm.adapter import CacheFriendlyAdapter
from optimize.trial import too_many_errors

BROKEN = "engine exploded: out of memory"
# Two combinations told apart by max_tokens: 32 gets the answering LM, 33 the broken one.
EXPERIMENT = """\
name = "errors"
[[models]]
spec = "smollm2-135m"
max_tokens = 32
[[models]]
spec = "smollm2-135m"
max_tokens = 33
[data]
dataset = "banking77"
train = 0
test = 3
[[programs]]
name = "intent.predict"
[[optimizers]]
name = "none"
[eval]
threads = 1
"""


class BrokenLM(dspy.BaseLM):
    """An engine whose every call fails: each chain ends in an error, not a wrong answer."""

    def __init__(self):
        super().__init__(model="broken")

    def forward(self, prompt=None, messages=None, **kwargs):
        raise RuntimeError(BROKEN)


@pytest.fixture
def fake_models(monkeypatch):
    def build(cfg):
        if cfg.max_tokens == 33:
            return BrokenLM()
        return DummyLM([{"intent": "card_arrival"}] * 10, adapter=CacheFriendlyAdapter())

    monkeypatch.setattr("optimize.trial.build_lm", build)


def _children(uri: str) -> list:
    mlflow.set_tracking_uri(uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name("errors")
    return client.search_runs([exp.experiment_id], f"tags.`{tracking.TAG_KIND}` = 'child'",
                              order_by=["attribute.start_time ASC"])


def test_mostly_erroring_run_is_failed_and_the_sweep_goes_on(capsys, tmp_path, mlflow_store, fake_models):
    config = tmp_path / "errors.toml"
    config.write_text(EXPERIMENT, encoding="utf-8")
    assert main(["run", str(config)]) == 4
    out, err = capsys.readouterr()
    failed, ok = ([r for r in _children(mlflow_store) if r.data.params["model.max_tokens"] == m] for m in ("33", "32"))
    (failed,), (ok,) = failed, ok
    assert ok.info.status == "FINISHED" and ok.data.metrics["error_rate"] == 0
    assert failed.info.status == "FAILED" and failed.data.metrics["error_rate"] == 1
    reason = failed.data.tags[tracking.TAG_FAILED]
    assert "\n" not in reason and BROKEN in reason and "100% of 3 chains" in reason and "(3x)" in reason
    assert f"FAILED: {reason}" in err  # the progress line
    assert f"FAILED intent.predict+none+smollm2-135m+s0: {reason}" in out  # under the result table
    header = out.splitlines()[0]
    assert "error rate" in header
    assert failed.data.tags.get(tracking.TAG_PARETO) != "true"

    # A re-run reuses the finished combination and runs the failed one again.
    assert main(["run", str(config), "--json"]) == 4
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert [(r["reused"], bool(r["failed"])) for r in runs] == [(True, False), (False, True)]
    assert len(_children(mlflow_store)) == 3


def test_error_rate_within_the_threshold_is_a_result(capsys, tmp_path, mlflow_store, fake_models):
    config = tmp_path / "errors.toml"
    config.write_text(EXPERIMENT + "max_error_rate = 1.0\n", encoding="utf-8")
    assert main(["run", str(config)]) == 0
    assert {r.info.status for r in _children(mlflow_store)} == {"FINISHED"}


@pytest.mark.parametrize("errors, limit, failed", [(0, 0.5, False), (2, 0.5, False), (3, 0.5, True), (1, 0.0, True)])
def test_too_many_errors_names_the_most_common_one(errors, limit, failed):
    messages = ["timeout", "engine exploded", "engine exploded"][:errors]
    records = [ChainRecord(i, str(i), {}, "x", error=m) for i, m in enumerate(messages)]
    records += [ChainRecord(9, "ok", {}, "x")] * (4 - errors)
    reason = too_many_errors(records, limit)
    assert bool(reason) is failed
    if failed:
        assert reason.endswith(f"): {messages[-1]}") and "of 4 chains" in reason
