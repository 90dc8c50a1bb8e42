"""Things chosen by name (models, datasets, programs, optimizers): one registry type, one did-you-mean.

A miss is the user's typo far more often than anything else, so it is answered with the closest names
and the full list, in one line, as the error type of the layer that owns the registry.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar

from optimize.errors import ChainoptError, ConfigError

T = TypeVar("T")


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice to `name`, or '' when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class Registry(Mapping[str, T], Generic[T]):
    """Entries by name, kept in the order given; `get` of an unknown name raises `error` with a hint."""

    def __init__(self, kind: str, entries: Mapping[str, T], error: type[ChainoptError] = ConfigError):
        self.kind, self._entries, self._error = kind, dict(entries), error

    def __getitem__(self, name: str) -> T:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str) -> T:  # type: ignore[override]  (a miss is an error, not None)
        if name in self._entries:
            return self._entries[name]
        raise self._error(f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}; "
                          f"available: {', '.join(self._entries)}")
