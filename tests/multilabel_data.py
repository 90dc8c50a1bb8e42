"""A multi-label JSONL file made from Banking77: two requests of different intents joined into one text
(labels: both intents), and some single requests (labels: one intent). Training rows come from
Banking77's train split and test rows from its test split, marked in a `split` column, so that no request
is in both. Used by tests/test_multilabel.py and for the README's measurement:

    python tests/multilabel_data.py banking77_multilabel.jsonl --train 2000 --test 100
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

BANKING77 = Path(__file__).resolve().parents[1] / "datasets" / "banking77"
SINGLE_SHARE = 0.25  # the share of rows that hold one request only


def _requests(split: str) -> list[tuple[str, str]]:
    with (BANKING77 / f"{split}.csv").open(encoding="utf-8") as handle:
        return [(row["text"].strip(), row["category"]) for row in csv.DictReader(handle)]


def rows(split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` rows of one Banking77 split; every request is used at most once."""
    pool = _requests(split)
    random.Random(seed).shuffle(pool)
    out, singles = [], round(n * SINGLE_SHARE)
    while len(out) < n:
        first = pool.pop()
        if len(out) < singles:
            text, labels = first[0], [first[1]]
        else:
            second = next(r for r in reversed(pool) if r[1] != first[1])
            pool.remove(second)
            text, labels = f"{first[0]} Also, {second[0][:1].lower()}{second[0][1:]}", [first[1], second[1]]
        out.append({"id": f"{split}-{len(out) + 1}", "text": text, "intents": labels, "split": split})
    random.Random(seed + 1).shuffle(out)
    return out


def write(path: Path, train: int, test: int, seed: int = 0) -> Path:
    """Write `train` rows from Banking77's train split and `test` from its test split to a JSONL file."""
    with Path(path).open("w", encoding="utf-8") as handle:
        for row in rows("train", train, seed) + rows("test", test, seed):
            handle.write(json.dumps(row) + "\n")
    return Path(path)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(write(args.out, args.train, args.test, args.seed))
