"""Values ``==`` takes for equal that a process runs otherwise: a zero's sign, and the types
inside a list (``[1]`` is not ``[1.0]``). The daemon pushes such a change; the runtime's
``on_change`` hears of it, a shadowed one inside a mapping is warned of, and a log line
that quotes a number JSON has no text for (a refused ``1e999``) is still JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from hotknob.config.changes import edits_inside
from hotknob.daemon.logs import _dumps
from hotknob.model_runtime import LiveConfig
from tests.daemon_stub import DaemonStub

pytestmark = pytest.mark.timeout(30)


def test_on_change_hears_a_zero_change_sign_and_a_list_change_type(tmp_path: Path) -> None:
    values: dict[str, Any] = {"x": 0.0, "xs": [1, 2]}
    with DaemonStub(str(tmp_path / "d.sock"), values) as stub:
        live = LiveConfig.connect(stub.path, timeout=10)
        try:
            heard: list[tuple[str, Any]] = []
            live.on_change("x", lambda v: heard.append(("x", v)))
            live.on_change("xs", lambda v: heard.append(("xs", v)))
            for step, pushed in enumerate(
                ({"x": -0.0, "xs": [1, 2]}, {"x": -0.0, "xs": [1.0, 2]}), 1
            ):
                version = stub.push(pushed)
                stub.wait_for(lambda v=version: live.pending_version == v)
                assert live.apply(step) is True
            assert [k for k, _ in heard] == ["x", "xs"], heard
            assert math.copysign(1.0, heard[0][1]) == -1.0
            assert [type(v) for v in heard[1][1]] == [float, int]
        finally:
            live.close()


def test_an_edit_inside_a_mapping_of_a_type_inside_a_list_is_an_edit() -> None:
    old = {"head": [1, 2], "zero": 0.0, "same": [1.0]}
    new = {"head": [1.0, 2], "zero": -0.0, "same": [1.0]}
    assert edits_inside("w", old, new) == {"w.head": [1.0, 2], "w.zero": -0.0}


def test_a_log_line_quoting_infinity_is_still_json() -> None:
    def strict(text: str) -> Any:
        def refuse(name: str) -> Any:
            raise ValueError(f"{name} is no JSON")

        return json.loads(text, parse_constant=refuse)

    line = _dumps({"event": "change_rejected", "new": {"x": math.inf, "xs": [1, -math.inf]}})
    assert strict(line)["new"] == {"x": "inf", "xs": [1, "-inf"]}
    assert strict(_dumps({"event": "change_accepted", "new": {"x": 0.5}}))["new"] == {"x": 0.5}
