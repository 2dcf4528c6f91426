"""The socket protocol's own checks (``model_runtime/protocol.py``), for either end.

A line is a message or a ``ProtocolError`` that says why, never another exception:
the daemon answers a ``ProtocolError`` with ``error`` and the runtime does the same.
"""

from __future__ import annotations

import json

import pytest

from hotknob.model_runtime import protocol
from hotknob.model_runtime.received import state_from_message


def test_a_line_nested_too_deeply_is_a_protocol_error() -> None:
    line = b'{"type":"hello","x":' + b"[" * 100_000 + b"]" * 100_000 + b"}\n"
    with pytest.raises(protocol.ProtocolError, match="nested too deeply"):
        protocol.decode(line)


@pytest.mark.parametrize("number", ["1e999", "-1e999", "1.5e400", "[1, 1e999]"])
def test_a_state_with_a_number_too_large_for_a_float_is_refused(number: str) -> None:
    # Python reads 1e999 as infinity; the decoder keeps C speed for the floats of every
    # update and the state built from it refuses what is not finite, as the daemon does.
    line = b'{"type":"update","version":1,"revision":1,"values":{"train":{"lr":NUMBER}}}'
    message = protocol.decode(line.replace(b"NUMBER", number.encode()))
    with pytest.raises(protocol.ProtocolError, match="not a finite number"):
        state_from_message(message)


def test_ordinary_floats_still_decode_exactly() -> None:
    values = {"lr": 3e-4, "tiny": 5e-324, "big": 1.7976931348623157e308, "neg": -0.0}
    line = protocol.encode(protocol.update(1, 1, {}, values))
    assert protocol.decode(line)["values"] == values


@pytest.mark.parametrize("field", ["version", "revision"])
def test_a_state_numbered_past_64_bits_is_refused(field: str) -> None:
    message = {"type": "update", "version": 1, "revision": 1, "values": {}}
    state_from_message({**message, field: protocol.MAX_INT})
    with pytest.raises(protocol.ProtocolError, match=f'"{field}" from 0 to'):
        state_from_message({**message, field: protocol.MAX_INT + 1})


def _hello_then(message: dict[str, object]) -> None:
    protocol.validate_client_message(message, said_hello=True)


def test_applied_numbers_are_bounded() -> None:
    _hello_then({"type": "applied", "version": protocol.MAX_INT, "step": 0})
    # A step is the loop's own count: one below 0 must not get the client disconnected
    # (its acks would be refused again after every reconnect).
    _hello_then({"type": "applied", "version": 1, "step": -1})
    _hello_then({"type": "metrics", "step": -protocol.MAX_INT, "latest": {}})
    for field, value in (("version", -1), ("version", 2**64), ("step", 2**64)):
        bad = {"type": "applied", "version": 1, "step": 1, field: value}
        with pytest.raises(protocol.ProtocolError, match=f'integer "{field}"'):
            _hello_then(bad)


@pytest.mark.parametrize(
    ("version", "step"),
    [(0, 0), (1, -1), (7, 1200), (protocol.MAX_INT, -protocol.MAX_INT), (2, protocol.MAX_INT)],
)
def test_the_formatted_ack_is_the_encoded_one(version: int, step: int) -> None:
    line = protocol.applied_line(version, step)
    assert line == protocol.encode(protocol.applied(version, step))
    _hello_then(protocol.decode(line))


@pytest.mark.parametrize(
    "errors",
    [["boom"], [[1, 2]], {"key": "x"}, [{"key": 1}], "boom"],
)
def test_applied_errors_must_be_objects_of_strings(errors: object) -> None:
    with pytest.raises(protocol.ProtocolError, match='"errors"'):
        _hello_then({"type": "applied", "version": 1, "step": 1, "errors": errors})


def test_applied_errors_as_the_runtime_sends_them_are_valid() -> None:
    errors = [{"binding": "OptimizerBinding", "error": "InvalidValue: no"}, {"key": "a.b"}]
    message = protocol.decode(protocol.encode(protocol.applied(3, 9, errors=errors)))
    _hello_then(message)
    assert json.loads(protocol.encode(message))["errors"] == errors


