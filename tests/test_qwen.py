"""qwen2.5-coder-0.5b: assembled from six PyPI part packages into the model cache, and run through the engine.

The assembly tests use small fake parts (the package lookup is patched); the real-model tests need the
chainopt[qwen] extra, which scripts/install.sh installs, so they run in CI.
"""

import hashlib
import importlib.util

import dspy
import pytest

import optimize.llm.models as models
from optimize.config import DataConfig, ModelConfig
from optimize.data import load_splits
from optimize.errors import ModelError
from optimize.evaluate import evaluate
from optimize.llm.engine import build_lm
from optimize.llm.models import QWEN, SplitModel, assemble, describe, resolve_path
from optimize.trial import adapter, get_program

PARTS = [b"GGUF first part ", b"second ", b"third and last"]  # unequal lengths: a reordering changes the bytes


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Three fake part packages under tmp_path; a package not there is looked up for real (and missing)."""
    monkeypatch.setenv("CHAINOPT_CACHE", str(tmp_path / "cache"))
    lookup = models._package_dir
    monkeypatch.setattr(models, "_package_dir",
                        lambda package, hint: tmp_path / package if (tmp_path / package).is_dir()
                        else lookup(package, hint))
    for n, data in enumerate(PARTS, 1):
        (tmp_path / f"fake_part{n}" / "data").mkdir(parents=True)
        (tmp_path / f"fake_part{n}" / "data" / f"part{n:02d}.bin").write_bytes(data)
    whole = b"".join(PARTS)
    return SplitModel("fake.gguf", ("fake_part1", "fake_part2", "fake_part3"), len(whole),
                      hashlib.sha256(whole).hexdigest(), "install the fake extra")


def _models_folder(tmp_path) -> list[str]:
    folder = tmp_path / "cache" / "models"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_parts_are_joined_in_order_once(fake_parts, tmp_path, monkeypatch):
    """Through the registry: fails if the parts are joined out of order, a temporary file is left, or a
    second resolve assembles again instead of reusing the cached file."""
    monkeypatch.setattr(models, "QWEN", fake_parts)
    path = resolve_path("qwen2.5-coder-0.5b")
    assert path.read_bytes() == b"".join(PARTS)
    assert _models_folder(tmp_path) == ["fake.gguf"] and path.stat().st_mode & 0o777 == 0o644
    (tmp_path / "fake_part2" / "data" / "part02.bin").unlink()  # the parts are not read again
    assert resolve_path("qwen2.5-coder-0.5b") == path


def test_a_sha256_mismatch_leaves_no_file(fake_parts, tmp_path):
    """Fails if a file whose hash is wrong is kept (under its name or as a temporary) or the error is vague."""
    wrong = SplitModel(fake_parts.name, fake_parts.packages, fake_parts.size_bytes, "0" * 64, fake_parts.hint)
    with pytest.raises(ModelError, match=r"assembled fake.gguf .* sha256 .*expected .*install the fake extra") as info:
        assemble(wrong)
    assert "\n" not in str(info.value)
    assert _models_folder(tmp_path) == []


@pytest.mark.parametrize("damage, message", [
    ("package", "model package 'fake_part2' is not installed; install it with: install the fake extra"),
    ("file", "model package 'fake_part2' has no part02.bin"),
    ("short", f"is {len(b''.join(PARTS)) - 1} bytes with sha256 .*expected {len(b''.join(PARTS))} bytes"),
])
def test_a_missing_or_short_part_is_one_line_and_leaves_no_file(fake_parts, tmp_path, damage, message):
    """Fails if a missing package, a package without its part file, or a truncated part is not named in one
    line, or leaves a file behind."""
    part = tmp_path / "fake_part2" / "data" / "part02.bin"
    if damage == "package":
        part.unlink()
        part.parent.rmdir()
        part.parent.parent.rmdir()
    elif damage == "file":
        part.unlink()
    else:
        part.write_bytes(PARTS[1][:-1])
    with pytest.raises(ModelError, match=message) as info:
        assemble(fake_parts)
    assert "\n" not in str(info.value)
    assert _models_folder(tmp_path) == []


installed = pytest.mark.skipif(importlib.util.find_spec(QWEN.packages[0]) is None,
                               reason="the chainopt[qwen] extra is not installed")


@pytest.fixture(scope="module")
def qwen_info():
    return describe("qwen2.5-coder-0.5b")


@installed
@pytest.mark.model
def test_real_qwen_identity(qwen_info):
    """Fails if the assembled file is not the pinned Qwen2.5 Coder 0.5B Instruct GGUF."""
    assert qwen_info.name == "qwen2.5-coder-0.5b"
    assert qwen_info.size_bytes == 491_400_064
    assert qwen_info.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert qwen_info.architecture == "qwen2" and qwen_info.quantization == "Q4_K_M"
    assert qwen_info.has_chat_template and qwen_info.context_length == 32768
    assert qwen_info.n_params == 630_167_424  # 494M, plus the output matrix this file stores apart from the embeddings


@installed
@pytest.mark.model
def test_real_qwen_predicts_a_banking77_label(qwen_info):
    """One Banking77 query through chainopt's engine under intent.predict. Fails if the model does not load
    or its answer is not one of the 77 labels."""
    splits = load_splits(DataConfig(dataset="banking77", train=0, test=1, seed=0))
    spec = get_program("intent.predict")
    lm = build_lm(ModelConfig(spec="qwen2.5-coder-0.5b", engine="sequential", cache=False, max_tokens=32, n_ctx=2048))
    with dspy.context(lm=lm, adapter=adapter()):
        result = evaluate(spec.build(splits.task), splits.test, spec.metric(splits.task), splits.task.answer_field,
                          threads=1)
    (record,) = result.records
    assert record.error is None, record.error
    assert record.predicted in splits.task.labels
