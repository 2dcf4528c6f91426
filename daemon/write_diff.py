"""How ``set``, ``unset`` and ``rollback`` show a change to etcd: a table of each key's old
and new value, or the same as JSON, with secret values masked.

Apart from the write itself (cmd_etcd.py), which decides what changes: the marks of a
key absent before, unreadable or deleted, and the values JSON cannot carry, are rules of
the output alone, the same for a dry run and for a write.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from hotknob.config.secrecy import shown_value
from hotknob.config.sendable import non_finite

from .table import dumps, fmt, render


def shown_diff(
    diff: Mapping[str, tuple[Any, Any]], secrets: frozenset[str]
) -> dict[str, tuple[Any, Any]]:
    """``diff`` as it may be shown: the values of secret keys (``hides``) masked."""
    return {
        k: (shown_value(k, o, secrets), shown_value(k, n, secrets)) for k, (o, n) in diff.items()
    }


def print_diff(
    diff: Mapping[str, tuple[Any, Any]],
    as_json: bool,
    header: str,
    secrets: frozenset[str],
    existed: Collection[str],
    deleted: Collection[str],
    unreadable: Collection[str] = (),
) -> None:
    """The change as a table (or JSON): a key not in etcd before shows ``-`` as its old
    value, one whose etcd value cannot be read (``_unreadable`` in cmd_etcd.py)
    ``(unreadable)``, a key deleted ``(deleted)`` as its new one; ``null`` is a value like
    any other (None alone could not tell a key set to null from one deleted)."""
    diff = shown_diff(diff, secrets)
    if as_json:
        print(
            dumps(
                {
                    k: {
                        "old": _json_value(o),
                        "new": _json_value(n),
                        "existed": k in existed or k in unreadable,
                        "deleted": k in deleted,
                    }
                    for k, (o, n) in diff.items()
                }
            )
        )
        return
    print(header)
    if not diff:
        print("(no change)")
        return
    print(
        render(
            ["KEY", "OLD", "NEW"],
            [
                [
                    k,
                    fmt(o) if k in existed else "(unreadable)" if k in unreadable else "-",
                    "(deleted)" if k in deleted else fmt(n),
                ]
                for k, (o, n) in diff.items()
            ],
        )
    )


def _json_value(value: Any) -> Any:
    """``value`` as ``--json`` can print it: an etcd value that reads as a number too large
    for a float (``1e999``, put with etcdctl; never in force) as its text, ``Infinity``,
    in a string: as a number it would make the output no JSON at all."""
    return fmt(value) if non_finite({"": value}) else value
