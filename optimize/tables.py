"""The one text-table renderer of the front (the CLI's results, `datasets/models/programs list`, the bench),
and the one number format (also the HTML report's): rich lays the columns out; here only how a value reads."""

from __future__ import annotations

import io
import math
from typing import Any, Sequence

from rich import box
from rich.console import Console
from rich.table import Table


def number(value: float | None, digits: int = 3, infinite: str = "inf") -> str:
    """One rule for every number chainopt shows (terminal and HTML report), so that 1,631 never sits beside
    1.43e+03: whole values in full with thousands separators, the others to `digits` significant digits,
    never in e-notation; `infinite` names +inf (the report says "never" for a break-even)."""
    if value is None or math.isnan(value):
        return "-"
    if math.isinf(value):
        return infinite if value > 0 else f"-{infinite}"
    if float(value).is_integer():
        return f"{int(value):,}"
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    text = f"{value:,.{decimals}f}"
    return text.rstrip("0").rstrip(".") if decimals else text


def fmt(value: Any) -> str:
    """A cell: '-' for nothing, numbers by `number`, the rest as str."""
    if isinstance(value, bool) or not isinstance(value, (int, float, type(None))):
        return str(value)
    return number(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Aligned plain text (no colour, no wrapping: it goes to pipes and files as often as to terminals)."""
    grid = Table(*headers, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="")
    for row in rows:
        grid.add_row(*(fmt(cell) for cell in row))
    buffer = io.StringIO()
    Console(file=buffer, width=100_000, color_system=None, highlight=False, emoji=False, markup=False).print(grid)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines() if line.strip()).strip("\n")
