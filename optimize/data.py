"""Datasets: the vendored named sets and a user's own data, loaded into dspy.Examples and split by seed.

Tables are read by Hugging Face `datasets` from local files, so parsed data is cached as Arrow.
A user's text file is first checked record by record, because `load_dataset` alone cannot say which
line is malformed; bad records are reported with their line number, or skipped and counted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import datasets as hf
from datasets.exceptions import DatasetNotFoundError
import dspy

from optimize.config import DataConfig
from optimize.errors import DataError
from optimize.registry import Registry, did_you_mean

# The vendored data sits next to the package in the source tree; `datasets/` has no __init__.py
# so that it can never shadow the Hugging Face library of the same name.
DATA_DIR = Path(__file__).resolve().parent.parent / "datasets"

Row = dict[str, Any]
TaskKind = Literal["intent", "multilabel", "math", "qa"]

# Canonical (input, answer) field names per task kind, so programs of one kind work on any of its data.
FIELDS: dict[str, tuple[str, str]] = {"intent": ("query", "intent"), "multilabel": ("query", "intents"),
                                      "math": ("question", "answer"), "qa": ("question", "answer")}
LABELLED = ("intent", "multilabel")  # task kinds with a closed label set, the union of the answers

# SVAMP ships as one file: its test part is fixed once, with this seed, never with the run's seed.
SVAMP_CARVE_SEED = 2021


@dataclass(frozen=True)
class Task:
    """What a program needs to know about its data: the field names and, for intent and multilabel, the closed
    label set (a multilabel example's answer is a list of labels from it)."""

    name: str
    kind: TaskKind
    input_fields: tuple[str, ...]
    answer_field: str
    labels: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Splits:
    """The examples of one run; `skipped` counts malformed rows dropped under data.skip_malformed."""

    task: Task
    train: list[dspy.Example]
    dev: list[dspy.Example]
    test: list[dspy.Example]
    skipped: int = 0


@dataclass(frozen=True)
class DatasetSpec:
    """A vendored dataset: where its raw splits live and how one raw row becomes example fields."""

    name: str
    kind: Literal["intent", "math"]
    licence: str
    source: str
    files: Mapping[str, str]  # raw split -> file under datasets/
    convert: Callable[[Row], Row]
    labels_file: str | None = None
    held_out: int = 0  # > 0: no test file; this many rows of the train file are carved off as test

    @property
    def raw_splits(self) -> tuple[str, ...]:
        return (*self.files, "test") if self.held_out else tuple(self.files)

    def task(self) -> Task:
        query, answer = FIELDS[self.kind]
        return Task(self.name, self.kind, (query,), answer, _labels(self.labels_file) if self.labels_file else None)


def number_text(value: Any) -> str:
    """'1,080' -> '1080', 51.0 -> '51', 3.5 -> '3.5': gold answers compare as plain number strings."""
    text = str(value).replace(",", "").strip()
    if re.fullmatch(r"-?\d+", text):
        return str(int(text))
    number = float(text)  # ValueError on anything that is not a number
    return str(int(number)) if number.is_integer() else repr(number)


def _gsm8k(row: Row) -> Row:
    rationale, sep, final = row["answer"].rpartition("####")
    if not sep:
        raise ValueError("no '#### <answer>' line")
    return {"question": row["question"], "answer": number_text(final), "rationale": rationale.strip()}


def _svamp(row: Row) -> Row:
    return {"id": row["ID"], "question": f"{row['Body'].strip()} {row['Question'].strip()}",
            "answer": number_text(row["Answer"]), "equation": row["Equation"].strip(), "type": row["Type"]}


def _banking77(row: Row) -> Row:
    return {"query": row["text"], "intent": row["category"]}


_GSM8K_SOURCE = "https://github.com/openai/grade-school-math"
DATASETS: Registry[DatasetSpec] = Registry("dataset", {spec.name: spec for spec in (
    DatasetSpec("banking77", "intent", "CC-BY-4.0", "https://github.com/PolyAI-LDN/task-specific-datasets",
                {"train": "banking77/train.csv", "test": "banking77/test.csv"}, _banking77,
                labels_file="banking77/categories.json"),
    DatasetSpec("gsm8k", "math", "MIT", _GSM8K_SOURCE,
                {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl"}, _gsm8k),
    DatasetSpec("gsm8k_socratic", "math", "MIT", _GSM8K_SOURCE,
                {"train": "gsm8k/train.jsonl", "test": "gsm8k/test_socratic.jsonl"}, _gsm8k),
    DatasetSpec("svamp", "math", "MIT", "https://github.com/arkilpatel/SVAMP",
                {"train": "svamp/SVAMP.json"}, _svamp, held_out=300),
)}, DataError)


def get_dataset(name: str) -> DatasetSpec:
    return DATASETS.get(name)


@lru_cache(maxsize=None)
def _labels(labels_file: str) -> tuple[str, ...]:
    return tuple(json.loads((DATA_DIR / labels_file).read_text(encoding="utf-8")))


def _hf_rows(path: Path, **kwargs: Any) -> list[Row]:
    builder = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}[path.suffix]
    return hf.load_dataset(builder, data_files=str(path), split="train", **kwargs).to_list()


def _file_rows(spec: DatasetSpec, split: str) -> list[Row]:
    path = DATA_DIR / spec.files[split]
    labels = spec.task().labels
    rows = []
    for n, raw in enumerate(_hf_rows(path), start=1):
        try:
            row = spec.convert(raw)
        except (KeyError, ValueError, AttributeError) as exc:
            raise DataError(f"{path}: row {n}: {exc}") from None
        if labels is not None and row[FIELDS[spec.kind][1]] not in labels:
            raise DataError(f"{path}: row {n}: label {row[FIELDS[spec.kind][1]]!r} is not in {spec.labels_file}")
        rows.append({"id": f"{path.parent.name}-{path.stem}-{n}", **row})
    return rows


@lru_cache(maxsize=None)
def _raw(name: str, split: str) -> tuple[Row, ...]:
    spec = get_dataset(name)
    if split not in spec.raw_splits:
        raise DataError(f"{name} has no raw split {split!r}; it has: {', '.join(spec.raw_splits)}")
    if not spec.held_out:
        return tuple(_file_rows(spec, split))
    rows = _file_rows(spec, "train")
    order = list(range(len(rows)))
    random.Random(SVAMP_CARVE_SEED).shuffle(order)
    cut = len(rows) - spec.held_out
    return tuple(rows[i] for i in sorted(order[cut:] if split == "test" else order[:cut]))


def _examples(rows: list[Row], task: Task) -> list[dspy.Example]:
    return [dspy.Example(**row).with_inputs(*task.input_fields) for row in rows]


def load_raw(name: str, split: str) -> list[dspy.Example]:
    """Every example of one raw split of a named dataset, in file order (for inspection and counts)."""
    return _examples(list(_raw(name, split)), get_dataset(name).task())


def _shuffled(rows: list[Row] | tuple[Row, ...], seed: int) -> list[Row]:
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    return rows


def _head_tail(pool: list[Row], head: int, tail: int) -> tuple[list[Row], list[Row]]:
    """First `head` and last `tail` of a shuffled pool: each part stays the same when the other's size changes."""
    return pool[:head], pool[len(pool) - tail:] if tail else []


def _check_size(asked: dict[str, int], available: int, where: str) -> None:
    total = sum(asked.values())
    if total > available:
        parts = " + ".join(f"{k} {v}" for k, v in asked.items())
        raise DataError(f"{where}: asked for {total} examples ({parts}) but only {available} are available; "
                        f"lower data.{'/data.'.join(asked)}")


def load_splits(cfg: DataConfig) -> Splits:
    """The run's train/dev/test examples, deterministic from cfg.seed, with no example in two splits."""
    if cfg.files():
        return _load_user(cfg)
    spec = get_dataset(cfg.dataset)
    task = spec.task()
    pool = _raw(spec.name, "train")
    _check_size({"train": cfg.train, "dev": cfg.dev}, len(pool), f"{spec.name} raw train split")
    train, dev = _head_tail(_shuffled(pool, cfg.seed), cfg.train, cfg.dev)
    tests = _raw(spec.name, "test")
    _check_size({"test": cfg.test}, len(tests), f"{spec.name} raw test split")
    test = _shuffled(tests, cfg.seed)[:cfg.test]
    return Splits(task, _examples(train, task), _examples(dev, task), _examples(test, task))


def split_source(cfg: DataConfig, split: str) -> str:
    """Where a split's rows were read from, for the record: a user's file (or hf:<dataset>) as resolved, or
    the vendored file of a named dataset (dev comes from its train file; a carved test from it too)."""
    if cfg.train_path and cfg.test_path:
        return cfg.test_path if split == "test" else cfg.train_path
    if cfg.files():
        return cfg.path or ""
    spec = get_dataset(cfg.dataset)
    raw = split if split in spec.files else "train"
    return str(DATA_DIR / spec.files[raw])


def data_digest(cfg: DataConfig) -> str:
    """The content hash of the files a DataConfig reads: changed data at the same path is other data.

    A Hub dataset is named by its spec and split alone (its content is not fetched to hash it)."""
    if cfg.path and cfg.path.startswith("hf:"):
        return f"{cfg.path}:{cfg.split or 'train'}"
    if cfg.files():
        files = [Path(f) for f in cfg.files()]
    else:
        spec = get_dataset(cfg.dataset)
        files = [DATA_DIR / f for f in (*spec.files.values(), *([spec.labels_file] if spec.labels_file else []))]
    digest = hashlib.sha256()
    for path in files:
        try:
            digest.update(path.read_bytes())
        except OSError as exc:
            raise DataError(f"cannot read {path}: {exc.strerror}") from None
    return digest.hexdigest()


def list_datasets() -> list[dict[str, Any]]:
    """The named datasets with their raw split sizes, for `chainopt datasets list`."""
    return [{"name": spec.name, "kind": spec.kind, "licence": spec.licence, "source": spec.source,
             "splits": {split: len(_raw(spec.name, split)) for split in spec.raw_splits},
             "labels": len(spec.task().labels or ()) or None}
            for spec in DATASETS.values()]


# ---- a user's own data ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Scan:
    """A text file checked record by record before Arrow reads it."""

    starts: list[int]  # first line number of each good record, in file order
    problems: list[tuple[int, str]]  # (line, problem) of each dropped record
    clean: str | None  # the header and good records alone, when some were dropped; None when nothing was
    columns: list[str]


def _kind_of(value: Any) -> str:
    return {bool: "boolean", int: "number", float: "number", str: "string", list: "list", dict: "object"}.get(
        type(value), "null")


def _scan_jsonl(data: bytes) -> _Scan:
    starts, problems, kept, columns = [], [], [], {}
    lines = data.splitlines(keepends=True)
    for n, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            # Arrow needs one type per column; report a clash here, with its line, instead of failing later.
            kinds = {key: _kind_of(value) for key, value in record.items()}
            for key, kind in kinds.items():
                first, where = columns.get(key, ("null", n))
                if kind not in (first, "null") and first != "null":
                    raise ValueError(f"field {key!r} is a {kind} here but a {first} on line {where}")
            columns.update({key: (kind, n) for key, kind in kinds.items() if columns.get(key, ("null",))[0] == "null"})
        except UnicodeDecodeError as exc:
            problems.append((n, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"))
        except json.JSONDecodeError as exc:
            problems.append((n, f"invalid JSON ({exc.msg} at column {exc.colno})"))
        except ValueError as exc:
            problems.append((n, str(exc)))
        else:
            starts.append(n)
            kept.append(raw.decode("utf-8"))
    clean = "".join(kept) if problems else None
    return _Scan(starts, problems, clean, list(columns))


def _scan_csv(data: bytes, source: str) -> _Scan:
    problems, numbered = [], []
    for n, raw in enumerate(data.splitlines(keepends=True), start=1):
        try:
            numbered.append((n, raw.decode("utf-8")))
        except UnicodeDecodeError as exc:
            problems.append((n, f"not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"))
    reader = csv.reader(text for _, text in numbered)
    try:
        header = next(reader, [])
        previous = reader.line_num
        starts, kept = [], [text for _, text in numbered[:previous]]
        for record in reader:
            first, previous = previous, reader.line_num
            if not record:
                continue
            if len(record) != len(header):
                problems.append((numbered[first][0], f"has {len(record)} fields but the header has {len(header)}"))
                continue
            starts.append(numbered[first][0])
            kept.extend(text for _, text in numbered[first:previous])
    except csv.Error as exc:
        raise DataError(f"{source}: line {numbered[max(reader.line_num, 1) - 1][0]}: invalid CSV ({exc})") from None
    problems.sort()
    return _Scan(starts, problems, "".join(kept) if problems else None, header)


def _text(value: Any) -> str:
    """Example fields are text, as in the named datasets; Arrow turns 72 into 72.0 when a column has 3.5."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return value if isinstance(value, str) else json.dumps(value)


def _label_list(value: Any) -> list[str]:
    """A multilabel answer as a list of distinct labels in order: a list as is, a CSV cell holding a JSON
    list read as one, any other text as a single label."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = json.loads(value)
        except ValueError:
            pass
    values = value if isinstance(value, list) else [value]
    return list(dict.fromkeys(_text(v).strip() for v in values if v is not None and _text(v).strip()))


def _read_file(path: Path, skip: bool) -> tuple[list[Row], list[str], int]:
    """Rows of a local .jsonl/.csv/.parquet file with a position label each, and the count of dropped records."""
    if path.suffix not in (".jsonl", ".csv", ".parquet"):
        raise DataError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl, .csv or .parquet")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: cannot read ({exc.strerror})") from None
    if not data.strip():
        raise DataError(f"{path}: file is empty")
    if path.suffix == ".parquet":
        rows = _read_table(path, path)
        return rows, [f"row {n}" for n in range(1, len(rows) + 1)], 0
    scan = _scan_jsonl(data) if path.suffix == ".jsonl" else _scan_csv(data, str(path))
    if scan.problems and not skip:
        line, problem = scan.problems[0]
        more = f" (and {len(scan.problems) - 1} more malformed)" if len(scan.problems) > 1 else ""
        raise DataError(f"{path}: line {line}: {problem}{more}; fix it or set data.skip_malformed = true")
    if not scan.starts:
        raise DataError(f"{path}: no data rows")
    kwargs: dict[str, Any] = {}
    if path.suffix == ".csv":  # keep cells as written: no number parsing, no "NA" -> missing
        kwargs = {"features": hf.Features({c: hf.Value("string") for c in scan.columns}), "keep_default_na": False}
    rows = _read_table(path, path, **kwargs) if scan.clean is None else _read_clean(path, scan.clean, **kwargs)
    if len(rows) != len(scan.starts):
        raise DataError(f"{path}: read {len(rows)} rows but found {len(scan.starts)} records; check its quoting")
    return rows, [f"line {n}" for n in scan.starts], len(scan.problems)


def _read_clean(path: Path, text: str, **kwargs: Any) -> list[Row]:
    """Read the good records alone: Arrow cannot skip a malformed line itself."""
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / path.name
        clean.write_text(text, encoding="utf-8")
        return _read_table(clean, path, cache_dir=tmp, **kwargs)


def _read_table(path: Path, shown: Path, **kwargs: Any) -> list[Row]:
    """Read a user's file (or its clean copy), naming the user's file if Arrow or pandas reject it."""
    try:
        return _hf_rows(path, **kwargs)
    except Exception as exc:  # noqa: BLE001 -- whatever Arrow/pandas reject in a user's file is a data error
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{shown}: cannot be read as a table ({reason})") from None


def _read_hub(spec: str, split: str) -> list[Row]:
    name = spec.removeprefix("hf:")
    try:
        return hf.load_dataset(name, split=split).to_list()
    except ConnectionError:
        raise DataError(f"{spec}: cannot reach the Hugging Face Hub (offline); download it and set data.path "
                        f"to a local .jsonl/.csv/.parquet file") from None
    except DatasetNotFoundError:
        raise DataError(f"{spec}: no such dataset on the Hugging Face Hub") from None
    except ValueError as exc:  # e.g. an unknown split
        raise DataError(f"{spec}: {str(exc).splitlines()[0]}") from None


def _read_source(source: str, cfg: DataConfig) -> tuple[list[Row], list[str], int, str]:
    """One user source (a local file or hf:<dataset>): its rows, a position label each, the count of dropped
    records, and its name (the default id prefix)."""
    if source.startswith("hf:"):
        rows = _read_hub(source, cfg.split or "train")
        if not rows:
            raise DataError(f"{source}: split {cfg.split or 'train'!r} is empty")
        return rows, [f"row {n}" for n in range(1, len(rows) + 1)], 0, source.removeprefix("hf:")
    rows, positions, skipped = _read_file(Path(source), cfg.skip_malformed)
    return rows, positions, skipped, Path(source).stem


def _records(source: str, cfg: DataConfig) -> tuple[list[tuple[str, Row]], int, str]:
    """The example fields of each usable row of one source with its split_column value ("" without one),
    the count of skipped rows and the source's name."""
    input_name, answer_name = FIELDS[cfg.task]
    inputs = dict(cfg.inputs or {input_name: input_name})
    answer_column = cfg.answer or answer_name
    rows, positions, skipped, name = _read_source(source, cfg)

    required = list(dict.fromkeys((*inputs.values(), answer_column, *([cfg.split_column] if cfg.split_column else []))))
    present = set().union(*(row.keys() for row in rows))
    missing = [column for column in required if column not in present]
    if missing:  # every wrong mapping at once, one per line
        raise DataError("\n".join(f"{source}: no column {column!r}{did_you_mean(column, sorted(present))}; "
                                   f"columns: {', '.join(sorted(present))}" for column in missing))
    listed = [where for where, row in zip(positions, rows) if isinstance(row.get(answer_column), list)]
    if cfg.task == "intent" and listed:  # each list would otherwise become one label, its JSON text
        raise DataError(f"{source}: column {answer_column!r} holds lists ({len(listed)} rows, first at {listed[0]}), "
                        f"but an intent task takes one label per row; for a set of labels per row set "
                        f'data.task = "multilabel", or set data.answer to a column of single labels')
    multilabel = cfg.task == "multilabel"

    records, seen = [], {}
    for where, row in zip(positions, rows):
        empty = [c for c in required if row.get(c) is None or not _text(row[c]).strip()
                 or (multilabel and c == answer_column and not _label_list(row[c]))]
        problem = f"field {empty[0]!r} is missing or empty" if empty else None
        ident = _text(row["id"]) if "id" in present and row.get("id") is not None else f"{name}-{where.split()[-1]}"
        if problem is None and ident in seen:
            problem = f"duplicate id {ident!r} (first at {seen[ident]})"
        if problem:
            if not cfg.skip_malformed:
                raise DataError(f"{source}: {where}: {problem}; fix it or set data.skip_malformed = true")
            skipped += 1
            continue
        seen[ident] = where
        records.append((_text(row[cfg.split_column]) if cfg.split_column else "",
                        {"id": ident, **{k: _text(row[c]) for k, c in inputs.items()},
                         answer_name: _label_list(row[answer_column]) if multilabel else _text(row[answer_column])}))
    if not records:
        raise DataError(f"{source}: no usable rows ({skipped} malformed skipped)")
    return records, skipped, name


def _by_split_value(records: list[tuple[str, Row]], cfg: DataConfig) -> dict[str, list[Row]]:
    """Rows sorted into train/dev/test by their split_column value; a value no split takes is an error."""
    splits = {cfg.split_value(split): split for split in ("train", "dev", "test")}
    found = sorted({value for value, _ in records})
    unknown = [value for value in found if value not in splits]
    if unknown:
        wanted = ", ".join(f"{split} = {value!r}" for value, split in splits.items())
        raise DataError(f"{cfg.path}: column {cfg.split_column!r} has value {unknown[0]!r}, which no split takes "
                        f"(data.split_values: {wanted}); values found: {', '.join(map(repr, found))}")
    parts: dict[str, list[Row]] = {"train": [], "dev": [], "test": []}
    for value, record in records:
        parts[splits[value]].append(record)
    return parts


def detect_task(cfg: DataConfig) -> DataConfig:
    """`cfg` with data.task = "multilabel" when it names none and its answer column (data.answer, else
    `intents`) holds lists; DataError when it names none and the data does not say."""
    if cfg.task is not None:
        return cfg
    column = cfg.answer or FIELDS["multilabel"][1]
    rows = _read_source(cfg.path or cfg.train_path or "", cfg)[0]
    if any(isinstance(row.get(column), list) for row in rows):
        return cfg.model_copy(update={"task": "multilabel"})
    raise DataError(f"data.path needs data.task: one of {', '.join(FIELDS)} (multilabel is found by itself "
                    f"when the answer column holds lists)")


def _load_user(cfg: DataConfig) -> Splits:
    cfg = detect_task(cfg)
    parts: dict[str, list[Row]] | None = None  # the user's own splits, when there are some
    if cfg.train_path and cfg.test_path:  # separate files; dev is carved from train
        (train_rows, train_skipped, name), (test_rows, test_skipped, _) = (_records(cfg.train_path, cfg),
                                                                            _records(cfg.test_path, cfg))
        parts = {"train": [r for _, r in train_rows], "dev": [], "test": [r for _, r in test_rows]}
        skipped, where = train_skipped + test_skipped, {"train": cfg.train_path, "test": cfg.test_path}
    else:
        records, skipped, name = _records(cfg.path or "", cfg)
        if cfg.split_column:
            parts = _by_split_value(records, cfg)
            where = {split: f"{cfg.path}: rows with {cfg.split_column} = {cfg.split_value(split)!r}"
                     for split in ("train", "dev", "test")}
    rows = [r for _, r in records] if parts is None else [r for part in parts.values() for r in part]

    answer_name = FIELDS[cfg.task][1]
    labels = None
    if cfg.task in LABELLED:  # the union of the answers: a multilabel answer is a list of them
        labels = tuple(sorted({label for r in rows for label in
                               (r[answer_name] if cfg.task == "multilabel" else [r[answer_name]])}))
    task = Task(name, cfg.task, tuple(cfg.inputs or (FIELDS[cfg.task][0],)), answer_name, labels)
    if parts is None:  # one pool: test is carved off first, then train and dev, all by the seed
        _check_size({"train": cfg.train, "dev": cfg.dev, "test": cfg.test}, len(rows), cfg.path or "")
        rest, test = _head_tail(_shuffled(rows, cfg.seed), len(rows) - cfg.test, cfg.test)
        train, dev = _head_tail(rest, cfg.train, cfg.dev)
    else:  # the user's splits, each shuffled by the seed and cut to its size; dev from train when it has none
        _check_size({"test": cfg.test}, len(parts["test"]), where["test"])
        test = _shuffled(parts["test"], cfg.seed)[:cfg.test]
        if parts["dev"]:
            _check_size({"train": cfg.train}, len(parts["train"]), where["train"])
            _check_size({"dev": cfg.dev}, len(parts["dev"]), where["dev"])
            train, dev = _shuffled(parts["train"], cfg.seed)[:cfg.train], _shuffled(parts["dev"], cfg.seed)[:cfg.dev]
        else:
            _check_size({"train": cfg.train, "dev": cfg.dev}, len(parts["train"]), where["train"])
            train, dev = _head_tail(_shuffled(parts["train"], cfg.seed), cfg.train, cfg.dev)
    return Splits(task, _examples(train, task), _examples(dev, task), _examples(test, task), skipped)
