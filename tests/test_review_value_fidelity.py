"""Numbers as operators write them, from ``set`` and etcdctl to a real process and back
through ``get``, ``history`` and ``rollback``: a zero's sign and a value's type inside a
list or mapping are part of the value, and no output of ``--json`` holds what is not
JSON."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel, Field

from hotknob.config.changes import changed_keys, same_value
from hotknob.config.files import read_config_file
from hotknob.model_runtime.client import LiveConfig
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(60)

APP = "fid"
SCHEMA = "tests.test_review_value_fidelity:Numbers"
ROOT = str(Path(__file__).resolve().parent.parent)


class Numbers(BaseModel):
    n: int = 0
    x: float = 0.0
    xs: list[float] = Field(default_factory=lambda: [1.0])
    anything: dict[str, object] = Field(default_factory=dict)


def _cli(etcd: EtcdServer, *args: str) -> Any:
    return run_cli(
        *args,
        "--app",
        APP,
        "--schema",
        SCHEMA,
        "--etcd-endpoints",
        etcd.endpoint,
        env={"PYTHONPATH": ROOT},
        drop="HOTKNOB_",
    )


def _set(etcd: EtcdServer, *pairs: str) -> Any:
    done = _cli(etcd, "set", *pairs)
    assert done.returncode == 0, done.stderr
    return done


def _strict_json(text: str) -> Any:
    """``text`` read as JSON proper: ``Infinity`` and ``NaN`` are refused, as by ``jq``."""

    def refuse(name: str) -> Any:
        raise ValueError(f"{name} is no JSON")

    return json.loads(text, parse_constant=refuse)


def _sign(value: float) -> float:
    return math.copysign(1.0, value)


def _eventually(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        (0.0, -0.0),
        ([0.0, 1.0], [-0.0, 1.0]),
        ({"a": 1}, {"a": 1.0}),
        ({"a": 1}, {"a": True}),
        ({"a": [0.0]}, {"a": [-0.0]}),
    ],
)
def test_equal_values_that_differ_are_a_change(old: Any, new: Any) -> None:
    assert old == new  # what ``==`` alone took for no change
    assert not same_value(old, new) and not same_value(new, old)
    assert changed_keys({"k": old}, {"k": new}) == {"k": new}
    assert same_value(new, json.loads(json.dumps(new)))
    assert changed_keys({"k": new}, {"k": json.loads(json.dumps(new))}) == {}


def test_a_zero_that_changes_sign_reaches_the_process(etcd: EtcdServer, tmp_path: Path) -> None:
    """``set x=0.0`` over ``-0.0``, and ``[-0.0]`` over ``[0.0]``: written, and pushed. Once
    ``set`` said "nothing to do" for the first, and a ``set x=0`` that did write it was
    never pushed: the process ran ``-0.0`` while ``get`` said ``0.0``."""
    extra = ["--schema", SCHEMA]
    env = {"PYTHONPATH": ROOT}
    with (
        DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=extra, env=env) as daemon,
        RawClient(daemon.socket_path) as client,
    ):
        live = LiveConfig.connect(str(daemon.socket_path), timeout=10, client="fid")
        try:
            _set(etcd, "x=-0.0")
            assert _sign(client.next_update()["changed"]["x"]) == -1.0
            done = _set(etcd, "x=0.0")
            assert "nothing to do" not in done.stdout, done.stdout
            assert _stored(etcd, "x") == "0.0"
            assert _sign(client.next_update()["changed"]["x"]) == 1.0
            _set(etcd, "xs=[0.0, 1.5]")
            client.next_update()
            _set(etcd, "xs=[-0.0, 1.5]")
            assert [_sign(v) for v in client.next_update()["changed"]["xs"]] == [-1.0, 1.0]
            _set(etcd, 'anything={"a": 1}')
            client.next_update()
            _set(etcd, 'anything={"a": true}')
            assert client.next_update()["changed"] == {"anything": {"a": True}}
            _eventually(lambda: live.apply(1) or live["anything"]["a"] is True)
            assert _sign(live["x"]) == 1.0 and type(live["x"]) is float
            assert [_sign(v) for v in live["xs"]] == [-1.0, 1.0]
        finally:
            live.close()
        got = _cli(etcd, "get", "--json")
        assert got.returncode == 0, got.stderr
        shown = json.loads(got.stdout)
        assert _sign(shown["x"]) == 1.0 and [_sign(v) for v in shown["xs"]] == [-1.0, 1.0]


def _stored(etcd: EtcdServer, key: str) -> str:
    done = etcd.etcdctl("get", "--print-value-only", f"/hotknob/{APP}/config/{key}")
    return str(done.stdout).strip()


def _revision(etcd: EtcdServer, done: Any) -> int:
    return int(done.stdout.split("at revision ")[1].split()[0])


def test_rollback_restores_a_zero_sign_and_the_type_inside_a_mapping(etcd: EtcdServer) -> None:
    """Rollback compared the values with ``!=``: to a revision of ``-0.0`` from ``0.0``, it
    left ``x`` out; to ``{"a": 1}`` from ``{"a": true}``, it said "nothing to do"."""
    then = _revision(etcd, _set(etcd, "x=-0.0", 'anything={"a": 1}'))
    _set(etcd, "x=0.0", 'anything={"a": true}')
    done = _cli(etcd, "rollback", "--to-revision", str(then))
    assert done.returncode == 0, done.stderr
    assert "nothing to do" not in done.stdout, done.stdout
    stored = {key: _stored(etcd, key) for key in ("x", "anything")}
    assert stored == {"x": "-0.0", "anything": '{"a":1}'}
    again = _cli(etcd, "rollback", "--to-revision", str(then))
    assert "nothing to do" in again.stdout, again.stdout


def test_json_output_holds_no_infinity_for_a_value_put_too_large(etcd: EtcdServer) -> None:
    """``etcdctl put`` of ``1e999`` (read as infinity, refused by every daemon): ``history
    --json`` and ``set --dry-run --json`` printed ``Infinity``, which is no JSON."""
    _set(etcd, "x=0.5")
    etcd.etcdctl("put", f"/hotknob/{APP}/config/x", "1e999")
    etcd.etcdctl("put", f"/hotknob/{APP}/config/xs", "[1, -1e999]")
    history = _cli(etcd, "history", "--json")
    assert history.returncode == 0, history.stderr
    values = [entry["value"] for entry in _strict_json(history.stdout)["entries"]]
    assert values == ["[1, -1e999]", "1e999", 0.5]
    dry = _cli(etcd, "set", "x=1.5", "xs=[2]", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    diff = _strict_json(dry.stdout)
    assert (diff["x"]["old"], diff["x"]["new"]) == ("Infinity", 1.5)
    assert (diff["xs"]["old"], diff["xs"]["new"]) == ("[1,-Infinity]", [2])


@pytest.mark.parametrize("tail", ["", "  #\tcomment"], ids=["libyaml", "python"])
def test_yaml_reads_a_number_with_an_exponent_as_every_layer_does(
    tmp_path: Path, tail: str
) -> None:
    """YAML 1.1 read ``1e-3`` (no '.', or an exponent without a sign) as the text "1e-3":
    a field of ``int`` refused ``n: 1e3``, which ``--set n=1e3`` takes as 1000, and a field
    of ``object`` held text where every other layer gives the number."""
    path = tmp_path / "conf.yaml"
    path.write_text(
        f"n: 1e3\nx: -2.5e-3\nxs: [1e-3, 6.02e23, 1.0e3, 1.0e+3]\nanything: {{a: 1e-3}}{tail}\n"
    )
    read = read_config_file(path)
    assert read == {
        "n": 1000.0,
        "x": -0.0025,
        "xs": [0.001, 6.02e23, 1000.0, 1000.0],
        "anything": {"a": 0.001},
    }
    # Not numbers in JSON either, these stay text; so does what is quoted.
    path.write_text(f"anything: {{a: .5e3, b: +1e3, c: 01e3, d: 1_0e3, e: '1e3'}}{tail}\n")
    assert read_config_file(path)["anything"] == {
        "a": ".5e3",
        "b": "+1e3",
        "c": "01e3",
        "d": "1_0e3",
        "e": "1e3",
    }
    assert yaml.safe_load("a: 1e3") == {"a": "1e3"}  # PyYAML's own loader is left as it is
    path.write_text(f"n: 1e3\nanything: {{a: 1e-3}}{tail}\n")
    file_got = run_cli(
        "get",
        "--json",
        "--schema",
        SCHEMA,
        "--config",
        str(path),
        env={"PYTHONPATH": ROOT},
        drop="HOTKNOB_",
    )
    set_got = run_cli(
        "get",
        "--json",
        "--schema",
        SCHEMA,
        "--set",
        "n=1e3",
        "--set",
        'anything={"a": 1e-3}',
        env={"PYTHONPATH": ROOT},
        drop="HOTKNOB_",
    )
    assert file_got.returncode == 0, file_got.stderr
    assert set_got.returncode == 0, set_got.stderr
    assert json.loads(file_got.stdout) == json.loads(set_got.stdout)
    assert json.loads(file_got.stdout)["anything"] == {"a": 0.001}
