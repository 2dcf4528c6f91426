"""The hotknob socket protocol, version 1: one definition for both ends.

Stdlib only: the daemon imports this module and nothing else of the runtime,
and the runtime imports it without pulling torch or any daemon dependency.

Framing: a Unix stream socket carrying JSON objects, one per line, UTF-8,
each line at most ``MAX_LINE_BYTES`` including its newline. Messages:

======================  =========================================================
client -> daemon        ``{"type":"hello","protocol":1,"client":"trainer-0","pid":123}``
daemon -> client        ``{"type":"snapshot","version":7,"revision":1234,
                        "values":{...},"sources":{"train.lr":"etcd",...}}``
daemon -> client        ``{"type":"update","version":8,"revision":1240,
                        "changed":{"train.lr":0.0001},"values":{...}}``
client -> daemon        ``{"type":"applied","version":8,"step":1200}``
client -> daemon        ``{"type":"metrics","step":1200,"latest":{...},"window":{...}}``
daemon -> client        ``{"type":"event",...}`` (only to ``watch`` subscribers)
either                  ``{"type":"error","error":"..."}``
======================  =========================================================

A malformed message is answered with ``error`` and that connection alone is
closed. Receivers ignore fields they do not know, so fields can be added
without a protocol bump.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

# Where the socket is, and what app names it may have (``socket_address``): importable from
# here too, since the daemon imports nothing of the runtime but this module.
from .socket_address import APP_NAME as APP_NAME
from .socket_address import APP_NAME_RULE as APP_NAME_RULE
from .socket_address import default_socket_path as default_socket_path
from .socket_address import socket_path_problem as socket_path_problem

PROTOCOL_VERSION: Final = 1
MAX_LINE_BYTES: Final = 1024 * 1024
MAX_INT: Final = 2**63 - 1
"""The largest version, revision, step or pid a message may carry (etcd's revisions and
torch's tensors that carry them between ranks are 64-bit)."""

HELLO: Final = "hello"
SNAPSHOT: Final = "snapshot"
UPDATE: Final = "update"
APPLIED: Final = "applied"
METRICS: Final = "metrics"
EVENT: Final = "event"
ERROR: Final = "error"

CLIENT_TYPES: Final = frozenset({HELLO, APPLIED, METRICS})
DAEMON_TYPES: Final = frozenset({SNAPSHOT, UPDATE, EVENT, ERROR})


class ProtocolError(ValueError):
    """A line that is not a valid protocol-1 message; the text says why."""


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"{name} is not a valid JSON number")


# Made once: ``json.dumps`` and ``json.loads`` build a new encoder or decoder on every
# call that passes options. Both are stateless between calls, so threads may share them.
_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False)
_DECODER = json.JSONDecoder(parse_constant=_reject_constant)
# What a decoded line is written back as to check that it is text (``_require_text``): it
# may hold the infinity a number too large for a float reads as.
_TEXT_CHECK = json.JSONEncoder(ensure_ascii=False, check_circular=False)
# The escape of a surrogate (``\ud800`` to ``\udfff``): in a pair, one character beyond
# the first 65,536; alone, no character at all.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
LONE_SURROGATE: Final = (
    'line is not valid text (a lone surrogate: an escape from "\\ud800" to "\\udfff" not in a pair)'
)


def encode(message: Mapping[str, Any]) -> bytes:
    """One message as a newline-terminated UTF-8 JSON line.

    Raises ``ProtocolError`` if the line would exceed ``MAX_LINE_BYTES`` or
    the message holds a value JSON cannot carry (NaN and infinities included) or
    text UTF-8 cannot (a lone surrogate, which JSON text itself allows).
    """
    try:
        text = _ENCODER.encode(message)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"cannot encode message: {exc}") from exc
    try:
        data = text.encode("utf-8") + b"\n"
    except UnicodeEncodeError as exc:
        raise ProtocolError(
            f"cannot encode message: not valid text (a lone surrogate at character {exc.start})"
        ) from None
    if len(data) > MAX_LINE_BYTES:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_LINE_BYTES}-byte limit")
    return data


