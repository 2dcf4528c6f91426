"""The layers changing under a running daemon: what the process gets at each step, and
what ``explain`` says of it, with a real etcd and a real daemon."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(60)

APP = "moves"
SCHEMA = "tests.test_review_transitions:Weighted"
ROOT = str(Path(__file__).resolve().parent.parent)


class _Opt(BaseModel):
    beta: float = 0.5


class Weighted(BaseModel):
    """A schema with a plain leaf, a mapping leaf and an optional model, which layers may
    split."""

    lr: float = 0.1
    weights: dict[str, float] = {"head": 1.0}
    opt: _Opt | None = None


def _explain(etcd: EtcdServer, config: Path, key: str) -> dict[str, Any]:
    """``hotknob explain KEY --json``'s row of ``key``, read as the daemon reads it."""
    done = run_cli(
        "explain",
        key,
        "--json",
        "--app",
        APP,
        "--schema",
        SCHEMA,
        "--config",
        str(config),
        "--etcd-endpoints",
        etcd.endpoint,
        env={"PYTHONPATH": ROOT},
        drop="HOTKNOB_",
    )
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)["keys"]
    return next(row for row in rows if row["key"] == key)


def _daemon(tmp_path: Path, etcd: EtcdServer, config: Path) -> DaemonProcess:
    return DaemonProcess(
        tmp_path,
        app=APP,
        endpoints=etcd.endpoint,
        configs=[config],
        extra=["--schema", SCHEMA],
        env={"PYTHONPATH": ROOT},
    )


def test_a_file_mapping_beside_an_etcd_key_inside_it_is_not_marked_shadowed(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    # The file gives ``weights`` {tail: 3}, etcd ``weights.head``: the process runs both,
    # and removing the file's ``tail`` would change what it runs. ``explain`` marked the
    # file's value "shadowed by a higher layer: it has no effect", since etcd is the
    # mapping's FROM.
    config = tmp_path / "c.yaml"
    config.write_text("weights:\n  tail: 3.0\n")
    with _daemon(tmp_path, etcd, config) as daemon, RawClient(daemon.socket_path) as client:
        etcd.etcdctl("put", f"/hotknob/{APP}/config/weights/head", "4")
        update = client.next_update()
        assert update["changed"] == {"weights": {"tail": 3.0, "head": 4.0}}
        row = _explain(etcd, config, "weights")
    assert row["value"] == update["values"]["weights"]
    assert row["from"] == "etcd"
    assert row["layers"]["files"] == {"tail": 3.0}
    assert row["shadowed"] == []


def test_a_file_mapping_whose_key_etcd_sets_is_still_marked_shadowed(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    # The file's ``head`` has no effect while etcd sets ``weights.head``: its edit is a
    # shadowed one, which ``explain`` marks.
    config = tmp_path / "c.yaml"
    config.write_text("weights:\n  head: 2.0\n  tail: 3.0\n")
    etcd.etcdctl("put", f"/hotknob/{APP}/config/weights/head", "4")
    row = _explain(etcd, config, "weights")
    assert row["value"] == {"head": 4.0, "tail": 3.0}
    assert row["shadowed"] == ["files"]


def test_a_file_null_an_etcd_key_inside_replaces_is_marked_shadowed(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    # ``opt.beta`` in etcd turns the file's ``opt: null`` into a model: nothing of the
    # file's value is left in force.
    config = tmp_path / "c.yaml"
    config.write_text("opt: null\n")
    etcd.etcdctl("put", f"/hotknob/{APP}/config/opt/beta", "0.9")
    row = _explain(etcd, config, "opt")
    assert row["value"] == {"beta": 0.9}
    assert row["shadowed"] == ["files"]


def test_a_process_that_connects_after_a_key_moved_layer_is_told_its_new_source(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    # ``set lr=0.3`` over a file's ``lr: 0.3`` moves the key to etcd without changing its
    # value: the state in force is published again at its version, with etcd as the
    # source. The server kept the snapshot it had encoded for that version, so a process
    # connecting later was told ``files``, as ``explain`` was not.
    config = tmp_path / "c.yaml"
    config.write_text("lr: 0.3\n")
    with _daemon(tmp_path, etcd, config) as daemon:
        with RawClient(daemon.socket_path, name="before") as before:
            assert before.snapshot["sources"]["lr"] == "files"
        etcd.etcdctl("put", f"/hotknob/{APP}/config/lr", "0.3")
        deadline = time.monotonic() + 10
        while True:
            with RawClient(daemon.socket_path, name="after") as after:
                source = after.snapshot["sources"]["lr"]
            if source == "etcd" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert source == "etcd"
    assert after.snapshot["values"]["lr"] == 0.3
    assert _explain(etcd, config, "lr")["from"] == "etcd"


def _set(etcd: EtcdServer, *assignments: str) -> Any:
    return run_cli(
        "set",
        *assignments,
        "--app",
        APP,
        "--schema",
        SCHEMA,
        "--etcd-endpoints",
        etcd.endpoint,
        env={"PYTHONPATH": ROOT},
        drop="HOTKNOB_",
    )


def test_an_env_key_inside_a_mapping_pins_that_key_not_the_whole_mapping(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    # ``HOTKNOB_PARAM_WEIGHTS__TAIL`` holds ``weights.tail`` on that daemon; an etcd value of
    # ``weights`` still reaches its process for every other key. The daemon published
    # ``weights`` as pinned (the mapping's source is env), so ``set weights=...`` warned
    # that it had no effect there, and ``set --wait`` could skip that process.
    config = tmp_path / "c.yaml"
    config.write_text("lr: 0.1\n")
    daemon = DaemonProcess(
        tmp_path,
        app=APP,
        endpoints=etcd.endpoint,
        configs=[config],
        extra=["--schema", SCHEMA, "--node", "n1"],
        env={"PYTHONPATH": ROOT, "HOTKNOB_PARAM_WEIGHTS__TAIL": "2"},
    )
    with daemon, RawClient(daemon.socket_path, name="p1") as client:
        client.send({"type": "applied", "version": client.snapshot["version"], "step": 1})
        deadline = time.monotonic() + 10
        status = f"/hotknob/{APP}/status/"
        while not etcd.etcdctl("get", "--prefix", status, "--keys-only").stdout.strip():
            assert time.monotonic() < deadline, "no status entry"
            time.sleep(0.05)
        whole = _set(etcd, 'weights={"a": 1}')
        update = client.next_update()
        inside = _set(etcd, "weights.tail=5")
    assert whole.returncode == 0, whole.stderr
    assert update["values"]["weights"] == {"a": 1.0, "tail": 2.0}  # it took effect there
    assert "held by the env layer" not in whole.stderr, whole.stderr
    assert inside.returncode == 0, inside.stderr
    assert "weights.tail is held by the env layer" in inside.stderr, inside.stderr
