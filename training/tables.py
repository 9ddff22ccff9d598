"""Tables as data: what evaluation and the studies report, rendered by the CLI with rich."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from rich.table import Table as RichTable

Justify = Literal["left", "center", "right"]


@dataclass(frozen=True)
class Value:
    """A number with its error, written ``value ± error`` in the format ``spec``.

    An infinite value reads ``∞``, an undefined error is left out; ``best`` is shown in bold.
    """

    value: float
    error: float | None = None
    spec: str = ".4f"
    best: bool = False

    def __str__(self) -> str:
        if math.isinf(self.value):
            return "∞"
        text = f"{self.value:{self.spec}}"
        if self.error is None or not math.isfinite(self.error):
            return text
        return f"{text} ± {self.error:{self.spec.lstrip('+')}}"


Cell = str | Value | None
"""Text, a value with its error, or nothing (shown as ``–``)."""


@dataclass(frozen=True)
class Column:
    header: str
    justify: Justify = "center"
    no_wrap: bool = False


@dataclass
class Table:
    """Title, column headers, rows of cells and notes below."""

    title: str
    columns: list[Column]
    rows: list[list[Cell]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    compact: bool = False
    """Only a rule under the headers, no frame."""
    min_width: int | None = None
    """Columns the table needs unwrapped; a narrower console should widen to it."""

    def add_row(self, *cells: Cell) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"a row of {len(cells)} cells in a table of {len(self.columns)}")
        self.rows.append(list(cells))

    @property
    def headers(self) -> list[str]:
        return [column.header for column in self.columns]


def best_of(values: Sequence[Value | None]) -> list[Value | None]:
    """``values`` with the largest one marked best."""
    present = [v for v in values if v is not None]
    if not present:
        return list(values)
    best = max(present, key=lambda v: v.value)
    return [v if v is not best else Value(v.value, v.error, v.spec, best=True) for v in values]


def to_rich(table: Table) -> RichTable:
    """The table as a rich table (rich is imported here, where it is used)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table as RichTable

    framing = {"box": box.SIMPLE_HEAD, "pad_edge": False, "show_edge": False}
    rendered = RichTable(
        title=table.title,
        caption="\n".join(table.notes) or None,
        **(framing if table.compact else {}),  # type: ignore[arg-type]
    )
    for column in table.columns:
        rendered.add_column(column.header, justify=column.justify, no_wrap=column.no_wrap)
    for row in table.rows:
        cells = []
        for cell in row:
            text = "–" if cell is None else escape(str(cell))
            cells.append(f"[bold]{text}[/]" if isinstance(cell, Value) and cell.best else text)
        rendered.add_row(*cells)
    return rendered
