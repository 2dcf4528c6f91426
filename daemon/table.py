"""Plain-text tables and value formatting for people; scripts use ``--json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


def fmt(value: Any) -> str:
    """A value as JSON text, the same form a user types into ``set``."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def render(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False)
