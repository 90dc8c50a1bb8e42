"""Experiment files: every shipped file loads and validates; mistakes are reported at once, with the fix."""

import json

import pytest

from optimize.config import Experiment, ModelConfig, load_experiment, parse_experiment
from optimize.errors import ConfigError


def shipped(root):
    return sorted((root / "experiments").glob("*.toml"))


def test_every_shipped_experiment_loads_and_checks(root):
    """A file that needs the minilm extra checks where it is installed, and elsewhere fails with the one line
    that says how to install it."""
    from optimize.experiment import check
    from programs.retrieval import minilm_installed

    files = shipped(root)
    assert files
    for path in files:
        exp = load_experiment(path)
        assert exp.name and exp.combinations()
        if "minilm" in path.read_text() and not minilm_installed():
            with pytest.raises(ConfigError, match=r"needs the chainopt\[minilm\] extra"):
                check(exp)
        else:
            check(exp)
        assert path.read_text().startswith("#"), f"{path.name} must open with a comment saying what it is for"


def test_singular_tables_and_defaults():
    exp = parse_experiment({"name": "x", "model": {"spec": "smollm2-135m"}, "program": {"name": "intent.predict"}})
    assert exp.models == (ModelConfig(spec="smollm2-135m"),)
    assert [o.name for o in exp.optimizers] == ["none"]


def test_sweep_is_the_product():
    exp = parse_experiment({"name": "s", "models": [{}, {"n_ctx": 2048}], "programs": [{}, {"name": "intent.cot"}],
                            "optimizers": [{"name": "none"}, {"name": "labeled_fewshot"}], "seeds": [0, 1]})
    trials = exp.combinations()
    assert len(trials) == 16
    assert len({t.config_hash() for t in trials}) == 16


def test_config_hash_is_stable_and_sensitive():
    a = parse_experiment({"name": "h"}).combinations()[0]
    b = parse_experiment({"name": "h"}).combinations()[0]
    c = parse_experiment({"name": "h", "data": {"test": 51}}).combinations()[0]
    assert a.config_hash() == b.config_hash() != c.config_hash()


def test_flat_params_cover_every_setting():
    trial = parse_experiment({"name": "p", "optimizer": {"name": "labeled_fewshot", "settings": {"k": 3}}}).combinations()[0]
    params = trial.flat_params()
    assert params["optimizer.settings.k"] == 3 and params["model.spec"] == "smollm2-135m"
    assert params["budget.chain_tokens"] is None and "cost.usd_per_hour" in params


