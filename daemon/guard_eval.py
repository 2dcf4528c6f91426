"""A parsed guard: its syntax tree, and whether it holds for the values reported.

The parser (``guard_lang.py``) makes the tree from a guard's text, and says what may be
written in one; what a guard means, once parsed, is said here: the daemons' guards judge
it against the reports of the processes they watch, for as long as its window lasts. The
tree is plain data, and evaluating it is plain float arithmetic over the mappings given.

A condition joined by ``and`` is False as soon as any part is False, whatever the
order of the parts and whether the others can be evaluated; only when no part is
False and a part reads a value that is missing is there no verdict (``MissingValue``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeAlias

COMPARE: dict[str, Callable[[float, float], bool]] = {  # the parser tells a comparison by these
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
    "==": operator.eq,
    "!=": operator.ne,
}
_ARITH: dict[str, Callable[[float, float], float]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
}


# --- the syntax tree ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Num:
    value: float


@dataclass(frozen=True, slots=True)
class Metric:
    name: str


@dataclass(frozen=True, slots=True)
class Baseline:
    name: str | None  # None: the metric of the enclosing comparison, resolved by the parser


@dataclass(frozen=True, slots=True)
class Neg:
    operand: Numeric


@dataclass(frozen=True, slots=True)
class Arith:
    op: str
    left: Numeric
    right: Numeric


@dataclass(frozen=True, slots=True)
class Compare:
    op: str
    left: Numeric
    right: Numeric


@dataclass(frozen=True, slots=True)
class And:
    parts: tuple[Condition, ...]


Numeric: TypeAlias = Num | Metric | Baseline | Neg | Arith
Condition: TypeAlias = Compare | And
Node: TypeAlias = Numeric | Condition


class MissingValue(KeyError):
    """A metric (or its baseline) the guard needs is not in the mapping given."""


# --- evaluation --------------------------------------------------------------------------


def _value(node: Numeric, values: Mapping[str, float], baselines: Mapping[str, float]) -> float:
    if isinstance(node, Num):
        return node.value
    if isinstance(node, Metric):
        if node.name not in values:
            raise MissingValue(node.name)
        return float(values[node.name])
    if isinstance(node, Baseline):
        assert node.name is not None
        if node.name not in baselines:
            raise MissingValue(f"baseline({node.name})")
        return float(baselines[node.name])
    if isinstance(node, Neg):
        return -_value(node.operand, values, baselines)
    left = _value(node.left, values, baselines)
    right = _value(node.right, values, baselines)
    return _ARITH[node.op](left, right)


def _holds(node: Condition, values: Mapping[str, float], baselines: Mapping[str, float]) -> bool:
    if isinstance(node, And):
        # Any False part makes the whole False, wherever it stands: a part that cannot be
        # evaluated (a value missing) leaves no verdict only if no other part is False.
        missing: MissingValue | None = None
        for part in node.parts:
            try:
                if not _holds(part, values, baselines):
                    return False
            except MissingValue as exc:
                missing = missing or exc
        if missing is not None:
            raise missing
        return True
    left = _value(node.left, values, baselines)
    right = _value(node.right, values, baselines)
    if math.isnan(left) or math.isnan(right):
        return False
    return COMPARE[node.op](left, right)


@dataclass(frozen=True)
class Guard:
    """A parsed guard: ``metrics`` are the names it reads, ``baselines`` those it compares
    against their baseline."""

    text: str
    root: Condition
    metrics: frozenset[str]
    baselines: frozenset[str]

    def holds(self, values: Mapping[str, float], baselines: Mapping[str, float]) -> bool:
        """Whether the condition holds; NaN on either side of a comparison fails it.

        Raises ``MissingValue`` if a metric or baseline it reads is not given, unless a
        part of an ``and`` that can be evaluated is False (then the whole is False).
        """
        return _holds(self.root, values, baselines)

    def __str__(self) -> str:
        return self.text
