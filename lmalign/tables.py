"""Text tables, the one way lmalign lays them out: aligned columns for the terminal, Markdown
for files (summary.md, comparison.md)."""

from __future__ import annotations

from collections.abc import Sequence


def aligned(rows: Sequence[Sequence[str]], indent: str = "", gap: str = "  ") -> list[str]:
    """Columns padded to their widest cell; the last column is not padded."""
    columns = max(len(row) for row in rows)
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(columns - 1)]
    return [indent + gap.join([cell.ljust(width) for cell, width in zip(row, widths)]
                              + list(row[len(widths):])) for row in rows]


def markdown(rows: Sequence[Sequence[str]], padded: bool = False) -> list[str]:
    """A Markdown table: the first row is the header. Padded: every column as wide as its
    widest cell, so the file reads as a table too."""
    lines = [list(rows[0]), ["---"] * len(rows[0]), *[list(row) for row in rows[1:]]]
    if padded:
        widths = [max(len(line[i]) for line in lines) for i in range(len(rows[0]))]
        lines = [[cell.ljust(width) for cell, width in zip(line, widths)] for line in lines]
    return ["| " + " | ".join(line) + " |" for line in lines]
