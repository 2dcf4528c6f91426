"""Plain-text tables and value formatting for people; scripts use ``--json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from pydantic_core import to_jsonable_python


def _plain(value: Any) -> Any:
    """A value that is not JSON already (a date a YAML or TOML file said), in JSON form; what
    has none is shown as text. Raw layer values reach ``explain`` unvalidated."""
    try:
        return to_jsonable_python(value)
    except (ValueError, TypeError):
        return str(value)


def fmt(value: Any) -> str:
    """A value as JSON text, the same form a user types into ``set``."""
    if not isinstance(value, str | int | float | bool | list | dict | None):
        value = _plain(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), default=_plain)


# Control characters in a cell (a client's name, a value from etcd) would break a row or the
# terminal: each is shown escaped, as Python writes it in a string literal.
_ESCAPES = {
    **{i: f"\\x{i:02x}" for i in [*range(0x20), 0x7F]},
    ord("\n"): "\\n",
    ord("\r"): "\\r",
    ord("\t"): "\\t",
}


def age_text(seconds: float) -> str:
    """How long ago, to the unit that matters: ``7.1s``, ``5m06s``, ``3h04m``, ``2d03h``.
    An entry from a host whose clock is ahead is ``0.0s``, not a negative age."""
    if seconds < 59.95:  # what rounds to 60.0 is a minute
        return f"{max(0.0, seconds):.1f}s"
    whole = round(seconds)
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ``...`` marking the cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table, columns aligned; control characters in cells escaped."""
    body = [[str(c).translate(_ESCAPES) for c in row] for row in rows]
    cells = [[str(h) for h in headers], *body]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    return "\n".join(lines)


def dumps(data: Any) -> str:
    return json.dumps(data, indent=2, sort_keys=False, default=_plain)
