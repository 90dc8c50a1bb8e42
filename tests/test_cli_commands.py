"""`chainopt eval`, `compare` and the `list` commands, through `main(argv)` (exit code and printed output)."""

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from optimize import tracking
from optimize.cli import main

PROGRAMS = {"intent.predict": "intent", "intent.cot": "intent", "intent.chain": "intent",
            "intent.retrieve": "intent",
            "multilabel.predict": "multilabel", "multilabel.retrieve": "multilabel",
            "math.predict": "math", "math.cot": "math", "math.chain": "math", "math.expr": "math",
            "math.reason": "math"}


def _json(capsys, *argv: str):
    assert main([*argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.model
def test_eval_scores_the_program_on_the_limited_slice_and_records_it(mlflow_store, tmp_path, monkeypatch, capsys):
    """Fails if `eval` exits non-zero, ignores --limit or --split, or does not record one finished run."""
    monkeypatch.chdir(tmp_path)
    data = _json(capsys, "eval", "--program", "intent.predict", "--dataset", "banking77", "--split", "test",
                 "--limit", "2")
    assert len(data["runs"]) == 1
    run = data["runs"][0]
    assert (run["program"], run["optimizer"], run["model"]) == ("intent.predict", "none", "smollm2-135m")
    assert run["metrics"]["n"] == 2 and run["metrics"]["attempted"] == 2 and run["metrics"]["tokens_total"] > 0
    stored = MlflowClient().get_run(run["run_id"])
    assert stored.info.status == "FINISHED"
    assert stored.data.params["eval.split"] == "test" and stored.data.params["data.test_size"] == "2"
    assert stored.data.params["data.train_size"] == "0"  # zero-shot: no training rows drawn


def test_datasets_list_names_the_datasets_with_their_sizes(capsys):
    """Fails if a named dataset is missing or its raw splits cannot be read."""
    rows = {r["name"]: r for r in _json(capsys, "datasets", "list")}
    assert set(rows) == {"banking77", "gsm8k", "gsm8k_socratic", "svamp"}
    assert rows["banking77"]["kind"] == "intent" and rows["banking77"]["labels"] == 77
    assert rows["banking77"]["splits"] == {"train": 10003, "test": 3080}
    assert all(rows[name]["kind"] == "math" for name in ("gsm8k", "gsm8k_socratic", "svamp"))


def test_models_list_describes_the_embedded_model(capsys, smollm_info):
    """Fails if an embedded model is missing from the list or the installed one is not described."""
    rows = {r["spec"]: r for r in _json(capsys, "models", "list")}
    assert set(rows) == {"smollm2-135m", "smollm2-135m-q8_0", "gemma3-270m", "qwen2.5-coder-0.5b"}
    smol = rows["smollm2-135m"]
    assert smol["available"] and smol["quantization"] == "Q4_1" and smol["sha256"] == smollm_info.sha256[:12]
    assert rows["smollm2-135m-q8_0"]["available"] and rows["smollm2-135m-q8_0"]["quantization"] == "Q8_0"
    assert rows["gemma3-270m"]["available"] or "gemma" in rows["gemma3-270m"]["reason"]  # an optional extra
    qwen = rows["qwen2.5-coder-0.5b"]  # an optional extra too, which scripts/install.sh installs
    assert qwen["sha256"] == "1d9614638d18" if qwen["available"] else "chainopt[qwen]" in qwen["reason"]


def test_programs_list_names_every_program_with_its_task(capsys):
    """Fails if a registered program is missing or listed under the wrong task."""
    rows = _json(capsys, "programs", "list")
    assert {r["name"]: r["task"] for r in rows} == PROGRAMS
    assert all(r["description"] for r in rows)


@pytest.mark.parametrize("argv, names", [(["datasets", "list"], ["banking77", "svamp"]),
                                         (["models", "list"], ["smollm2-135m"]),
                                         (["programs", "list"], list(PROGRAMS))])
def test_list_commands_print_a_table(argv, names, capsys):
    """The human form: exit 0 and a table holding the names (fails if the text form breaks)."""
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in names)


def test_compare_table_shows_each_runs_full_id_for_export(mlflow_store, capsys):
    """Fails if the human compare table leaves out the run id that `chainopt export RUN_ID` needs."""
    experiment_id = tracking.setup("compare-ids", mlflow_store)
    ids = []
    with mlflow.start_run(experiment_id=experiment_id, tags={tracking.TAG_KIND: "parent"}):
        for name, accuracy in (("zero", 0.5), ("fewshot", 0.75)):
            with mlflow.start_run(run_name=name, nested=True, experiment_id=experiment_id,
                                  tags={tracking.TAG_KIND: "child"}) as child:
                mlflow.log_metrics({"accuracy": accuracy, "seconds_per_success": 1.0})
                ids.append(child.info.run_id)
    assert main(["compare", "compare-ids"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "run id" in lines[0]
    for name, run_id in zip(("zero", "fewshot"), ids):
        assert any(name in line.split() and run_id in line.split() for line in lines), (run_id, lines)


def _compile_as_knn_does(args, out) -> int:
    """A command running DSPy's BootstrapFewShot as a KNN program does at every call (labeled demos only,
    so no model is needed); DSPy prints 'Bootstrapped 0 full traces ...' each time."""
    import dspy

    trainset = [dspy.Example(query="my card is late", intent="card_arrival").with_inputs("query")]
    dspy.BootstrapFewShot(max_bootstrapped_demos=0, max_labeled_demos=1).compile(dspy.Predict("query -> intent"),
                                                                               trainset=trainset)
    out.result("compiled", {"compiled": True})
    return 0


@pytest.mark.parametrize("flags", [[], ["-q"], ["--json"]], ids=["default", "quiet", "json"])
def test_library_prints_are_silent_unless_verbose(monkeypatch, capsys, flags):
    """Fails if DSPy's teleprompter prints reach the terminal (stdout or stderr) without -v."""
    monkeypatch.setattr("optimize.cli.cmd_programs", _compile_as_knn_does)
    assert main(["programs", "list", *flags]) == 0
    captured = capsys.readouterr()
    assert "compiled" in captured.out and "Bootstrapped" not in captured.out + captured.err
    assert main(["programs", "list", "-v"]) == 0  # asked for: shown, on stderr, apart from the result
    captured = capsys.readouterr()
    assert "Bootstrapped 0 full traces" in captured.err and "Bootstrapped" not in captured.out
