"""The guard language: every operator, precedence, baselines, and malformed input."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from hotknob.config.errors import InvalidInput
from hotknob.daemon.guard_eval import MissingValue
from hotknob.daemon.guard_lang import (
    MAX_DEPTH,
    GuardSyntaxError,
    parse_guard,
    tokenize,
)

pytestmark = pytest.mark.timeout(10)


def holds(text: str, values: dict[str, float], baselines: dict[str, float] | None = None) -> bool:
    return parse_guard(text).holds(values, baselines or {})


@pytest.mark.parametrize(
    ("op", "cases"),
    [
        ("<", [(1, True), (2, False), (3, False)]),
        ("<=", [(1, True), (2, True), (3, False)]),
        (">", [(1, False), (2, False), (3, True)]),
        (">=", [(1, False), (2, True), (3, True)]),
        ("==", [(1, False), (2, True), (3, False)]),
        ("!=", [(1, True), (2, False), (3, True)]),
    ],
)
def test_every_comparison(op: str, cases: list[tuple[float, bool]]) -> None:
    for x, expected in cases:
        assert holds(f"x {op} 2", {"x": x}) is expected, (op, x)


def test_arithmetic_operators_and_unary_minus() -> None:
    assert holds("x + 1 == 3", {"x": 2})
    assert holds("x - 1 == 1", {"x": 2})
    assert holds("x * 3 == 6", {"x": 2})
    assert holds("-x == -2", {"x": 2})
    assert holds("- -x == 2", {"x": 2})
    assert holds("x - -1 == 3", {"x": 2})
    assert holds("-2 < x", {"x": -1})


def test_precedence_multiplication_binds_tighter_and_left_associative() -> None:
    # (A guard must read a metric: ``x`` stands in for a number.)
    assert holds("x + 2 * 3 == 7", {"x": 1})
    assert holds("(x + 2) * 3 == 9", {"x": 1})
    assert holds("10 - 3 - x == 5", {"x": 2})  # (10 - 3) - 2, not 10 - (3 - 2)
    assert holds("2 * 3 + x == 7", {"x": 1})
    assert holds("-x * 3 == -6", {"x": 2})
    assert holds("x + 1 < 3 and 2 * 2 == 4", {"x": 1})


def test_and_needs_every_part() -> None:
    guard = "loss < 2 and grad_norm < 10"
    assert holds(guard, {"loss": 1, "grad_norm": 5})
    assert not holds(guard, {"loss": 3, "grad_norm": 5})
    assert not holds(guard, {"loss": 1, "grad_norm": 50})
    assert holds("(loss < 2) and (grad_norm < 10 and grad_norm > 1)", {"loss": 1, "grad_norm": 5})
    parsed = parse_guard("a < 1 and (b < 1 and c < 1)")
    assert parsed.metrics == {"a", "b", "c"}


def test_numbers_in_every_spelling() -> None:
    for text, value in [("3", 3.0), ("3.5", 3.5), (".5", 0.5), ("5.", 5.0), ("3e-4", 3e-4)]:
        assert holds(f"x == {text}", {"x": value}), text
    assert holds("x == 1E+3", {"x": 1000.0})


def test_bare_baseline_is_the_baseline_of_the_comparisons_metric() -> None:
    guard = parse_guard("loss < 1.5 * baseline and grad_norm < baseline + 5")
    assert guard.metrics == {"loss", "grad_norm"}
    assert guard.baselines == {"loss", "grad_norm"}
    base = {"loss": 2.0, "grad_norm": 1.0}
    assert guard.holds({"loss": 2.9, "grad_norm": 5.9}, base)
    assert not guard.holds({"loss": 3.1, "grad_norm": 5.9}, base)
    assert not guard.holds({"loss": 2.9, "grad_norm": 6.1}, base)


def test_explicit_baseline_of_a_named_metric() -> None:
    guard = parse_guard("loss < baseline(loss) + 0.1 * baseline(grad_norm)")
    assert guard.baselines == {"loss", "grad_norm"}
    assert guard.holds({"loss": 1.05}, {"loss": 1.0, "grad_norm": 1.0})
    assert not guard.holds({"loss": 1.2}, {"loss": 1.0, "grad_norm": 1.0})


def test_nan_fails_every_comparison_and_inf_compares_as_a_number() -> None:
    for op in ("<", "<=", ">", ">=", "==", "!="):
        assert not holds(f"x {op} 1", {"x": math.nan}), op
    assert not holds("x < 10", {"x": math.inf})
    assert holds("x > 10", {"x": math.inf})


def test_missing_metric_or_baseline_is_reported_not_guessed() -> None:
    guard = parse_guard("loss < 1.5 * baseline")
    with pytest.raises(MissingValue):
        guard.holds({}, {"loss": 1.0})
    with pytest.raises(MissingValue):
        guard.holds({"loss": 1.0}, {})


def test_metric_names_with_dots_and_underscores() -> None:
    assert holds("eval.loss_2 < 1", {"eval.loss_2": 0.5})
    assert [t.kind for t in tokenize("a.b<=c_1")] == ["name", "op", "name", "end"]


def test_no_python_reaches_evaluation() -> None:
    for text in ["__import__('os') < 1", "loss < 1 or True", "x < 1; y", "x[0] < 1", "f(x) < 1"]:
        with pytest.raises(GuardSyntaxError):
            parse_guard(text)
    # A dotted name is only ever a key looked up in the reported values.
    assert holds("x.__class__ < 1", {"x.__class__": 0})


@pytest.mark.parametrize(
    ("text", "column", "fragment"),
    [
        ("", 1, "empty guard"),
        ("   ", 1, "empty guard"),  # stripped first: nothing is left
        ("\n", 1, "empty guard"),
        ("loss", 1, "must be a condition"),
        ("loss < ", 7, "expected a number"),  # at the end of "loss <"
        ("loss < * 2", 8, 'found "*"'),
        ("loss << 2", 7, 'found "<"'),
        ("loss < 2 and", 13, "found the end"),
        ("loss < 2 and grad", 14, "joins conditions"),
        ("loss and x < 1", 1, "joins conditions"),
        ("(loss < 2", 10, 'expected ")" to close the "(" at column 1'),
        ("loss < 2)", 9, 'unexpected ")"'),
        ("1 < x < 2", 7, "do not chain"),
        ("loss < 1.5 / baseline", 12, "division is not supported"),
        ("loss < 2 && x > 1", 10, "use 'and'"),
        ("loss < 1.2.3", 8, 'malformed number "1.2.3"'),
        ("loss < 3e", 8, 'malformed number "3e"'),
        ("loss < 2x", 8, 'malformed number "2x"'),
        ("a..b < 1", 1, "malformed metric name"),
        ("baseline < 2", 1, "(found 0)"),
        ("a < b * baseline", 1, "(found 2)"),
        ("loss < baseline(and)", 17, "metric name inside baseline"),
        ("loss < baseline(loss", 21, 'expected ")" after'),
        ("(loss < 1) * 2 < 3", 1, "found a condition"),
        ("loss < 1 + (x < 2)", 12, "found a condition"),
        ("lòss < 1", 2, 'unexpected character "ò"'),
        ("and < 1", 1, "expected a number"),
    ],
)
def test_malformed_guards_name_the_column(text: str, column: int, fragment: str) -> None:
    with pytest.raises(GuardSyntaxError) as info:
        parse_guard(text)
    message = str(info.value)
    assert f"at column {column} " in message, message
    assert fragment in message, message
    assert info.value.position == column - 1
    assert isinstance(info.value, InvalidInput)  # the CLI exits 1 on it


def test_depth_and_length_are_bounded() -> None:
    deep = "(" * (MAX_DEPTH + 1) + "x" + ")" * (MAX_DEPTH + 1) + " < 1"
    with pytest.raises(GuardSyntaxError, match="nested more than"):
        parse_guard(deep)
    ok = "(" * 10 + "x" + ")" * 10 + " < 1"
    assert holds(ok, {"x": 0})
    with pytest.raises(GuardSyntaxError, match="longer than"):
        parse_guard("x < " + "1 + " * 400 + "1")
    with pytest.raises(GuardSyntaxError, match="nested more than"):
        parse_guard("-" * (MAX_DEPTH + 1) + "x < 1")


@pytest.mark.parametrize("text", ["baseline(loss) > 100", "1 < 2", "-(3) == 2 * 1.5 and 1 < 2"])
def test_a_guard_that_reads_no_metric_is_refused(text: str) -> None:
    # No report could make it fail or let it pass: armed, it would never end.
    with pytest.raises(GuardSyntaxError, match="must read at least one reported metric"):
        parse_guard(text)
    assert parse_guard("loss < baseline(loss) + 1").metrics == {"loss"}


@pytest.mark.parametrize(
    "text", ["loss < 3 and grad < 5", "grad < 5 and loss < 3", "grad < 5 and (x < 1 and loss < 3)"]
)
def test_a_false_part_of_and_fails_it_whatever_the_order(text: str) -> None:
    # grad (and x) missing from the report: the failing part decides, wherever it stands.
    guard = parse_guard(text)
    assert guard.holds({"loss": 100.0}, {}) is False
    with pytest.raises(MissingValue):  # no part fails: no verdict
        guard.holds({"loss": 1.0}, {})
    assert guard.holds({"loss": 1.0, "grad": 1.0, "x": 0.0}, {}) is True
    assert guard.holds({"loss": math.nan, "grad": 1.0, "x": 0.0}, {}) is False


@pytest.mark.parametrize(
    "text", ["loss < 2\n", "  loss < 2 \r\n", "\tloss < 2\n\n", "loss < 2 and loss > 0\n"]
)
def test_whitespace_around_a_guard_is_ignored(text: str) -> None:
    guard = parse_guard(text)
    assert guard.text == text.strip()
    assert guard.holds({"loss": 1.0}, {}) and not guard.holds({"loss": 3.0}, {})


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("loss < 2\nand loss > 0", r'invalid guard "loss < 2\nand loss > 0": unexpected'),
        ("loss <\x1b[2J 2", r'unexpected character "\x1b" at column 7 (near "\x1b[2J 2")'),
    ],
)
def test_an_error_is_one_line_with_control_characters_escaped(text: str, shown: str) -> None:
    with pytest.raises(GuardSyntaxError) as info:
        parse_guard(text)
    message = str(info.value)
    assert "\n" not in message and "\x1b" not in message, repr(message)
    assert shown in message, message


def test_a_guard_file_with_a_yaml_block_is_read(tmp_path: Path) -> None:
    import argparse

    from hotknob.daemon.guarded_set import add_guard_options, spec_from_args

    parser = argparse.ArgumentParser()
    add_guard_options(parser)
    for name, body in (
        ("block.yaml", "guard: |\n  loss < 2\nwindow: 10\n"),
        ("folded.yaml", "guard: >\n  loss < 2 and\n  loss > 0\nwindow: 10\n"),
    ):
        path = tmp_path / name
        path.write_text(body)
        spec = spec_from_args(parser.parse_args(["--guard-file", str(path)]))
        assert spec is not None and spec.window == 10
        assert "\n" not in spec.guard.text and spec.guard.text.startswith("loss < 2"), spec