def decode(line: bytes | str) -> dict[str, Any]:
    """Parse one line into a message dict with a string ``type``.

    Checks only the framing (size, UTF-8, JSON object, ``type``, text that is valid
    Unicode); the meaning of each field is checked by ``validate_client_message`` or by
    the client.
    """
    if isinstance(line, str):
        line = line.encode("utf-8")
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(f"line of {len(line)} bytes exceeds the {MAX_LINE_BYTES}-byte limit")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError("line is not valid UTF-8") from exc
    try:
        if text[:1].isspace():
            message = _DECODER.decode(text)
        else:  # the usual line: ``raw_decode`` skips ``decode``'s two whitespace regexes
            message, end = _DECODER.raw_decode(text)
            if end != len(text) and not text[end:].isspace():
                raise json.JSONDecodeError("Extra data", text, end)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"line is not JSON: {exc.msg} at column {exc.colno}") from exc
    except ProtocolError:
        raise  # a NaN or Infinity, refused by ``_reject_constant``
    except ValueError as exc:
        # Python's own limit on the digits of an integer it reads (4300 by default): valid
        # JSON, but not a number this end takes. The first clause only: the rest is advice
        # for whoever runs the interpreter, not for the peer.
        reason = str(exc).split(";")[0]
        raise ProtocolError(f"line cannot be decoded: {reason}") from None
    except RecursionError:
        raise ProtocolError("line is nested too deeply to decode") from None
    if not isinstance(message, dict):
        raise ProtocolError("message must be a JSON object")
    if b"\\u" in line and _SURROGATE_ESCAPE.search(line):
        _require_text(message)
    kind = message.get("type")
    if not isinstance(kind, str):
        raise ProtocolError('message needs a string "type"')
    return message


def _require_text(message: dict[str, Any]) -> None:
    """Raise ``ProtocolError`` if a string of ``message`` (a key or a value) holds a lone
    surrogate. JSON text may escape one (``"\\ud800"``), and it decodes to a Python
    string that no UTF-8 output takes: a client name or a metric name holding one would
    break every scrape of ``/metrics`` and that client's status entry, so it is refused
    here, as invalid UTF-8 is, and as every config layer refuses it. Only a line with a
    surrogate's escape is checked: no other way into a decoded string has one."""
    try:
        _TEXT_CHECK.encode(message).encode("utf-8")
    except UnicodeEncodeError:
        raise ProtocolError(LONE_SURROGATE) from None
    except RecursionError:
        raise ProtocolError("line is nested too deeply to decode") from None


def require_int(message: Mapping[str, Any], field: str, *, minimum: int = 0) -> int:
    """``message[field]``, an integer from ``minimum`` to ``MAX_INT``; else ``ProtocolError``."""
    value = message.get(field)
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= MAX_INT:
        raise ProtocolError(
            f'"{message["type"]}" needs an integer "{field}" from {minimum} to {MAX_INT}'
        )
    return value


def _require_errors(message: Mapping[str, Any]) -> None:
    """An ``applied`` message's optional ``errors``: a list of objects of strings (what
    failed and why), which the daemon shows in ``status``."""
    errors = message.get("errors", [])
    if not isinstance(errors, list) or not all(
        isinstance(entry, dict) and all(isinstance(v, str) for v in entry.values())
        for entry in errors
    ):
        raise ProtocolError('"errors" must be a list of objects whose values are strings')


MAX_HELD_KEYS: Final = 1000


def _require_held(message: Mapping[str, Any]) -> None:
    """An ``applied`` message's optional ``held``: the restart-only keys the process runs at
    the value it started with, not the daemon's (a list of key strings)."""
    held = message.get("held", [])
    if (
        not isinstance(held, list)
        or len(held) > MAX_HELD_KEYS
        or not all(isinstance(key, str) and len(key) <= 256 for key in held)
    ):
        raise ProtocolError(
            f'"held" must be a list of at most {MAX_HELD_KEYS} keys of at most 256 characters'
        )


HELD_DIGEST_CHARS: Final = 32
_HEX_DIGEST = re.compile(f"[0-9a-f]{{{HELD_DIGEST_CHARS}}}")
# A value as ``held_digest`` reads it: one text per value on both ends.
_CANONICAL = json.JSONEncoder(
    separators=(",", ":"), sort_keys=True, allow_nan=False, ensure_ascii=False
)


