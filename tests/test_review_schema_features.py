"""User schemas with less common pydantic features, as a review drove them end to end:
a ``set`` field sent by two daemons (two nodes) of one job, and a non-finite number
given to a field of ``Any`` (which pydantic dumps as null).

Unit tests on the merge, and real daemons with a real etcd.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field

from hotknob.config import InvalidChange, merge_layers
from hotknob.config.files import read_config_file
from hotknob.config.sources import Layer, defaults_layer, files_layer
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(60)

APP = "rsf"
P = f"/hotknob/{APP}/config/"
SCHEMA = "tests.test_review_schema_features:Tagged"


class Tagged(BaseModel):
    """Leaves of plain types only, so that a lone etcd put takes the engine's short path."""

    tags: set[str] = Field(default_factory=set)
    ids: frozenset[int] = frozenset()
    extra: Any = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    n: int = 1


class Nested(BaseModel):
    inner: Tagged = Field(default_factory=Tagged)
    by_name: dict[str, set[str]] = Field(default_factory=dict)


def _merge(schema: type[BaseModel], *layers: Layer) -> Any:
    return merge_layers(schema, [defaults_layer(schema), *layers])


# --- sets: one order, whatever the process's hash seed -----------------------------------------


def test_a_set_dumps_in_sorted_order_at_every_depth() -> None:
    cli = Layer(
        "cli",
        {
            "inner.tags": ["pear", "apple", "fig", "kiwi"],
            "inner.ids": [9, 8, 1, 10],
            "by_name": {"a": ["z", "y", "x"]},
        },
    )
    snap = _merge(Nested, cli)
    assert snap.values["inner"]["tags"] == ["apple", "fig", "kiwi", "pear"]
    assert snap.values["inner"]["ids"] == [1, 8, 9, 10]  # by value: {8, 1} iterates as 8, 1
    assert snap.flat["by_name"] == {"a": ["x", "y", "z"]}
    assert snap.flat["inner.tags"] is snap.values["inner"]["tags"]


def _daemon(tmp_path: Path, name: str, etcd: EtcdServer, **env: str) -> DaemonProcess:
    workdir = tmp_path / name
    workdir.mkdir()
    return DaemonProcess(
        workdir, app=APP, endpoints=etcd.endpoint, extra=["--schema", SCHEMA], env=env
    ).start()


def test_two_daemons_send_a_set_as_one_list(tmp_path: Path, etcd: EtcdServer) -> None:
    """Two nodes' daemons hash text with different seeds: each sent its set's iteration
    order, so the ranks of one job held different values for one etcd revision (and a
    restarted daemon sent a change of nothing)."""
    etcd.etcdctl("put", P + "tags", json.dumps(["alpha", "beta", "gamma", "delta", "eps"]))
    first = _daemon(tmp_path, "n1", etcd, PYTHONHASHSEED="1")
    second = _daemon(tmp_path, "n2", etcd, PYTHONHASHSEED="2")
    try:
        clients = [RawClient(first.socket_path), RawClient(second.socket_path)]
        sent = [client.snapshot["values"]["tags"] for client in clients]
        assert sent == [["alpha", "beta", "delta", "eps", "gamma"]] * 2
        # A lone put: the engine's short path validates and dumps the leaf alone.
        etcd.etcdctl("put", P + "tags", json.dumps(["x", "y", "z", "w", "v"]))
        updates = [client.next_update() for client in clients]
        assert [u["values"]["tags"] for u in updates] == [["v", "w", "x", "y", "z"]] * 2
        assert [u["changed"] for u in updates] == [{"tags": ["v", "w", "x", "y", "z"]}] * 2
        for client in clients:
            client.close()
    finally:
        first.stop()
        second.stop()


# --- a number that is not finite, for a field of Any -------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("extra", float("inf")),
        ("extra", [1.0, float("-inf")]),
        ("kwargs.eps", float("inf")),
        ("kwargs", {"eps": float("nan")}),
    ],
)
def test_an_infinity_for_any_is_refused_not_sent_as_null(key: str, value: Any) -> None:
    with pytest.raises(InvalidChange) as caught:
        _merge(Tagged, Layer("cli", {key: value}))
    (problem,) = caught.value.problems
    assert (problem.key, problem.layer) == (key, "cli")
    assert "finite number" in problem.reason


def test_a_yaml_inf_in_a_mapping_of_any_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("kwargs:\n  eps: .inf\n  beta: 0.9\n")
    with pytest.raises(InvalidChange) as caught:
        _merge(Tagged, files_layer(Tagged, [(path, read_config_file(path))]))
    (problem,) = caught.value.problems
    assert (problem.key, problem.layer, problem.origin) == ("kwargs", "files", str(path))
    assert "finite number" in problem.reason


def test_the_daemon_refuses_an_etcd_infinity_for_any(tmp_path: Path, etcd: EtcdServer) -> None:
    """``1e999`` read from etcd is infinity; a field of ``Any`` dumped it as null, so the
    daemon took it (no change logged, the processes ran null) where a float is refused."""
    daemon = _daemon(tmp_path, "n1", etcd)
    try:
        client = RawClient(daemon.socket_path)
        etcd.etcdctl("put", P + "extra", "1")
        assert client.next_update()["changed"] == {"extra": 1}
        etcd.etcdctl("put", P + "extra", "1e999")  # a lone put: the short path
        etcd.etcdctl("put", "--", P + "kwargs/eps", "-1e999")
        etcd.etcdctl("put", P + "n", "2")  # the daemon is alive and goes on
        update = client.next_update()
        assert update["changed"] == {"n": 2}
        assert update["values"]["extra"] == 1 and update["values"]["kwargs"] == {}
        rejected = {e["key"]: e["reason"] for e in daemon.events("change_rejected")}
        assert set(rejected) == {"extra", "kwargs.eps"}
        assert all("finite number" in reason for reason in rejected.values())
        client.close()
    finally:
        daemon.stop()
