"""YAML as config files may hold it, read by a fast loader that reads it as the
reference does (``load_yaml``), and the one rule on YAML's numbers the loaders cannot
keep (``number_read_otherwise``).

Both loaders refuse duplicate keys, aliases, merge keys and tags that build objects,
and read a number with an exponent as JSON writes it as a number. Which of the two reads
a text, and why they agree, is YAML's business alone: ``files`` reads YAML, TOML and
JSON alike through ``parse_config_text`` and asks this module only for the values and
for a number YAML 1.1 reads otherwise than the other layers do.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

_YAML_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Strict:
    """Refuses duplicate keys, YAML aliases (no alias bombs) and merge keys (``<<``, which
    merge what an alias names) in a PyYAML loader."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):  # type: ignore[attr-defined]
            event = self.peek_event()  # type: ignore[attr-defined]
            raise yaml.constructor.ConstructorError(
                None, None, "YAML aliases are not allowed in config files", event.start_mark
            )
        return super().compose_node(parent, index)  # type: ignore[misc]

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            # Unchecked, a merge key ends in "no constructor for a tag (quote a value that
            # starts with '!')", about a '!' the file does not hold.
            if key_node.tag == _YAML_MERGE_TAG:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    "YAML merge keys ('<<') are not allowed in config files",
                    key_node.start_mark,
                )
            key = self.construct_object(key_node, deep=deep)  # type: ignore[attr-defined]
            try:
                hash(key)
            except TypeError:  # a list or mapping as a key (``? [a, b]``)
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping",
                    node.start_mark,
                    "found unhashable key",
                    key_node.start_mark,
                ) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)  # type: ignore[misc]


class _StrictYamlLoader(_Strict, yaml.SafeLoader):
    """PyYAML's safe loader, all of it Python: the reference for what a file holds, and
    for the errors a user is shown."""


_JSON_EXPONENT = re.compile(r"^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?[eE][-+]?[0-9]+$")
"""A number with an exponent as JSON writes it (``1e-3``, ``6.02e23``, ``1.0e3``), which
YAML 1.1 reads as text unless it has a '.' and a signed exponent: ``lr: 1e-3`` would be
the string "1e-3" where ``--set``, env and etcd read the number 0.001, a field of ``int``
would refuse ``1e3`` that ``--set`` takes as 1000, and one of ``Any`` would hold text. A
number here too, as YAML 1.2 reads it."""


def _reads_exponents(loader: type[Any]) -> type[Any]:
    # On the loader class alone: PyYAML copies the resolvers into it before adding one,
    # so ``yaml.SafeLoader`` (which other code may use) is left as it is.
    loader.add_implicit_resolver("tag:yaml.org,2002:float", _JSON_EXPONENT, list("-0123456789"))
    return loader


_reads_exponents(_StrictYamlLoader)


_CParser: Any
try:
    from yaml._yaml import CParser as _CParser
except ImportError:  # PyYAML built without libyaml
    _CParser = None

if _CParser is not None:

    class _FastStrictYamlLoader(
        _Strict,
        yaml.composer.Composer,
        _CParser,
        yaml.constructor.SafeConstructor,
        yaml.resolver.Resolver,
    ):
        """The same loader with libyaml's scanner and parser underneath (3-4x as fast
        on a large file): the nodes are still composed by PyYAML's Python composer, so
        aliases are refused before anything is built and a document nested too deeply
        ends in a ``RecursionError``, as in the reference, not in a C stack overflow."""

        def __init__(self, stream: str) -> None:
            _CParser.__init__(self, stream)
            yaml.composer.Composer.__init__(self)
            yaml.constructor.SafeConstructor.__init__(self)
            yaml.resolver.Resolver.__init__(self)

    _reads_exponents(_FastStrictYamlLoader)


_FAST_YAML_UNLIKE = re.compile(r"[\t\x85\u2028\u2029\ufeff]|[|>][-+0-9]*#|!(?:\s|$)")
"""What libyaml reads otherwise than PyYAML in Python, as found by comparing the two on
random texts (``tests/test_yaml_loaders.py``): a tab (libyaml takes it as a space in
more places), a byte-order mark inside the text (libyaml drops it), the Unicode line
breaks (NEL, LS, PS), a block scalar's indicator with a comment straight after it
(``|#``) and the non-specific tag ``!`` on an empty value (libyaml makes it ``''``,
PyYAML ``None``). A text with any of them is read by the reference alone; so is one
with a ``!`` before a space in a value (``Hello! world``), which is only slower."""