def held_digest(value: Any) -> str:
    """The fingerprint of a restart-only key's ``value`` (JSON form) for ``held_digests``:
    BLAKE2b of 16 bytes of its JSON, with no spaces and a mapping's keys sorted (the type
    counts: ``1`` is not ``1.0``). It travels only over the local socket, which carries
    the values themselves; the daemon publishes and logs none."""
    return hashlib.blake2b(
        _CANONICAL.encode(value).encode(), digest_size=HELD_DIGEST_CHARS // 2
    ).hexdigest()


def _require_held_digests(message: Mapping[str, Any]) -> None:
    """An ``applied`` message's optional ``held_digests``: the fingerprint (``held_digest``)
    of the value the process runs for each of its ``held`` keys (``{KEY: D}``). Its
    daemon, which knows the value wanted, tells by it a process that runs that value from
    one that runs a third."""
    digests = message.get("held_digests")
    if digests is None:
        return
    held = set(message.get("held", []))  # checked before: a list of strings
    if not (
        isinstance(digests, dict)
        and len(digests) <= MAX_HELD_KEYS
        and all(key in held and _is_hex_digest(digest) for key, digest in digests.items())
    ):
        raise ProtocolError(
            f'"held_digests" must be an object {{KEY: D}}: each D {HELD_DIGEST_CHARS} '
            'lowercase hex digits, each KEY one of "held"'
        )


def _is_hex_digest(value: Any) -> bool:
    return isinstance(value, str) and _HEX_DIGEST.fullmatch(value) is not None


def _require_at(message: Mapping[str, Any]) -> None:
    """An ``applied`` message's optional ``at``: when (seconds since the epoch) the process
    applied the version it acknowledges, sent with the ack again at a reconnect, so that
    the status entry's age counts from the apply and not from the reconnect."""
    at = message.get("at")
    if at is not None and (
        isinstance(at, bool) or not isinstance(at, (int, float)) or not math.isfinite(at)
    ):
        raise ProtocolError('"at" must be a finite number of seconds since the epoch')


def _require_agreed(message: Mapping[str, Any]) -> None:
    """An ``applied`` message's optional ``agreed``: the process runs, in place of the
    version it names, the values the ranks of a torch.distributed group agreed on, another
    rank's state (``{"rank": N, "revision": R}``: that rank's global rank, and the etcd
    revision of that state)."""
    agreed = message.get("agreed")
    if agreed is None:
        return
    if not isinstance(agreed, dict) or not all(
        type(agreed.get(name)) is int and 0 <= agreed[name] <= MAX_INT
        for name in ("rank", "revision")
    ):
        raise ProtocolError(
            f'"agreed" must be an object with integers "rank" and "revision" from 0 to {MAX_INT}'
        )


def restart_only_keys(message: Mapping[str, Any]) -> frozenset[str]:
    """A ``snapshot``'s ``restart_only`` keys (none if it has no such field); raises
    ``ProtocolError`` if it is not a list of strings."""
    return _key_list(message, "restart_only")


def secret_keys(message: Mapping[str, Any]) -> frozenset[str]:
    """A ``snapshot``'s ``secret`` keys (none if it has no such field); raises
    ``ProtocolError`` if it is not a list of strings."""
    return _key_list(message, "secret")


def _key_list(message: Mapping[str, Any], field: str) -> frozenset[str]:
    keys = message.get(field, [])
    if not isinstance(keys, list) or not all(isinstance(key, str) for key in keys):
        raise ProtocolError(f'"{field}" must be a list of key strings')
    return frozenset(keys)