@pytest.mark.parametrize("text, message", [
    ('name = "x"\n[modle]\nspec = "a"', r"unknown key 'modle'.*did you mean 'models'"),
    ('name = "x"\n[data]\ntset = 5', r"unknown key 'data.tset'.*did you mean 'test'"),
    ('name = "x"\n[tracking]\nlog_everything = true', r"unknown key 'tracking.log_everything'.*allowed: experiment, "),
    ('name = "x"\n[data]\ntest = -1', r"data.test = -1: Input should be greater than or equal to 0"),
    ('name = "x"\n[budget]\nrun_tokens = 0', r"budget.run_tokens = 0: .*greater than or equal to 1"),
    ('name = "x"\n[model]\ntemperature = "hot"', r"temperature = 'hot'"),
    ('name = "x"\n[model]\n[[models]]', r"use either \[model\] or \[\[models\]\]"),
    ('name = "x"\nseeds = []', r"seeds must list at least one entry"),
    ('name = "x"\n[model]\nengine = "turbo"', r"engine = 'turbo'.*'batched' or 'sequential'"),
    ('name = "x"\n[data\n', r"invalid TOML"),
])
def test_bad_files_name_file_key_value_and_rule(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_experiment(path)
    assert str(path) in str(info.value)


def test_all_problems_reported_at_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('name = "x"\n[data]\ntest = -1\ntrain = -2\n[model]\nn_ctx = 3\n')
    with pytest.raises(ConfigError) as info:
        load_experiment(path)
    assert len(str(info.value).splitlines()) == 3


def test_missing_and_non_utf8_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_experiment(tmp_path / "nope.toml")
    bad = tmp_path / "latin.toml"
    bad.write_bytes(b'name = "caf\xe9"\n')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_experiment(bad)


def test_name_defaults_to_file_stem(tmp_path):
    path = tmp_path / "my-exp.toml"
    path.write_text("seeds = [1]\n")
    assert load_experiment(path).name == "my-exp"


def test_frozen():
    exp = Experiment(name="f")
    with pytest.raises(Exception):
        exp.name = "g"


def test_paths_are_relative_to_the_experiment_file_not_the_current_folder(tmp_path, monkeypatch):
    """Fails if `path = "mine.jsonl"` in exps/x.toml is read from the current folder instead of exps/."""
    (tmp_path / "exps").mkdir()
    (tmp_path / "elsewhere").mkdir()
    path = tmp_path / "exps" / "x.toml"
    path.write_text('[data]\npath = "mine.jsonl"\ntask = "intent"\n'
                    '[[models]]\nspec = "models/m.gguf"\n[[models]]\nspec = "/abs/m.gguf"\n'
                    '[[models]]\nspec = "hf:owner/repo/m.gguf"\n[[models]]\nspec = "smollm2-135m"\n'
                    '[optimizer]\nname = "bootstrap_fewshot"\nteacher = { spec = "../teacher.gguf" }\n')
    monkeypatch.chdir(tmp_path / "elsewhere")
    exp = load_experiment("../exps/x.toml")
    assert exp.data.path == str(tmp_path / "exps" / "mine.jsonl")
    assert [m.spec for m in exp.models] == [str(tmp_path / "exps/models/m.gguf"), "/abs/m.gguf",
                                            "hf:owner/repo/m.gguf", "smollm2-135m"]
    assert exp.optimizers[0].teacher.spec == str(tmp_path / "teacher.gguf")
    hub = tmp_path / "exps" / "hub.toml"
    hub.write_text('[data]\npath = "hf:owner/name"\ntask = "qa"\n')
    assert load_experiment(hub).data.path == "hf:owner/name"


def test_split_files_are_relative_to_the_experiment_file(tmp_path, monkeypatch):
    """Fails if train_path/test_path are read from the current folder instead of the experiment's."""
    (tmp_path / "exps").mkdir()
    path = tmp_path / "exps" / "x.toml"
    path.write_text('[data]\ntrain_path = "data/train.jsonl"\ntest_path = "/abs/test.jsonl"\ntask = "intent"\n')
    monkeypatch.chdir(tmp_path)
    data = load_experiment("exps/x.toml").data
    assert (data.train_path, data.test_path) == (str(tmp_path / "exps/data/train.jsonl"), "/abs/test.jsonl")


def test_validate_finds_the_data_file_beside_the_experiment(tmp_path, monkeypatch, capsys):
    """The user's case: `chainopt validate exps/x.toml` run from the project folder reads exps/mine.jsonl."""
    from optimize.cli import main

    (tmp_path / "exps").mkdir()
    rows = [{"text": f"my card {i} has not arrived", "label": "card_arrival"} for i in range(3)]
    (tmp_path / "exps" / "mine.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "exps" / "x.toml").write_text('[data]\npath = "mine.jsonl"\ntask = "intent"\n'
                                              'inputs = { query = "text" }\nanswer = "label"\ntrain = 1\ntest = 2\n')
    monkeypatch.chdir(tmp_path)
    assert main(["validate", "exps/x.toml"]) == 0, capsys.readouterr().err


def test_a_program_can_be_limited_to_some_optimizers():
    exp = parse_experiment({"name": "x", "optimizers": [{"name": "none"}, {"name": "settings_search"}], "programs": [
        {"name": "intent.predict", "optimizers": ["none"]}, {"name": "intent.retrieve"}]})
    assert [(t.program.name, t.optimizer.name) for t in exp.combinations()] == [
        ("intent.predict", "none"), ("intent.retrieve", "none"), ("intent.retrieve", "settings_search")]
    with pytest.raises(ConfigError, match="lists optimizer nope, which the experiment does not run; its optimizers: none"):
        parse_experiment({"name": "x", "programs": [{"name": "intent.predict", "optimizers": ["nope"]}]})


def test_settings_search_on_a_program_without_settings_is_refused_before_running():
    from optimize.experiment import check

    exp = parse_experiment({"name": "x", "data": {"train": 4, "test": 2}, "optimizers": [{"name": "settings_search"}],
                            "programs": [{"name": "intent.predict"}, {"name": "intent.retrieve",
                                                                      "optimizers": ["settings_search"]}]})
    with pytest.raises(ConfigError, match="program IntentClassifier has no settings to search") as caught:
        check(exp)
    assert len(str(caught.value).splitlines()) == 1  # intent.retrieve has agree: only intent.predict is refused


def test_a_retrieval_program_without_training_examples_is_refused_before_running(capsys):
    from optimize.cli import main
    from optimize.experiment import check

    exp = parse_experiment({"name": "x", "data": {"train": 0, "test": 2}, "programs": [{"name": "intent.retrieve"}]})
    with pytest.raises(ConfigError, match="intent.retrieve retrieves from the training split, which is empty"):
        check(exp)
    assert main(["eval", "--program", "intent.retrieve", "--dataset", "banking77", "--limit", "2"]) == 2
    assert "chainopt eval: --train N" in capsys.readouterr().err
