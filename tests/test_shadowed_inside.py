"""An edit inside a mapping that a layer gives whole, of a key a higher layer sets alone.

A config file gives ``weights`` whole; etcd sets ``weights.head``. Editing the file's
``head`` changes nothing the process runs: it is a shadowed edit, ``update_shadowed``
with the key inside the mapping, as an edit of a key a higher layer sets always was.
Editing the file's ``tail`` takes effect and warns of nothing. Before, the daemon
compared the file's mapping whole, which no higher layer gives, and warned of neither.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from hotknob.config import cli_layer, defaults_layer, env_layer, files_layer
from hotknob.config.changes import edits_inside
from hotknob.config.merge import DEFAULT_PRECEDENCE
from hotknob.daemon.engine import Engine
from hotknob.daemon.socket_server import Published
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer
from tests.test_guards import wait_for
from tests.test_review_transitions import APP, Weighted, _daemon

pytestmark = pytest.mark.timeout(60)

P = f"/hotknob/{APP}/config/"


def test_the_keys_inside_a_mapping_that_an_edit_changed() -> None:
    old = {"head": 1.0, "tail": 2.0, "deep": {"a": 1, "b": {"c": 2}}, "gone": 0}
    new = {"head": 1.0, "tail": 2, "deep": {"a": 1, "b": {"c": 3}}, "added": {"x": 1}}
    assert edits_inside("w", old, new) == {
        "w.tail": 2,  # 2.0 to 2: a change of type
        "w.deep.b.c": 3,
        "w.added": {"x": 1},
        "w.gone": None,
    }
    assert edits_inside("w", old, dict(old)) == {}


def _engine(published: list[Published], environ: dict[str, str]) -> Engine:
    engine = Engine(
        schema=Weighted,
        app=APP,
        precedence=DEFAULT_PRECEDENCE,
        layers=[
            defaults_layer(Weighted),
            env_layer(Weighted, environ=environ),
            cli_layer([]),
            files_layer(Weighted, []),
        ],
        store=None,
        publish=published.append,
    )
    engine.start({}, 1)
    return engine


def _shadowed(logs: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["key"], e["layer"], e["winner"]) for e in logs if e["event"] == "update_shadowed"]


def test_an_etcd_mapping_edited_inside_under_an_env_key_warns_of_that_key_only() -> None:
    published: list[Published] = []
    engine = _engine(published, {"HOTKNOB_PARAM_WEIGHTS__HEAD": "9"})
    try:
        engine.on_etcd_change(2, {P + "weights": b'{"head": 1.0, "tail": 2.0}'}, [])
        with capture_logs() as logs:
            engine.on_etcd_change(3, {P + "weights": b'{"head": 5.0, "tail": 2.0}'}, [])
        assert _shadowed(logs) == [("weights.head", "etcd", "env")]
        shadowed = next(e for e in logs if e["event"] == "update_shadowed")
        assert shadowed["value"] == 5.0 and shadowed["effective"] == 9.0, shadowed
        with capture_logs() as logs:
            engine.on_etcd_change(4, {P + "weights": b'{"head": 5.0, "tail": 3.0}'}, [])
        assert _shadowed(logs) == []
        assert engine.current is not None
        assert engine.current.flat["weights"] == {"head": 9.0, "tail": 3.0}
    finally:
        engine.close()


def test_a_file_mapping_edited_inside_under_an_etcd_key_warns_of_that_key_only(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("weights:\n  head: 2.0\n  tail: 3.0\n")
    etcd.etcdctl("put", P + "weights/head", "4")
    daemon: DaemonProcess
    with _daemon(tmp_path, etcd, config) as daemon, RawClient(daemon.socket_path) as client:
        assert client.snapshot["values"]["weights"] == {"head": 4.0, "tail": 3.0}
        config.write_text("weights:\n  head: 5.0\n  tail: 3.0\n")  # shadowed: nothing runs
        warned = wait_for("the shadowed edit", lambda: daemon.events("update_shadowed"))
        assert [(e["key"], e["layer"], e["winner"]) for e in warned] == [
            ("weights.head", "files", "etcd")
        ], warned
        assert warned[0]["value"] == 5.0 and warned[0]["effective"] == 4.0
        config.write_text("weights:\n  head: 5.0\n  tail: 6.0\n")  # takes effect
        update = client.next_update()
        assert update["changed"] == {"weights": {"head": 4.0, "tail": 6.0}}, update
        assert len(daemon.events("update_shadowed")) == 1, json.dumps(
            daemon.events("update_shadowed")
        )
