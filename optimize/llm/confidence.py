"""How sure the model was of a choice it decoded: the chosen label's probability and its margin.

A choice field (the answer's last field, a `Literal` or narrowed choices: `types.final_choice`) is decoded
under its grammar, greedily. At every step that still decides between labels (at least two choices fit
what was decoded of the value, the step before its opening quote included), the backend hands the step's
logits to a `ChoiceTracker`. The tracker looks only at the tokens that continue the value towards one of the
fitting choices (looked up by their text in the model's vocabulary, never a scan of it), and at the end:

  probability  the product, over the deciding steps, of the decoded token's probability among those tokens
               (softmax over their logits; a token that continues every fitting choice alike, such as a
               space before the quote, decides nothing and is left out). Tokens after the value settled
               (one choice left) are forced by the grammar and count 1.
  margin       probability minus that of the best branch not taken: at each deciding step, the probability
               of the path so far times that of the best token leading away from the chosen label.

The batched and the sequential backend feed the tracker the same logits (they decode the same tokens with
bit-equal logits), so both report the same confidence; it is rounded to 6 decimals.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field

import numpy as np

WHITESPACE = " \t\n"


def vocabulary(llama) -> dict[str, tuple[int, ...]]:
    """Each token's text -> the token ids that spell it (built once per model, ~0.2 s per 50k tokens)."""
    key = id(llama._model)
    with _vocab_lock:
        found = _vocabularies.get(key)
        if found is None:
            table: dict[str, list[int]] = {}
            model = llama._model
            for token in range(llama.n_vocab()):
                try:
                    piece = model.token_to_piece(token, special=False).rstrip(b"\x00").decode("utf-8")
                except UnicodeDecodeError:
                    continue  # a part of a multi-byte character: never a (plain ASCII) choice's text
                if piece:
                    table.setdefault(piece, []).append(token)
            found = _vocabularies[key] = {piece: tuple(ids) for piece, ids in table.items()}
        return found


_vocabularies: dict[int, dict[str, tuple[int, ...]]] = {}
_vocab_lock = threading.Lock()


@dataclass
class _Step:
    n_output: int  # tokens decoded before this step: the one decoded here is output[n_output]
    ids: np.ndarray
    probs: np.ndarray
    sets: list[frozenset[str]]  # the choices each token keeps possible


@dataclass
class ChoiceTracker:
    """Gathers the deciding steps of one call's choice field; `result` says how sure the model was."""

    pieces: dict[str, tuple[int, ...]]
    field: str
    choices: tuple[str, ...]
    steps: list[_Step] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._at = re.compile(rf'(?<!\\)"{re.escape(self.field)}"\s*:[ \t\n]*("[^"\\]*)?$')
        self._value = re.compile(rf'(?<!\\)"{re.escape(self.field)}"\s*:\s*"([^"\\]*)"')

    def position(self, text: str) -> str | None:
        """What was decoded of the value so far, with its opening quote ("" before the quote); None outside it."""
        match = self._at.search(text)
        return None if match is None else (match.group(1) or "")

    def step(self, text: str, logits: np.ndarray, n_output: int) -> None:
        """Before a token is chosen: `text` decoded so far, `logits` of the next token."""
        decoded = self.position(text)
        if decoded is None:
            return
        fitting = [c for c in self.choices if ('"' + c).startswith(decoded)]
        if len(fitting) < 2:
            return
        targets = {c: '"' + c + '"}' for c in fitting}
        found: dict[int, frozenset[str]] = {}
        for choice, target in targets.items():
            rest = target[len(decoded):]
            for end in range(1, len(rest) + 1):
                texts = [rest[:end]] + ([w + rest[:end] for w in WHITESPACE] if not decoded else [])
                for piece in texts:
                    for token in self.pieces.get(piece, ()):
                        if token not in found:
                            spelled = decoded + piece.lstrip(WHITESPACE) if not decoded else decoded + piece
                            found[token] = frozenset(c for c, t in targets.items() if t.startswith(spelled))
        everyone = frozenset(fitting)
        deciding = {token: kept for token, kept in found.items() if kept and kept != everyone}
        if len(deciding) < 1:
            return
        ids = np.fromiter(deciding, dtype=np.int64)
        chosen = np.asarray(logits[ids], dtype=np.float64)
        probs = np.exp(chosen - chosen.max())
        self.steps.append(_Step(n_output, ids, probs / probs.sum(), list(deciding.values())))

    def result(self, output: list[int], text: str) -> dict | None:
        """The confidence of the label `text` holds, given the tokens decoded; None when no step decided it."""
        values = self._value.findall(text)
        if not values or values[-1] not in self.choices:
            return None
        label = values[-1]
        probability, best_other, counted = 1.0, 0.0, 0
        for step in self.steps:
            if step.n_output >= len(output):
                continue
            where = np.flatnonzero(step.ids == output[step.n_output])
            if where.size == 0 or label not in step.sets[where[0]]:
                continue  # a token that decided nothing (or one the lookup does not know)
            j = int(where[0])
            same = sum(float(p) for k, p in enumerate(step.probs) if k != j and step.sets[k] == {label})
            other = max((float(p) for k, p in enumerate(step.probs) if label not in step.sets[k]), default=0.0)
            best_other = max(best_other, probability * other)
            probability *= float(step.probs[j]) + same
            counted += 1
        if not counted:
            return None
        return {"field": self.field, "label": label, "probability": round(probability, 6),
                "margin": round(probability - best_other, 6), "steps": counted}