@pytest.mark.parametrize("where", ["value", "step", "value after a space"])
def test_an_integer_past_pythons_digit_limit_is_a_protocol_error(where: str) -> None:
    # Valid JSON, but ``int()`` refuses more than 4300 digits with a plain ValueError,
    # which the daemon would not answer with ``error``.
    digits = b"9" * 5000
    line = {
        "value": b'{"type":"metrics","step":1,"latest":{"loss":' + digits + b"}}",
        "step": b'{"type":"metrics","step":' + digits + b',"latest":{"loss":1}}',
        "value after a space": b' {"type":"metrics","step":1,"latest":{"loss":' + digits + b"}}",
    }[where]
    with pytest.raises(protocol.ProtocolError, match="4300 digits"):
        protocol.decode(line)


def test_a_nan_is_still_refused_as_such() -> None:
    with pytest.raises(protocol.ProtocolError, match="NaN is not a valid JSON number"):
        protocol.decode(b'{"type":"metrics","step":1,"latest":{"loss":NaN}}')


def test_an_integer_too_large_for_a_float_decodes_as_an_infinity() -> None:
    message = protocol.decode(b'{"type":"metrics","step":1,"latest":{"a":9' + b"9" * 400 + b"}}")
    assert protocol.decode_number(message["latest"]["a"]) == float("inf")
    assert protocol.decode_number(-(10**400)) == float("-inf")
    assert protocol.decode_number(10**300) == 1e300


def test_encode_writes_what_json_writes_and_refuses_what_it_cannot() -> None:
    message = {
        "type": "update",
        "values": {"a": [1, 2.5, None, True, 'é \u2028 "q" \\ \n', {"x": 1e300}], "b": {}},
    }
    expected = json.dumps(message, separators=(",", ":"), ensure_ascii=False) + "\n"
    assert protocol.encode(message) == expected.encode("utf-8")
    looped: dict[str, object] = {"type": "event"}
    looped["self"] = looped  # no message holds one; refused, not a crash
    for bad in ({"type": "x", "v": float("nan")}, {"type": "x", "v": object()}, looped):
        with pytest.raises(protocol.ProtocolError, match="cannot encode message"):
            protocol.encode(bad)


@pytest.mark.parametrize("held", [["train.batch_size"], []])
def test_an_ack_may_name_the_restart_only_keys_it_holds(held: list[str]) -> None:
    _hello_then(protocol.decode(protocol.encode(protocol.applied(3, 9, held=held))))


@pytest.mark.parametrize(
    "held", ["train.batch_size", [1], ["x" * 257], ["k"] * (protocol.MAX_HELD_KEYS + 1)]
)
def test_held_keys_must_be_a_short_list_of_short_strings(held: object) -> None:
    with pytest.raises(protocol.ProtocolError, match='"held"'):
        _hello_then({"type": "applied", "version": 1, "step": 1, "held": held})


def test_an_ack_may_say_when_it_applied_the_version_as_a_finite_number() -> None:
    _hello_then(protocol.decode(protocol.encode(protocol.applied(3, 9, at=1796000000.5))))
    for at in ("yesterday", True, [1]):
        with pytest.raises(protocol.ProtocolError, match='"at"'):
            _hello_then({"type": "applied", "version": 1, "step": 1, "at": at})
    with pytest.raises(protocol.ProtocolError):  # no JSON number is infinite either
        protocol.decode(b'{"type":"applied","version":1,"step":1,"at":Infinity}\n')


def test_a_snapshot_names_restart_only_keys_only_when_there_are_some() -> None:
    plain = protocol.snapshot(1, 2, {"a": 1}, {"a": "defaults"})
    assert "restart_only" not in plain and protocol.restart_only_keys(plain) == frozenset()
    named = protocol.snapshot(1, 2, {"a": 1}, {"a": "defaults"}, ["a"])
    assert named["restart_only"] == ["a"] and protocol.restart_only_keys(named) == {"a"}
    for bad in ("a", [1], {"a": 1}):
        with pytest.raises(protocol.ProtocolError, match='"restart_only"'):
            protocol.restart_only_keys({**named, "restart_only": bad})


def test_an_ack_may_say_it_runs_another_rank_s_agreed_values() -> None:
    agreed = {"rank": 0, "revision": 1240}
    _hello_then(protocol.decode(protocol.encode(protocol.applied(3, 9, agreed=agreed))))
    for bad in (
        0,
        [0, 1240],
        {"rank": 0},
        {"rank": -1, "revision": 5},
        {"rank": True, "revision": 5},
        {"rank": 0, "revision": 2**63},
    ):
        with pytest.raises(protocol.ProtocolError, match='"agreed"'):
            _hello_then({"type": "applied", "version": 1, "step": 1, "agreed": bad})
