"""The guard language: a tiny, safe expression over reported metrics, parsed and never ``eval``ed.

A guard says what must keep holding after a change, e.g. ``loss < 1.5 * baseline``::

    guard      := comparison ("and" comparison)*
    comparison := sum ("<" | "<=" | ">" | ">=" | "==" | "!=") sum
    sum        := product (("+" | "-") product)*
    product    := unary ("*" unary)*
    unary      := "-" unary | atom
    atom       := NUMBER | METRIC | "baseline" | "baseline" "(" METRIC ")" | "(" guard-or-sum ")"

``METRIC`` is a name a process reports (``loss``, ``grad_norm``, ``eval.loss``,
``train/loss``): ASCII letters, digits, ``_`` and ``.``, starting with a letter or ``_``,
its parts joined by ``/`` with no spaces around it. There is no division, so a ``/``
there is never one; a name whose last part is a number (``loss/2``) is refused as the
division it looks like.
A bare ``baseline`` means the baseline of the one metric named in the same
comparison; ``baseline(name)`` names it explicitly. Parentheses group either
arithmetic or whole conditions; the parser checks that numbers and conditions
are not mixed (``(loss < 1) * 2`` is refused). Comparisons do not chain.

Whitespace around the guard (the newline a YAML ``guard: |`` block or ``$(cat file)``
leaves) is stripped first; inside it, only spaces and tabs separate tokens.
Malformed input raises ``GuardSyntaxError`` (an ``InvalidInput``, exit code 1)
whose message, one line with control characters escaped, names the 1-based column
(of the stripped text) and what was expected there. Evaluation is plain float
arithmetic over a mapping: nothing in the text can reach Python.

This module reads the text; the tree it makes, and what a guard means once made, are
``guard_eval.py``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

from hotknob.config.errors import InvalidInput

from .guard_eval import (
    COMPARE,
    And,
    Arith,
    Baseline,
    Compare,
    Condition,
    Guard,
    Metric,
    Neg,
    Node,
    Num,
    Numeric,
)

MAX_GUARD_CHARS = 1000
MAX_DEPTH = 64
BASELINE = "baseline"
_KEYWORDS = frozenset({"and", BASELINE})


def escaped(text: str) -> str:
    """``text`` with every character that is not printable (a newline, a tab, a control or
    format character, a lone surrogate) written as its Python escape: one line, as typed."""
    if text.isprintable():
        return text
    return "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape", "backslashreplace").decode("ascii")
        for ch in text
    )


class GuardSyntaxError(InvalidInput):
    """A guard that cannot be parsed; ``position`` is the 0-based offset of the problem.

    The message is one line: control characters of the text (and of the problem, which
    may quote it) are escaped."""

    def __init__(self, text: str, position: int, problem: str) -> None:
        self.text = text
        self.position = position
        self.problem = problem
        near = text[position : position + 12]
        where = f'near "{escaped(near)}"' if near else "at the end"
        super().__init__(
            f'invalid guard "{escaped(text)}": {escaped(problem)} at column {position + 1} '
            f"({where})"
        )


# --- tokens --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # "num", "name", "op", "end"
    text: str
    position: int
    value: float = 0.0


def _is_name_start(ch: str) -> bool:
    return ch.isascii() and (ch.isalpha() or ch == "_")


def _is_name_char(ch: str) -> bool:
    return ch.isascii() and (ch.isalnum() or ch in "_.")


def _is_part_start(ch: str) -> bool:
    """Whether ``ch`` may follow a "/" inside a metric name (``train/loss``, ``layer/0/norm``)."""
    return ch.isascii() and (ch.isalnum() or ch == "_")


_DIVISION = (
    "division is not supported: multiply instead; a metric name may join its parts "
    'with "/", no spaces around it, as in train/loss'
)


def tokenize(text: str) -> list[Token]:
    """Numbers, names, operators and parentheses; anything else is a ``GuardSyntaxError``."""
    if len(text) > MAX_GUARD_CHARS:
        raise GuardSyntaxError(text[:40] + "...", 0, f"longer than {MAX_GUARD_CHARS} characters")
    tokens: list[Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch in " \t":
            i += 1
        elif ch.isascii() and (ch.isdigit() or (ch == "." and text[i + 1 : i + 2].isdigit())):
            start = i
            while i < n and text[i].isascii() and (text[i].isdigit() or text[i] == "."):
                i += 1
            if i < n and text[i] in "eE":
                j = i + 1
                if j < n and text[j] in "+-":
                    j += 1
                if j < n and text[j].isascii() and text[j].isdigit():
                    i = j
                    while i < n and text[i].isascii() and text[i].isdigit():
                        i += 1
            literal = text[start:i]
            if i < n and _is_name_char(text[i]):
                raise GuardSyntaxError(text, start, f'malformed number "{literal}{text[i]}"')
            try:
                value = float(literal)
            except ValueError:
                raise GuardSyntaxError(text, start, f'malformed number "{literal}"') from None
            tokens.append(Token("num", literal, start, value))
        elif _is_name_start(ch):
            start = i
            while i < n and (
                _is_name_char(text[i]) or (text[i] == "/" and _is_part_start(text[i + 1 : i + 2]))
            ):
                i += 1
            name = text[start:i]
            if any(part.endswith(".") or ".." in part for part in name.split("/")):
                raise GuardSyntaxError(text, start, f'malformed metric name "{name}"')
            last = name.rsplit("/", 1)[-1]
            if last != name and last.replace(".", "").isdigit():
                raise GuardSyntaxError(
                    text,
                    start + len(name) - len(last) - 1,
                    f'"{name}" ends in a number after "/": {_DIVISION}',
                )
            tokens.append(Token("name", name, start))
        elif text.startswith(("<=", ">=", "==", "!="), i):
            tokens.append(Token("op", text[i : i + 2], i))
            i += 2
        elif ch in "<>+-*()":
            tokens.append(Token("op", ch, i))
            i += 1
        else:
            hint = " (use 'and')" if ch == "&" else ""
            hint = f" ({_DIVISION})" if ch == "/" else hint
            hint = " (write the guard on one line)" if ch in "\r\n" else hint
            raise GuardSyntaxError(text, i, f'unexpected character "{ch}"{hint}')
    tokens.append(Token("end", "", n))
    return tokens


# --- what the parser reads of the tree it makes ------------------------------------------


def _numeric_names(node: Numeric, metrics: set[str], baselines: set[str | None]) -> None:
    if isinstance(node, Metric):
        metrics.add(node.name)
    elif isinstance(node, Baseline):
        baselines.add(node.name)
    elif isinstance(node, Neg):
        _numeric_names(node.operand, metrics, baselines)
    elif isinstance(node, Arith):
        _numeric_names(node.left, metrics, baselines)
        _numeric_names(node.right, metrics, baselines)


def _bind_baseline(node: Numeric, name: str) -> Numeric:
    """``node`` with every bare ``baseline`` bound to the metric ``name``."""
    if isinstance(node, Baseline) and node.name is None:
        return Baseline(name)
    if isinstance(node, Neg):
        return Neg(_bind_baseline(node.operand, name))
    if isinstance(node, Arith):
        return Arith(node.op, _bind_baseline(node.left, name), _bind_baseline(node.right, name))
    return node


# --- the parser --------------------------------------------------------------------------


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> Token:
        return self.tokens[self.i]

    def fail(self, problem: str, token: Token | None = None) -> GuardSyntaxError:
        return GuardSyntaxError(self.text, (token or self.tok).position, problem)

    def take(self, kind: str, text: str | None = None) -> Token | None:
        tok = self.tok
        if tok.kind == kind and (text is None or tok.text == text):
            self.i += 1
            return tok
        return None

    def parse(self) -> Condition:
        if self.tok.kind == "end":
            raise self.fail("empty guard: expected a condition such as 'loss < 1.5 * baseline'")
        start = self.tok
        node = self.expression()
        if self.tok.kind != "end":
            raise self.fail(f'unexpected "{self.tok.text}"')
        if not isinstance(node, Compare | And):
            raise self.fail("a guard must be a condition (a comparison such as 'loss < 2')", start)
        return node

    def expression(self) -> Node:
        """A condition joined by ``and``, or a lone arithmetic expression inside parentheses."""
        first_tok = self.tok
        first = self.comparison()
        if self.tok.text != "and" or self.tok.kind != "name":
            return first
        parts = [self.condition(first, first_tok)]
        while self.take("name", "and"):
            tok = self.tok
            parts.append(self.condition(self.comparison(), tok))
        return And(
            tuple(p for part in parts for p in (part.parts if isinstance(part, And) else (part,)))
        )

    def condition(self, node: Node, token: Token) -> Condition:
        if not isinstance(node, Compare | And):
            raise self.fail("'and' joins conditions, not numbers", token)
        return node

    def comparison(self) -> Node:
        left_tok = self.tok
        left = self.sum()
        op = self.tok
        if op.kind != "op" or op.text not in COMPARE:
            return left
        self.i += 1
        right_tok = self.tok
        right = self.sum()
        if self.tok.kind == "op" and self.tok.text in COMPARE:
            raise self.fail("comparisons do not chain: join them with 'and'")
        lhs = self.numeric(left, left_tok)
        rhs = self.numeric(right, right_tok)
        metrics: set[str] = set()
        baselines: set[str | None] = set()
        _numeric_names(lhs, metrics, baselines)
        _numeric_names(rhs, metrics, baselines)
        if None in baselines:
            if len(metrics) != 1:
                raise self.fail(
                    "a bare 'baseline' needs exactly one metric in its comparison "
                    f"(found {len(metrics)}): write baseline(name)",
                    left_tok,
                )
            (name,) = metrics
            lhs, rhs = _bind_baseline(lhs, name), _bind_baseline(rhs, name)
        return Compare(op.text, lhs, rhs)

    def numeric(self, node: Node, token: Token) -> Numeric:
        if isinstance(node, Compare | And):
            raise self.fail("expected a number here, found a condition", token)
        return node

    def sum(self) -> Node:
        left_tok = self.tok
        node = self.product()
        while self.tok.kind == "op" and self.tok.text in "+-":
            op = self.tok.text
            self.i += 1
            right_tok = self.tok
            right = self.product()
            node = Arith(op, self.numeric(node, left_tok), self.numeric(right, right_tok))
        return node

    def product(self) -> Node:
        left_tok = self.tok
        node = self.unary()
        while self.take("op", "*"):
            right_tok = self.tok
            right = self.unary()
            node = Arith("*", self.numeric(node, left_tok), self.numeric(right, right_tok))
        return node

    def unary(self) -> Node:
        minus = self.take("op", "-")
        if minus is None:
            return self.atom()
        self.enter()
        tok = self.tok
        operand = self.numeric(self.unary(), tok)
        self.depth -= 1
        if isinstance(operand, Num):
            return Num(-operand.value)
        return Neg(operand)

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"nested more than {MAX_DEPTH} levels deep")

    def atom(self) -> Node:
        tok = self.tok
        if self.take("num"):
            return Num(tok.value)
        if self.take("op", "("):
            self.enter()
            node = self.expression()
            self.depth -= 1
            if not self.take("op", ")"):
                raise self.fail(f'expected ")" to close the "(" at column {tok.position + 1}')
            return node
        if tok.kind == "name" and tok.text == BASELINE:
            self.i += 1
            if not self.take("op", "("):
                return Baseline(None)
            name = self.tok
            if name.kind != "name" or name.text in _KEYWORDS:
                raise self.fail("expected a metric name inside baseline(...)")
            self.i += 1
            if not self.take("op", ")"):
                raise self.fail('expected ")" after the metric name')
            return Baseline(name.text)
        if tok.kind == "name" and tok.text not in _KEYWORDS:
            self.i += 1
            return Metric(tok.text)
        found = "the end" if tok.kind == "end" else f'"{tok.text}"'
        raise self.fail(f"expected a number, a metric name, 'baseline' or \"(\", found {found}")


def _collect(node: Node, metrics: set[str], baselines: set[str]) -> None:
    if isinstance(node, And):
        for part in node.parts:
            _collect(part, metrics, baselines)
    elif isinstance(node, Compare):
        _collect(node.left, metrics, baselines)
        _collect(node.right, metrics, baselines)
    else:
        found: set[str | None] = set()
        _numeric_names(node, metrics, found)
        baselines.update(name for name in found if name is not None)


def parse_guard(text: str) -> Guard:
    """Parse ``text``; raise ``GuardSyntaxError`` naming the column of the first problem.

    A guard must read at least one reported metric (``baseline(loss) > 1`` or ``1 < 2``
    reads none: no report could ever make it fail or let it pass)."""
    if not isinstance(text, str):
        raise GuardSyntaxError(str(text), 0, "a guard must be text")
    text = text.strip()  # a YAML block's or a file's last newline is not part of it
    root = _Parser(text).parse()
    metrics: set[str] = set()
    baselines: set[str] = set()
    _collect(root, metrics, baselines)
    if not metrics:  # a baseline alone is a constant: such a guard could never end
        raise GuardSyntaxError(text, 0, "a guard must read at least one reported metric")
    return Guard(text, root, frozenset(metrics), frozenset(baselines))
