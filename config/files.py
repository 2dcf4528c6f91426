"""Config files: YAML, TOML or JSON read strictly into one nested mapping, or refused
with the file and the reason (``read_config_file``): no duplicate key, no YAML alias or
tag that builds objects, nothing nested more than ``MAX_FILE_DEPTH`` deep, no text UTF-8
cannot carry, no YAML number read otherwise than the other layers read its text, and no
error message that quotes the file's content (it may hold a secret). How YAML is read,
and the rule on its numbers, is ``strict_yaml``'s."""

from __future__ import annotations

import codecs
import json
import os
import stat
import tomllib
from pathlib import Path
from typing import Any

import yaml

from .errors import LayerError
from .keys import LONE_SURROGATE, is_text, shown_text
from .strict_yaml import load_yaml, number_read_otherwise

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_FILE_DEPTH = 64  # mappings and lists within one another: far beyond any real config
FILE_SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".toml": "toml", ".json": "json"}


def _json_object_no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_json_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def parse_config_text(text: str, kind: str) -> Any:
    if kind == "yaml":
        return load_yaml(text)
    if kind == "toml":
        return tomllib.loads(text)
    return json.loads(
        text, object_pairs_hook=_json_object_no_duplicates, parse_constant=_reject_json_constant
    )


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse one config file (YAML, TOML or JSON by extension) into a nested dict.

    Raises ``LayerError`` (layer ``files``) naming the file and the reason for a
    missing, unreadable, empty, oversized, non-UTF-8 or unparsable file, one that is no
    regular file (a named pipe would block the read for ever), one nested
    more than ``MAX_FILE_DEPTH`` levels deep, one whose top level is not a mapping, or
    one with a lone surrogate (an escape such as ``"\\ud800"``, which JSON and YAML
    allow and UTF-8 cannot carry) in a key or a value, or a YAML number that YAML reads
    as another number than ``--set``, env and etcd read the same text (``010`` as octal
    8, ``1:30`` in base 60).
    What it returns is at most that deep, so code that walks it recursively is safe.
    """
    path = Path(path)
    kind = FILE_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise LayerError(
            "files", f"{path}: unknown config format {path.suffix!r} (use .yaml, .toml or .json)"
        )
    try:
        data = _read_regular_file(path)
    except FileNotFoundError:
        raise LayerError("files", f"{path}: no such file") from None
    except OSError as exc:
        raise LayerError("files", f"{path}: cannot read: {exc.strerror or exc}") from exc
    if data is None:
        raise LayerError("files", f"{path}: not a regular file (a named pipe or a device)")
    if len(data) > MAX_FILE_BYTES:
        raise LayerError("files", f"{path}: larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB")
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as some editors write, is dropped
    except UnicodeDecodeError as exc:
        raise LayerError("files", f"{path}: not valid UTF-8 ({_why_not_utf8(data, exc)})") from exc
    if not text.strip():
        raise LayerError("files", f"{path}: file is empty")
    try:
        parsed = parse_config_text(text, kind)
    except RecursionError:
        raise LayerError("files", _too_deep(path)) from None
    except Exception as exc:
        if kind == "yaml" and not isinstance(exc, yaml.YAMLError):
            # An explicit tag on a value that is not of its kind (``!!int abc``, ``!!bool
            # x``): PyYAML's constructor raises whatever its conversion raises, quoting
            # the value (which may be a secret), with no position.
            reason = _YAML_TAG_FAILED.format(type(exc).__name__)
        elif isinstance(exc, yaml.YAMLError | tomllib.TOMLDecodeError | ValueError):
            reason = " ".join(_parse_error_text(exc).split())
        else:
            raise
        # Not ``from exc``: a traceback of the chain would print PyYAML's own text, which
        # quotes a line of the file.
        raise LayerError("files", f"{path}: not valid {kind.upper()}: {reason}") from None
    if parsed is None:  # YAML of comments alone
        raise LayerError("files", f"{path}: no values in it (only comments)")
    if not isinstance(parsed, dict):
        raise LayerError("files", f"{path}: the top level must be a mapping of sections")
    if _depth_exceeds(parsed, MAX_FILE_DEPTH):
        raise LayerError("files", _too_deep(path))
    where = _lone_surrogate_at(parsed) if "\\" in text else None  # only escapes make one
    if where is not None:
        raise LayerError("files", f"{path}: {where}: {LONE_SURROGATE}", key=where)
    twice = _dotted_twice(parsed)
    if twice is not None:
        raise LayerError(
            "files",
            f"{path}: duplicate key {twice!r}: given nested and with dots in a name too",
            key=twice,
        )
    otherwise = number_read_otherwise(text) if kind == "yaml" else None
    if otherwise is not None:
        key, (problem, instead), mark = otherwise
        raise LayerError("files", f"{path}: {key}: {problem}{_yaml_at(mark)}: {instead}", key=key)
    return parsed


_OTHER_UNICODE_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),  # before UTF-16's: it starts with the same two bytes
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


def _why_not_utf8(data: bytes, exc: UnicodeDecodeError) -> str:
    """Where the text stops being UTF-8; or, for text saved as UTF-16 or UTF-32 (as some
    Windows tools save text by default), that encoding and what to do: "byte 0" alone
    does not tell a user that the whole file is in another encoding."""
    for bom, encoding in _OTHER_UNICODE_BOMS:
        if data.startswith(bom):
            return f"it starts with a {encoding} byte-order mark: save it as UTF-8"
    return f"byte {exc.start}"


def _read_regular_file(path: Path) -> bytes | None:
    """The first ``MAX_FILE_BYTES + 1`` bytes of ``path``; None if it is no regular file.

    Opened without blocking, and refused unread if it is not a regular file: opening a
    named pipe (a FIFO) waits for a writer, and reading one for its end, forever."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return f.read(MAX_FILE_BYTES + 1)


