"""The one text-table renderer of the front (the CLI's results, `datasets/models/programs list`, the bench):
rich lays the columns out; here only how a value reads in a cell."""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

from rich import box
from rich.console import Console
from rich.table import Table


def fmt(value: Any, digits: int = 3) -> str:
    """A cell: '-' for nothing, 'inf' for infinity, floats to `digits` significant digits, the rest as str."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned plain text (no colour, no wrapping: it goes to pipes and files as often as to terminals)."""
    grid = Table(*headers, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="")
    for row in rows:
        grid.add_row(*(fmt(cell) for cell in row))
    buffer = io.StringIO()
    Console(file=buffer, width=100_000, color_system=None, highlight=False, emoji=False, markup=False).print(grid)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines() if line.strip()).strip("\n")
