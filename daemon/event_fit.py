"""A ``watch`` event that is over a protocol line, cut to the keys that fit in one.

The server (``socket_server``) sends each event to the ``watch`` clients as one line;
an event that names every key of a large change can be longer than
``protocol.MAX_LINE_BYTES``, and a line that long cannot be sent. Rather than drop it
(the watchers would not hear of the change at all), ``fitted_event`` lists as many keys
as fit and counts the others, as a rejection's event counts the keys it does not list.
It is apart from the server because it is only about an event's fields and the
protocol's line limit: it knows nothing of connections, and runs only when an event is
too long, never on a change's way to the processes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hotknob.model_runtime import protocol

_KEYED_EVENT_FIELDS = ("changed", "new", "old")
"""An event's fields that map dotted keys to values: as many keys as a change touched."""


def fitted_event(event: Mapping[str, Any]) -> bytes | None:
    """``event`` as one line within ``protocol.MAX_LINE_BYTES``, its keyed fields cut to the
    keys whose entries fit (in the order the event gives them) and the keys left out
    counted in ``unlisted.keys``, as a rejection's event counts those it does not list;
    None if it has no such field or what is left does not fit either. A change of a few
    thousand keys with long dotted names, or of two large mappings, makes ``changed`` and
    ``old`` over a line: dropped, ``watch`` clients would not hear of the change at all."""
    fields = [name for name in _KEYED_EVENT_FIELDS if isinstance(event.get(name), Mapping)]
    if not fields:
        return None
    keys = list(dict.fromkeys(key for name in fields for key in event[name]))
    unlisted = dict(event.get("unlisted") or {})
    before = unlisted.get("keys", 0) if isinstance(unlisted.get("keys"), int) else 0
    bare = {**event, **{name: {} for name in fields}, "type": protocol.EVENT}
    try:  # with the largest count it may carry: its digits are part of the line
        used = len(protocol.encode({**bare, "unlisted": {**unlisted, "keys": before + len(keys)}}))
    except protocol.ProtocolError:
        return None
    kept = 0
    for key in keys:
        try:  # each entry as it is written inside its field, with a comma
            used += sum(
                len(protocol.encode({key: event[name][key]})) - 2
                for name in fields
                if key in event[name]
            )
        except protocol.ProtocolError:
            break
        if used > protocol.MAX_LINE_BYTES:
            break
        kept += 1
    listed = set(keys[:kept])
    cut_event = {name: {k: v for k, v in event[name].items() if k in listed} for name in fields}
    unlisted["keys"] = before + len(keys) - kept
    try:
        return protocol.encode({**bare, **cut_event, "unlisted": unlisted})
    except protocol.ProtocolError:
        return None