def _dotted_twice(parsed: dict[str, Any]) -> str | None:
    """A dotted key that ``parsed`` gives twice, spelled two ways (``{"train": {"lr": 1},
    "train.lr": 2}``), which the parsers' own duplicate checks cannot see; else None."""
    seen: set[str] = set()
    stack: list[tuple[str, Any]] = [("", parsed)]
    while stack:
        prefix, node = stack.pop()
        for name, value in node.items():
            key = f"{prefix}{name}"
            if isinstance(value, dict) and value:
                stack.append((key + ".", value))
            elif key in seen:
                return key
            else:
                seen.add(key)
    return None


_YAML_TAG_FAILED = (
    "a value could not be made into the type its explicit tag names (such as !!int, "
    "!!float, !!bool or !!timestamp; {}); drop the tag or fix the value"
)


def _parse_error_text(exc: Exception) -> str:
    """Why a file could not be parsed, by line and column, without the file's content.

    PyYAML's own text of a ``MarkedYAMLError`` quotes the line it stopped at (with a caret
    under the column), and that line may hold a secret (``api_key: s3cret``): it is built
    here from the error's problem, context and marks instead. So are the few problems that
    quote a name taken from the text (a tag, an anchor), as a value starting with ``!`` or
    ``&`` that was meant as a string is read as one. The errors of ``tomllib`` and ``json``
    name a position only (and a key, or a single character), so their text is kept."""
    if not isinstance(exc, yaml.MarkedYAMLError):
        return str(exc)
    context, problem = _yaml_unquoted(exc.context), _yaml_unquoted(exc.problem)
    context_mark, problem_mark = exc.context_mark, exc.problem_mark
    parts = []
    if context is not None:
        same = (
            problem_mark is not None
            and context_mark is not None
            and (context_mark.line, context_mark.column) == (problem_mark.line, problem_mark.column)
        )
        parts.append(context if same else context + _yaml_at(context_mark))
    if problem is not None:
        parts.append(problem + _yaml_at(problem_mark))
    if exc.note is not None:
        parts.append(exc.note)
    return "; ".join(parts) or type(exc).__name__


_YAML_QUOTING = {
    "could not determine a constructor for the tag ": (
        "could not determine a constructor for a tag (quote a value that starts with '!')"
    ),
    "found undefined tag handle ": (
        "found an undefined tag handle (quote a value that starts with '!')"
    ),
    "duplicate tag handle ": "duplicate tag handle",
    "found undefined alias ": "found an undefined alias",
    "found duplicate anchor ": "found a duplicate anchor; first occurrence",
}
"""The problems of PyYAML that quote a name read from the text, by how they begin, and
what is said instead."""


def _yaml_unquoted(text: str | None) -> str | None:
    if text is None:
        return None
    for start, instead in _YAML_QUOTING.items():
        if text.startswith(start):
            return instead
    return text


def _yaml_at(mark: yaml.Mark | None) -> str:
    return "" if mark is None else f" at line {mark.line + 1}, column {mark.column + 1}"


def _lone_surrogate_at(parsed: dict[str, Any]) -> str | None:
    """The dotted path (printable) of the first key or value of ``parsed`` that holds a
    lone surrogate; None if there is none. ``parsed`` is at most ``MAX_FILE_DEPTH`` deep."""
    for name, value in parsed.items():
        shown = shown_text(str(name))
        if not is_text(name):
            return shown
        if isinstance(value, dict):
            below = _lone_surrogate_at(value)
            if below is not None:
                return f"{shown}.{below}"
        elif not is_text(value):
            return shown
    return None


def _too_deep(path: Path) -> str:
    return f"{path}: nested too deeply (more than {MAX_FILE_DEPTH} levels)"


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Whether mappings and lists lie more than ``limit`` levels within one another (without
    recursion: a parser accepts depths that a recursive walk does not survive)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node
        for child in children:
            if isinstance(child, dict | list):
                if depth >= limit:
                    return True
                stack.append((child, depth + 1))
    return False
