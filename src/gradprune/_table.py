"""Plain-text tables for reports (no dependencies)."""

from __future__ import annotations

from typing import Sequence

__all__ = ["format_table"]


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, tuple):
        return "x".join(map(str, v))
    return "" if v is None else str(v)


def format_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """Left-aligned text table of ``rows`` (dicts) over ``columns``."""
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) for c, w in zip(columns, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(out)