def validate_client_message(message: Mapping[str, Any], *, said_hello: bool) -> None:
    """Check a message a client sent to the daemon; raise ``ProtocolError`` if invalid.

    ``hello`` must come first and only once; ``applied`` and ``metrics`` only after it.
    """
    kind = message["type"]
    if kind not in CLIENT_TYPES:
        raise ProtocolError(f'unknown message type "{kind}" from a client')
    if kind == HELLO:
        if said_hello:
            raise ProtocolError('"hello" was already sent on this connection')
        protocol = message.get("protocol")
        # The integer itself: ``true`` and ``1.0`` equal 1 in Python, not in the protocol.
        if type(protocol) is not int or protocol != PROTOCOL_VERSION:
            raise ProtocolError(
                f"unsupported protocol {protocol!r}: this daemon speaks {PROTOCOL_VERSION}"
            )
        client = message.get("client", "")
        if not isinstance(client, str) or len(client) > 256:
            raise ProtocolError('"client" must be a string of at most 256 characters')
        if "pid" in message:
            require_int(message, "pid")
        return
    if not said_hello:
        raise ProtocolError(f'"{kind}" before "hello"')
    # A step is the training loop's own count, whatever it starts from (some count from -1).
    if kind == APPLIED:
        require_int(message, "version")
        require_int(message, "step", minimum=-MAX_INT)
        _require_errors(message)
        _require_held(message)
        _require_held_digests(message)
        _require_at(message)
        _require_agreed(message)
    elif kind == METRICS:
        require_int(message, "step", minimum=-MAX_INT)
        latest = message.get("latest")
        if not isinstance(latest, dict):
            raise ProtocolError('"metrics" needs an object "latest"')


NON_FINITE: Final = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def encode_number(value: float) -> float | str:
    """A reported float as JSON can carry it: finite as is, else ``"nan"``, ``"inf"``, ``"-inf"``.

    JSON has no NaN, and a NaN loss is exactly what a guard must see.
    """
    if math.isfinite(value):
        return value
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def decode_number(raw: Any) -> float | None:
    """The inverse of ``encode_number``; ``None`` for anything that is not a reported number.

    An integer too large for a float is an infinity of its sign, as a float literal too
    large (``1e999``) already is when decoded.
    """
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int | float):
        try:
            return float(raw)
        except OverflowError:
            return math.inf if raw > 0 else -math.inf
    if isinstance(raw, str):
        return NON_FINITE.get(raw.strip().lower())
    return None


def hello(client: str, pid: int | None = None, **extra: Any) -> dict[str, Any]:
    message: dict[str, Any] = {
        "type": HELLO,
        "protocol": PROTOCOL_VERSION,
        "client": client,
        "pid": os.getpid() if pid is None else pid,
    }
    message.update(extra)
    return message


def snapshot(
    version: int,
    revision: int,
    values: Mapping[str, Any],
    sources: Mapping[str, str],
    restart_only: Sequence[str] = (),
    secret: Sequence[str] = (),
    app: str | None = None,
) -> dict[str, Any]:
    """The whole state; ``restart_only``, the schema's restart-only keys, if it has any: a
    process holds each at the value it started with (``LiveConfig``), so that a restarted
    daemon does not hand a running process a value only a restart may bring. ``secret``,
    those of them the schema keeps secret: a process that says it holds one does not log
    its values. ``app``: the daemon's app, which a client asked for another refuses."""
    message = {
        "type": SNAPSHOT,
        "version": version,
        "revision": revision,
        "values": values,
        "sources": sources,
    }
    if app is not None:
        message["app"] = app
    if restart_only:
        message["restart_only"] = list(restart_only)
    if secret:
        message["secret"] = list(secret)
    return message


def update(
    version: int, revision: int, changed: Mapping[str, Any], values: Mapping[str, Any]
) -> dict[str, Any]:
    return {
        "type": UPDATE,
        "version": version,
        "revision": revision,
        "changed": changed,
        "values": values,
    }


def applied(version: int, step: int, **extra: Any) -> dict[str, Any]:
    message: dict[str, Any] = {"type": APPLIED, "version": version, "step": step}
    message.update(extra)
    return message


def applied_line(version: int, step: int) -> bytes:
    """``encode(applied(version, step))``, formatted directly: the ack of a change without
    errors, written in ``apply`` on the training thread, where the encoder's way cost
    ~15 µs a change, cold (docs/performance-history.md, twelfth round). Both are plain ``int``s
    within ``MAX_INT`` (the caller checks the step; a version comes from ``require_int``)."""
    return b'{"type":"applied","version":%d,"step":%d}\n' % (version, step)


def error(text: str) -> dict[str, Any]:
    return {"type": ERROR, "error": text}
