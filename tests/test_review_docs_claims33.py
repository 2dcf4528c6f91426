"""The thirty-third round's documented claims, run as a user follows them: the series a
daemon's ``/metrics`` serves against the list in docs/deploy.md, the fingerprint recipe
docs/protocol.md gives for ``held_digests``, and a restart-only key whose change ``==``
takes for none. Real etcd, real daemons."""

from __future__ import annotations

import hashlib
import json
import math
import re
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel, ConfigDict, Field

from hotknob.config.schema import RESTART_ONLY
from hotknob.model_runtime import protocol
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer, free_port
from tests.test_guards import wait_for

pytestmark = pytest.mark.timeout(60)

DOCS = Path(__file__).resolve().parent.parent / "docs"


class _Train(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lr: float = 0.001
    zero: float = Field(0.0, json_schema_extra=RESTART_ONLY)
    ids: list[float | int] = Field([1], json_schema_extra=RESTART_ONLY)


class Signed(BaseModel):
    """A schema whose restart-only keys can change in a way ``==`` does not see."""

    model_config = ConfigDict(extra="forbid")
    train: _Train = Field(default_factory=_Train)


def _documented_series() -> set[str]:
    """The series names deploy.md's paragraph on ``/metrics`` lists, with the ``_created``
    gauges it says come with each counter."""
    text = (DOCS / "deploy.md").read_text()
    start = text.index("Its series:")
    paragraph = text[start : text.index("\n\n", start)]
    names = set(re.findall(r"`(hotknob_[a-z_]+)", paragraph))
    if "`X_created`" in paragraph:
        names |= {n.removesuffix("_total") + "_created" for n in names if n.endswith("_total")}
    return names


def test_metrics_serves_the_series_deploy_md_lists_and_the_join_has_its_shape(
    tmp_path: Path,
) -> None:
    port = free_port()
    extra = ["--metrics-addr", f"127.0.0.1:{port}", "--node", "n1"]
    with DaemonProcess(tmp_path, app="trainer", extra=extra):
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
    families = list(text_string_to_metric_families(text))
    served = {s.name for f in families for s in f.samples} | {
        # A family with no sample yet (no process reported): its name as scraped.
        f.name
        for f in families
        if not f.samples
    }
    assert served == _documented_series(), text
    info = [s for f in families for s in f.samples if s.name == "hotknob_daemon_info"]
    # One series per target, at 1: ``on(instance)`` matches each series of the scrape
    # to exactly one, and ``*`` leaves its value as it was.
    assert [(s.labels, s.value) for s in info] == [({"app": "trainer", "node": "n1"}, 1.0)]
    # ``group_left(app)`` adds the label: no series of the daemon's own may carry one.
    assert not [
        s for f in families for s in f.samples if s.name != info[0].name and "app" in s.labels
    ]


def test_held_digest_is_the_recipe_protocol_md_gives() -> None:
    """What a client in another language reads there must give the daemon's digest: a
    float keeps its ``.0`` or exponent as Python writes it, text is not escaped."""

    def documented(value: Any) -> str:
        text = json.dumps(value, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
        return hashlib.blake2b(text.encode("utf-8"), digest_size=16).hexdigest()

    values: list[Any] = [1, 1.0, -0.0, 1e-05, 1e16, "é<>", {"b": [1.0, "\x01"], "a": None}]
    for value in values:
        assert protocol.held_digest(value) == documented(value), value
    assert protocol.held_digest(1) != protocol.held_digest(1.0)
    assert protocol.held_digest(1e-05) != hashlib.blake2b(b"1e-5", digest_size=16).hexdigest()
    text = (DOCS / "protocol.md").read_text()
    assert "ensure_ascii=False" in text and "`1e-05`" in text


def _next_event(watcher: RawClient) -> dict[str, Any]:
    message = watcher.next()
    while message["type"] != "event":
        message = watcher.next()
    return message


def test_a_restart_only_change_that_equals_the_running_value_is_held_and_said(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    """``0.0`` to ``-0.0`` and ``[1]`` to ``[1.0]`` of restart-only keys: said pending, as a
    wanted value of another type is, and never pushed live with the next change of
    another key."""
    prefix = "/hotknob/t/config/train"
    schema = ["--schema", f"{__name__}:Signed"]
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=schema) as daemon,
        RawClient(daemon.socket_path, watch=True) as watcher,
        RawClient(daemon.socket_path, name="trainer") as process,
    ):
        etcd.etcdctl("put", f"{prefix}/zero", "--", "-0.0")
        etcd.etcdctl("put", f"{prefix}/ids", "[1.0]")
        etcd.etcdctl("put", f"{prefix}/lr", "0.01")
        update = process.next_update()
        values = update["values"]["train"]
        assert values["lr"] == 0.01
        assert math.copysign(1.0, values["zero"]) == 1.0, values
        assert [type(i) for i in values["ids"]] == [int], values
        said = [_next_event(watcher) for _ in range(3)]
        assert [(e["event"], e.get("key")) for e in said[:2]] == [
            ("restart_pending", "train.zero"),
            ("restart_pending", "train.ids"),
        ], said
        wait_for(
            "both keys pending in the log",
            lambda: len(daemon.events("restart_pending")) == 2,
            timeout=5,
        )