def load_yaml(text: str) -> Any:
    """``text`` read by the fast loader; read again by the reference loader if the fast
    one refuses it (or there is none, or the text holds what the two read otherwise).

    So a refusal is always the reference's, in its words and at its position, and where
    both read a text they read the same values. Compared on millions of random texts
    (``tests/test_yaml_loaders.py`` keeps a fixed sample), the one difference left is
    that libyaml reads a few malformed flow collections that PyYAML refuses (``{b? }``,
    ``[a? >+]``: about one in 150,000 of the texts it read); what it reads there is
    still checked against the schema like any value."""
    if _CParser is not None and _FAST_YAML_UNLIKE.search(text) is None:
        try:
            return yaml.load(text, Loader=_FastStrictYamlLoader)
        except Exception:
            pass  # the reference says why, below
    return yaml.load(text, Loader=_StrictYamlLoader)


def _compose_yaml(text: str) -> yaml.Node | None:
    """The nodes of ``text``, which ``load_yaml`` read, composed by the loader that read it."""
    if _CParser is not None and _FAST_YAML_UNLIKE.search(text) is None:
        try:
            return yaml.compose(text, Loader=_FastStrictYamlLoader)
        except Exception:
            pass
    return yaml.compose(text, Loader=_StrictYamlLoader)


_YAML_OCTAL = (
    "an integer with a leading 0, which YAML reads as octal (010 as 8, where --set, env "
    "and etcd read 10)",
    "write it without the leading 0, or quote it for text",
)
_YAML_BASE_60 = (
    "a number with a ':' in it, which YAML reads in base 60 (1:30 as 90, where --set, env "
    "and etcd refuse it)",
    "write the number itself, or quote it for text",
)


def _read_otherwise(text: str) -> tuple[str, str] | None:
    """Why YAML 1.1 (PyYAML's) reads the number ``text`` as another number than the same
    digits give in every other layer, and what to write instead; None if it does not.

    A leading 0 makes an integer octal (``010`` is 8) and a ``:`` makes a number base 60
    (``1:30`` is 90): a value that silently becomes another than the one typed, where
    ``--set``, env and etcd read ``010`` as 10 and refuse ``1:30``. ``07`` or ``00`` read
    the same both ways, and are taken."""
    if ":" in text:
        return _YAML_BASE_60
    digits = text.replace("_", "").lstrip("+-")
    octal = len(digits) > 1 and digits[0] == "0" and digits.isdigit()
    if octal and int(digits, 8) != int(digits):
        return _YAML_OCTAL
    return None


_YAML_NUMBER_TAGS = frozenset({"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"})
_MAY_READ_OTHERWISE = re.compile(r"(?<![\w.])[-+]?0[0-9_]|[0-9]:[0-5]?[0-9]")
"""What such a number may look like: only a text with it is composed again to look."""


def number_read_otherwise(text: str) -> tuple[str, tuple[str, str], yaml.Mark] | None:
    """The first number of the YAML ``text`` that YAML reads as another number than the
    other layers do (``_read_otherwise``): its dotted key, why and what to write instead,
    and where it is; None if there is none.

    The loaders read YAML as YAML 1.1 defines it; this is the config files' own rule,
    looked for in the nodes (a value's text is gone once it is made a number), and only
    in a text where ``_MAY_READ_OTHERWISE`` finds what may be one."""
    if _MAY_READ_OTHERWISE.search(text) is None:
        return None
    root = _compose_yaml(text)
    stack: list[tuple[str, yaml.Node]] = [] if root is None else [("", root)]
    while stack:
        key, node = stack.pop()
        if isinstance(node, yaml.MappingNode):
            pairs = [
                (f"{key}.{name.value}" if key else str(name.value), value)
                for name, value in node.value
            ]
            stack.extend(reversed(pairs))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((key, item) for item in reversed(node.value))
        elif node.tag in _YAML_NUMBER_TAGS:
            why = _read_otherwise(str(node.value))
            if why is not None:
                return key, why, node.start_mark
    return None
