"""Markdown for reports and model cards: one table, and one way to write a figure with its 95% interval."""

from __future__ import annotations

from collections.abc import Sequence

MISSING = "–"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1,
                   text_columns: Sequence[int] = ()) -> list[str]:
    """A Markdown table; columns from `numeric_from` on are right-aligned, except the `text_columns`."""
    align = ["---" if i < numeric_from or i in text_columns else "---:" for i in range(len(header))]
    return [f"| {' | '.join(header)} |", f"|{'|'.join(align)}|", *(f"| {' | '.join(row)} |" for row in rows)]


def interval_text(bounds: Sequence[float] | None, spec: str = ".1f", signed: bool = False) -> str:
    """`[25.0, 37.7]` (`[-8.0, +3.5]` signed); a dash without bounds."""
    if not bounds:
        return MISSING
    spec = f"+{spec}" if signed else spec
    return f"[{bounds[0]:{spec}}, {bounds[1]:{spec}}]"


def with_interval(value: float | None, bounds: Sequence[float] | None = None, spec: str = ".1f",
                  signed: bool = False) -> str:
    """`31.0 [25.0, 37.7]`: a figure and its interval; the figure alone without bounds, a dash without a figure."""
    if value is None:
        return MISSING
    text = f"{value:{f'+{spec}' if signed else spec}}"
    return f"{text} {interval_text(bounds, spec, signed)}" if bounds else text
