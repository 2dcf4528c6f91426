"""Odd input that must never reach a client nor stop the daemon.

Text that is not valid Unicode: JSON allows a lone surrogate (``"\\ud800"``) and Python
carries a byte that is not UTF-8 in an environment variable or an argument as one, but
UTF-8 cannot carry it, so no protocol line holding it can be written. Every layer refuses
it where it reads it, with a problem naming the key and the layer.

etcd paths that are not keys: one key has one path (``train.lr`` is ``train/lr``).
``train.lr``, ``train/lr/`` or ``//train/lr`` are not read as that key (deleting one of
them would drop a value another still holds); they are ignored, and said to be.

And the engine: a push that raises leaves its layers and snapshot whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from hotknob.config import (
    InvalidChange,
    LayerError,
    cli_layer,
    defaults_layer,
    env_layer,
    etcd_layer,
    files_layer,
    merge_layers,
    read_config_file,
)
from hotknob.config.dropping_invalid import merge_dropping_invalid
from hotknob.config.merge import DEFAULT_PRECEDENCE
from hotknob.config.schema import TrainParams
from hotknob.config.sources import parse_assignment
from hotknob.daemon.engine import Engine
from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.daemon.published import Published
from hotknob.daemon.state import StateStore
from hotknob.model_runtime import protocol
from hotknob.model_runtime.protocol import ProtocolError
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer

APP = "odd"
P = f"/hotknob/{APP}/config/"


class Extra(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = "x"
    weights: dict[str, float] = Field(default_factory=dict)


class Named(BaseModel):
    """A text field and a dict-typed one, where a lone surrogate could hide."""

    model_config = ConfigDict(extra="forbid")

    train: TrainParams = Field(default_factory=TrainParams)
    extra: Extra = Field(default_factory=Extra)


class Mangled(BaseModel):
    """A schema whose own validator makes a lone surrogate out of valid text."""

    model_config = ConfigDict(extra="forbid")

    name: str = "x"

    @field_validator("name")
    @classmethod
    def _mangle(cls, value: str) -> str:
        return value + "\ud800" if value == "mangle" else value


def merged(schema: type[BaseModel], *layers: Any) -> Any:
    return merge_layers(schema, [defaults_layer(schema), *layers], DEFAULT_PRECEDENCE)


def problems_of(exc: pytest.ExceptionInfo[InvalidChange]) -> list[tuple[str, str]]:
    return [(p.key, p.layer) for p in exc.value.problems]


# --- lone surrogates, layer by layer -----------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "text", "key"),
    [
        ("extra/name", '"\\ud800"', "extra.name"),
        ("extra/name", '"a\\udfffb"', "extra.name"),
        ("extra/name", '  "\\udc80"  ', "extra.name"),
        ("extra/weights", '{"\\udc00": 1.0}', "extra.weights"),
        ("extra/weights/k", '"\\ud800"', "extra.weights.k"),
    ],
)
def test_an_etcd_value_with_a_lone_surrogate_is_a_problem_of_its_key(
    path: str, text: str, key: str
) -> None:
    with pytest.raises(InvalidChange) as err:
        merged(Named, etcd_layer(APP, {P + path: text.encode()}))
    assert problems_of(err) == [(key, "etcd")]
    assert "not valid text (a lone surrogate)" in str(err.value)


def test_a_surrogate_pair_is_valid_text() -> None:
    snapshot = merged(Named, etcd_layer(APP, {P + "extra/name": b'"\\ud83d\\ude00"'}))
    assert snapshot.flat["extra.name"] == "\U0001f600"


@pytest.mark.parametrize(
    ("environ", "key"),
    [
        ({"HOTKNOB_PARAM_EXTRA__NAME": '"\\ud800"'}, "extra.name"),
        ({"HOTKNOB_PARAM_EXTRA__NAME": "caf\udce9"}, "extra.name"),  # byte 0xe9, not UTF-8
        ({"HOTKNOB_PARAM_EXTRA__WEIGHTS": '{"\\ud800": 1}'}, "extra.weights"),
    ],
)
def test_an_env_value_with_a_lone_surrogate_is_a_problem_of_its_key(
    environ: dict[str, str], key: str
) -> None:
    with pytest.raises(InvalidChange) as err:
        merged(Named, env_layer(Named, environ=environ))
    assert problems_of(err) == [(key, "env")]
    assert "lone surrogate" in str(err.value)


@pytest.mark.parametrize("text", ['extra.name="\\ud800"', "extra.name=caf\udce9"])
def test_a_set_value_with_a_lone_surrogate_is_a_problem_of_its_key(text: str) -> None:
    with pytest.raises(InvalidChange) as err:
        merged(Named, cli_layer([text]))
    assert problems_of(err) == [("extra.name", "cli")]
    with pytest.raises(InvalidChange, match="lone surrogate"):
        parse_assignment(text)  # what ``hotknob set`` reads its pairs with


@pytest.mark.parametrize(
    ("name", "text", "key"),
    [
        ("c.json", '{"extra": {"name": "\\ud800"}}', "extra.name"),
        ("c.json", '{"extra": {"weights": {"\\udc00": 1}}}', "extra.weights.\\udc00"),
        ("c.yaml", 'extra:\n  name: "\\ud800"\n', "extra.name"),
        ("c.yaml", 'extra:\n  name: ["ok", "\\U0000dfff"]\n', "extra.name"),
    ],
)
def test_a_config_file_with_a_lone_surrogate_is_refused(
    tmp_path: Path, name: str, text: str, key: str
) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(LayerError) as err:
        read_config_file(path)
    assert err.value.layer == "files"
    assert err.value.key == key
    assert str(err.value) == f"{path}: {key}: not valid text (a lone surrogate)"


def test_a_lone_surrogate_a_validator_makes_is_refused_by_the_merge() -> None:
    with pytest.raises(InvalidChange) as err:
        merged(Mangled, cli_layer(["name=mangle"]))
    assert problems_of(err) == [("name", "cli")]
    assert "lone surrogate" in str(err.value)


def test_protocol_encode_refuses_a_lone_surrogate_with_a_protocol_error() -> None:
    message = protocol.update(2, 3, {"extra.name": "\ud800"}, {"extra": {"name": "\ud800"}})
    with pytest.raises(ProtocolError, match="lone surrogate"):
        protocol.encode(message)


# --- the engine --------------------------------------------------------------------------------


def make_engine(
    tmp_path: Path, published: list[Published], schema: type[BaseModel] = Named
) -> Engine:
    def publish(state: Published) -> None:
        protocol.encode(protocol.snapshot(state.version, state.revision, state.values, {}))
        published.append(state)

    return Engine(
        schema=schema,
        app=APP,
        precedence=DEFAULT_PRECEDENCE,
        layers=[
            defaults_layer(schema),
            env_layer(schema, environ={}),
            cli_layer([]),
            files_layer(schema, []),
        ],
        store=StateStore(tmp_path, APP),
        publish=publish,
    )


def test_engine_starts_without_a_lone_surrogate_it_finds_in_etcd(tmp_path: Path) -> None:
    published: list[Published] = []
    engine = make_engine(tmp_path, published)
    engine.start({P + "extra/name": b'"\\ud800"', P + "train/lr": b"0.2"}, 3)
    assert published[-1].flat["train.lr"] == 0.2
    assert published[-1].flat["extra.name"] == "x"
    assert "extra.name" not in engine.layers["etcd"].values


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("extra/name", b'"\\ud800"'),
        ("extra/weights", b'{"\\ud800": 1}'),
        ("extra/weights/\udcff", b"1.0"),  # a key not UTF-8, as the etcd adapter decodes it
    ],
)
def test_engine_rejects_a_live_lone_surrogate_and_takes_later_changes(
    tmp_path: Path, path: str, raw: bytes
) -> None:
    published: list[Published] = []
    engine = make_engine(tmp_path, published)
    engine.start({P + "train/lr": b"0.2"}, 3)
    engine.on_etcd_change(4, {P + path: raw}, [])
    assert engine.version == 1 and len(published) == 1
    engine.on_etcd_change(5, {P + "train/lr": b"0.3"}, [])
    assert engine.version == 2
    assert published[-1].flat["train.lr"] == 0.3
    assert published[-1].flat["extra.name"] == "x" and published[-1].flat["extra.weights"] == {}


class PushFails(Exception):
    pass


@pytest.mark.parametrize("short_path", [True, False])
def test_a_push_that_raises_leaves_no_torn_state(tmp_path: Path, short_path: bool) -> None:
    """The push of an accepted change raises: the engine's layers and snapshot are still
    those of the state it accepted, so the next change starts from what etcd holds."""
    published: list[Published] = []
    events: list[dict[str, Any]] = []
    fail = [False]

    def publish(state: Published) -> None:
        if fail[0]:
            fail[0] = False
            raise PushFails()
        published.append(state)

    engine = Engine(
        schema=Named,
        app=APP,
        precedence=DEFAULT_PRECEDENCE,
        layers=[defaults_layer(Named), env_layer(Named, environ={}), cli_layer([])],
        store=StateStore(tmp_path, APP),
        publish=publish,
        broadcast=events.append,
    )
    engine.layers["files"] = files_layer(Named, [])
    engine.start({P + "train/lr": b"0.1", P + "train/momentum": b"0.5"}, 3)
    fail[0] = True
    # A lone put takes the short path; one with a delete, the general path.
    deletes = [] if short_path else [P + "nothing/here"]
    with pytest.raises(PushFails):
        engine.on_etcd_change(4, {P + "train/lr": b"0.2"}, deletes)
    assert engine.version == 2
    assert engine.layers["etcd"].values["train.lr"] == 0.2
    assert engine.snapshot is not None and engine.snapshot.flat["train.lr"] == 0.2
    assert engine.current is not None and engine.current.flat["train.lr"] == 0.2
    accepted = [e for e in events if e.get("event") == "change_accepted"]
    assert [e["version"] for e in accepted] == [2]  # announced though its push failed
    engine.on_etcd_change(5, {}, [P + "train/momentum"])  # the general path, from there
    assert published[-1].version == 3
    assert published[-1].flat["train.lr"] == 0.2
    assert published[-1].flat["train.momentum"] == TrainParams().momentum


# --- etcd paths that are not keys --------------------------------------------------------------

ALIASES = ["train.lr", "train/lr/", "//train/lr", "train//lr", "", "extra/weights/a.b"]


@pytest.mark.parametrize("alias", ALIASES)
def test_an_etcd_path_that_is_not_a_key_is_a_problem_of_that_path(alias: str) -> None:
    layer = etcd_layer(APP, {P + alias: b"0.2"})
    assert dict(layer.values) == {}
    assert [(p.key, p.layer) for p in layer.problems] == [(P + alias, "etcd")]
    assert layer.problems[0].reason.startswith("not a key of the schema: ")


def test_an_etcd_path_that_is_not_utf8_is_shown_by_its_bytes() -> None:
    layer = etcd_layer(APP, {P + "extra/weights/\udcff": b"1"})
    assert dict(layer.values) == {}
    assert [p.key for p in layer.problems] == [P + "extra/weights/\\xff"]
    assert "not valid UTF-8" in layer.problems[0].reason


@pytest.mark.parametrize("alias", ["train.lr", "train/lr/", "//train/lr"])
@pytest.mark.parametrize("alias_first", [True, False])
def test_a_full_read_takes_the_key_and_drops_its_alias(alias: str, alias_first: bool) -> None:
    kvs = {P + alias: b"0.2", P + "train/lr": b"0.1"}
    if not alias_first:
        kvs = dict(reversed(kvs.items()))
    layers = [defaults_layer(Named), etcd_layer(APP, kvs)]
    snapshot, dropped = merge_dropping_invalid(Named, layers, DEFAULT_PRECEDENCE)
    assert snapshot.flat["train.lr"] == 0.1
    assert [(p.key, p.layer) for p in dropped] == [(P + alias, "etcd")]


def test_engine_never_takes_an_alias_for_its_key(tmp_path: Path) -> None:
    published: list[Published] = []
    engine = make_engine(tmp_path, published)
    engine.start({P + "train/lr": b"0.1"}, 3)
    for revision, alias in enumerate(["train.lr", "train/lr/", "//train/lr"], start=4):
        engine.on_etcd_change(revision, {P + alias: b"0.2"}, [])  # ignored
        engine.on_etcd_change(revision, {}, [P + alias])  # deleting it changes nothing
    assert engine.version == 1 and len(published) == 1
    assert engine.snapshot is not None and engine.snapshot.flat["train.lr"] == 0.1
    assert dict(engine.layers["etcd"].values) == {"train.lr": 0.1}


# --- through real etcd, a real daemon and the CLI ----------------------------------------------

SCHEMA = ["--schema", "tests.secret_schema:Params"]  # ``service.url`` is a text field


def test_daemon_and_cli_with_lone_surrogates_and_aliases_in_etcd(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    etcd.etcdctl("put", P + "service/url", '"\\ud800"')
    etcd.etcdctl("put", P + "train/lr", "0.1")
    etcd.etcdctl("put", P + "train.lr", "0.2")
    with DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=SCHEMA) as daemon:
        with RawClient(daemon.socket_path) as client:
            values = client.snapshot["values"]
            assert values["train"]["lr"] == 0.1
            assert values["service"]["url"] == "http://localhost:8000"
            version = client.snapshot["version"]
            etcd.etcdctl("put", P + "service/url", '"http://\\udfff"')  # rejected
            etcd.etcdctl("put", P + "train/lr/", "0.3")  # ignored
            etcd.etcdctl("del", P + "train.lr")  # changes nothing
            etcd.etcdctl("put", P + "train/lr", "0.05")
            update = client.next_update()
            assert update["version"] == version + 1
            assert update["changed"] == {"train.lr": 0.05}
            # One transaction: the key is applied, the path beside it that is no key ignored.
            store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,)))
            try:
                store.commit({P + "train/momentum": "0.5", P + "train//weight_decay": "0.1"})
            finally:
                store.close()
            update = client.next_update()
            assert update["version"] == version + 2
            assert update["changed"] == {"train.momentum": 0.5}
        with RawClient(daemon.socket_path, name="late") as late:
            assert late.snapshot["values"]["train"]["lr"] == 0.05
            assert late.snapshot["values"]["train"]["weight_decay"] == 0.0
        rejected = " ".join(e["reason"] for e in daemon.events("change_rejected"))
        assert rejected.startswith("service.url (from etcd): not valid text (a lone surrogate)")
        assert "not a key of the schema" not in rejected
        ignored = [(e["path"], e["reason"]) for e in daemon.events("etcd_path_ignored")]
        assert [path for path, _ in ignored] == [
            P + "train.lr",
            P + "train/lr/",
            P + "train//weight_decay",
        ]
        assert all(reason.startswith("not a key of the schema: ") for _, reason in ignored)
        assert daemon.proc is not None and daemon.proc.poll() is None
        assert "Traceback" not in daemon.log()

    common = ["--app", APP, "--etcd-endpoints", etcd.endpoint, *SCHEMA]
    got = run_cli("get", *common, "train.lr", "--json")
    assert got.returncode == 0, got.stderr
    assert json.loads(got.stdout) == 0.05
    assert f"ignoring etcd value of {P}train/lr/: not a key of the schema" in got.stderr
    assert "ignoring etcd value of service.url: not valid text (a lone surrogate)" in got.stderr

    done = run_cli("set", *common, 'service.url="\\ud800"')
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.strip().splitlines() == [
        "hotknob: service.url (from cli): not valid text (a lone surrogate)"
    ]
    url = etcd.etcdctl("get", P + "service/url", "--print-value-only").stdout.strip()
    assert url == '"http://\\udfff"'  # what was there: nothing written
