"""A schema whose own code raises (not a validation error) refuses the change clearly.

A before-validator handed a value of another type, a post-init or a computed field can
raise anything (``AttributeError``, ``ZeroDivisionError``); pydantic passes it on
naming no key. The merge names the key and layer to blame all the same, by trying each
value given at its default, and the daemon, the engine and the CLI treat it as any
other refusal: nothing invalid is pushed, nothing crashes.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import pytest
from pydantic import (
    BaseModel,
    SecretBytes,
    SecretStr,
    ValidationInfo,
    computed_field,
    field_validator,
    model_validator,
)
from structlog.testing import capture_logs

from hotknob.config import (
    InvalidChange,
    SchemaLoadError,
    cli_layer,
    defaults_layer,
    env_layer,
    etcd_layer,
    merge_layers,
)
from hotknob.config.dropping_invalid import merge_dropping_invalid
from hotknob.config.keys import config_prefix
from hotknob.config.merge import DEFAULT_PRECEDENCE
from hotknob.config.sources import Layer
from hotknob.daemon.engine import Engine
from hotknob.daemon.socket_server import Published
from hotknob.daemon.state import StateStore
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer
from tests.live_trainer import wait_for
from tests.raising_schema import (
    FactoryRaises,
    FactoryTakesData,
    OddRaises,
    Raising,
    RaisingAlways,
    RaisingRequired,
)

APP = "raises"
P = config_prefix(APP)
SCHEMA = ["--schema", "tests.raising_schema:Raising"]


def refused(*layers: Layer, schema: type = Raising) -> InvalidChange:
    with pytest.raises(InvalidChange) as info:
        merge_layers(schema, [defaults_layer(schema), *layers])
    return info.value


def etcd(values: dict[str, bytes]) -> Layer:
    return etcd_layer(APP, {P + path: raw for path, raw in values.items()})


@pytest.mark.parametrize(
    ("path", "raw", "raised"),
    [
        ("train/mode", b"3", "AttributeError: 'int' object has no attribute 'strip'"),
        ("train/lr", b"0", "ZeroDivisionError: float division by zero"),  # on the dump
    ],
)
def test_the_value_that_makes_the_schema_raise_is_named_with_its_layer(
    path: str, raw: bytes, raised: str
) -> None:
    good = {"train/warmup": b"5", "auth/user": b'"ada"'}
    exc = refused(etcd({**good, path: raw}), cli_layer(["train.cooldown=0"]))
    (problem,) = exc.problems
    key = path.replace("/", ".")
    assert (problem.key, problem.layer) == (key, "etcd")
    assert problem.reason == f"the schema's own code raised {raised}"
    assert str(problem) == f"{key} (from etcd): the schema's own code raised {raised}"


def test_two_values_that_raise_only_together_are_both_named() -> None:
    exc = refused(etcd({"train/warmup": b"5"}), cli_layer(["train.cooldown=3"]))
    assert {(p.key, p.layer) for p in exc.problems} == {
        ("train.warmup", "etcd"),
        ("train.cooldown", "cli"),
    }
    assert {p.reason for p in exc.problems} == {
        "the schema's own code raised TypeError: warmup and cooldown together"
    }


def test_two_values_that_each_raise_are_each_named_with_what_it_raised() -> None:
    values = {"train/mode": b"3", "train/lr": b"0", "train/warmup": b"5", "auth/user": b'"ada"'}
    exc = refused(etcd(values))
    assert sorted((p.key, p.reason) for p in exc.problems) == [
        ("train.lr", "the schema's own code raised ZeroDivisionError: float division by zero"),
        (
            "train.mode",
            "the schema's own code raised AttributeError: 'int' object has no attribute 'strip'",
        ),
    ]
    snap, dropped = merge_dropping_invalid(Raising, [defaults_layer(Raising), etcd(values)])
    assert sorted(p.key for p in dropped) == ["train.lr", "train.mode"]
    assert snap.flat["train.warmup"] == 5 and snap.flat["auth.user"] == "ada"


def test_a_rule_the_trials_break_does_not_move_the_blame() -> None:
    # Set back alone, ``total`` would break ``warmup <= total``: a validation error, which
    # hides the raise but does not make ``total`` its cause.
    values = {"train/total": b"1000", "train/warmup": b"500", "train/lr": b"0"}
    exc = refused(etcd(values))
    assert [(p.key, p.layer) for p in exc.problems] == [("train.lr", "etcd")]
    snap, dropped = merge_dropping_invalid(Raising, [defaults_layer(Raising), etcd(values)])
    assert [p.key for p in dropped] == ["train.lr"]
    assert (snap.flat["train.total"], snap.flat["train.warmup"]) == (1000, 500)


def test_a_required_value_is_kept_when_another_raises() -> None:
    live = etcd({"name": b'"resnet"', "lr": b"0"})
    exc = refused(live, schema=RaisingRequired)
    assert [(p.key, p.layer) for p in exc.problems] == [("lr", "etcd")]
    snap, dropped = merge_dropping_invalid(RaisingRequired, [defaults_layer(RaisingRequired), live])
    assert [p.key for p in dropped] == ["lr"]
    assert dict(snap.flat) == {"name": "resnet", "lr": 0.1, "inverse_lr": 10.0}


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("1", "RuntimeError: first line Traceback (most recent call last): second line"),
        ("2", "BadMessage"),  # its message cannot be made: the type says it
        ("3", "SystemExit: bye"),  # a validator's ``sys.exit()`` is no stop of the daemon
    ],
)
def test_an_awkward_exception_is_reported_on_one_line(value: str, reason: str) -> None:
    exc = refused(cli_layer([f"a={value}"]), schema=OddRaises)
    assert [(p.key, p.layer, p.reason) for p in exc.problems] == [
        ("a", "cli", f"the schema's own code raised {reason}")
    ]


def test_a_default_that_cannot_be_made_is_a_clear_schema_error() -> None:
    with pytest.raises(SchemaLoadError) as info:
        defaults_layer(FactoryRaises)
    assert str(info.value) == "the schema's default of a cannot be made: RuntimeError: factory boom"
    # A factory that takes the validated fields is pydantic's to call: no default here.
    assert dict(defaults_layer(FactoryTakesData).values) == {"a": 1}
    snap = merge_layers(FactoryTakesData, [defaults_layer(FactoryTakesData), cli_layer(["a=5"])])
    assert dict(snap.flat) == {"a": 5, "b": 2}
    exc = refused(cli_layer(["a=0"]), schema=FactoryTakesData)
    assert [(p.key, p.layer) for p in exc.problems] == [("a", "cli")]
    assert "ZeroDivisionError" in exc.problems[0].reason


def test_a_schema_that_raises_on_its_defaults_blames_no_value() -> None:
    exc = refused(cli_layer(["x=3"]), schema=RaisingAlways)
    (problem,) = exc.problems
    assert (problem.key, problem.layer) == ("", "defaults")
    assert "RuntimeError: this schema cannot be built" in problem.reason


def test_no_secret_is_quoted_in_the_reason() -> None:
    # Its own message, quoting the secret, is withheld for a secret key...
    exc = refused(etcd({"auth/token": b'"xsecret-value-99"'}))
    (problem,) = exc.problems
    assert (problem.key, problem.layer) == ("auth.token", "etcd")
    assert "KeyError" in problem.reason and "withheld" in problem.reason
    assert "xsecret-value-99" not in str(exc)
    # ...and masked in a message about another key.
    exc = refused(etcd({"auth/token": b'"tok-secret-5678"', "auth/user": b'"root"'}))
    assert [p.key for p in exc.problems] == ["auth.user"]
    assert "LookupError: root may not use **********" in exc.problems[0].reason
    assert "tok-secret-5678" not in str(exc)
    # ...also as validated: stripped and in upper case.
    exc = refused(etcd({"auth/token": b'" tok-secret-5678 "', "auth/user": b'"admin"'}))
    assert "LookupError: admin may not use **********" in exc.problems[0].reason
    assert "TOK-SECRET-5678" not in str(exc)


def test_dropping_invalid_drops_only_the_value_that_raises() -> None:
    live = etcd({"train/mode": b"3", "train/lr": b"0.5", "train/warmup": b"4"})
    snap, dropped = merge_dropping_invalid(Raising, [defaults_layer(Raising), live])
    assert [(p.key, p.layer) for p in dropped] == [("train.mode", "etcd")]
    assert snap.flat["train.lr"] == 0.5 and snap.flat["train.warmup"] == 4
    assert snap.flat["train.mode"] == "cosine"


def test_the_engine_rejects_the_change_and_keeps_going(tmp_path: Path) -> None:
    published: list[Published] = []
    engine = Engine(
        schema=Raising,
        app=APP,
        precedence=DEFAULT_PRECEDENCE,
        layers=[defaults_layer(Raising), env_layer(Raising, environ={}), cli_layer([])],
        store=StateStore(tmp_path, APP),
        publish=published.append,
        broadcast=[].append,
    )
    engine.start({P + "train/lr": b"0.5"}, 5)
    with capture_logs() as logs:
        engine.on_etcd_change(6, {P + "train/lr": b"0"}, [])  # a lone put: the short path
        engine.on_etcd_change(7, {P + "train/mode": b"3"}, [P + "train/warmup"])  # the general
        engine.on_etcd_change(8, {P + "train/lr": b"0.25"}, [])
    rejected = [e for e in logs if e["event"] == "change_rejected"]
    assert [(e["key"], e["revision"]) for e in rejected] == [("train.lr", 6), ("train.mode", 7)]
    assert "ZeroDivisionError" in rejected[0]["reason"]
    assert "AttributeError" in rejected[1]["reason"]
    assert [p.version for p in published] == [1, 2]
    assert published[-1].flat["train.lr"] == 0.25 and published[-1].flat["train.mode"] == "cosine"


def test_validate_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "train.json"
    config.write_text(json.dumps({"train": {"mode": 3}}))
    done = run_cli("validate", *SCHEMA, str(config))
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    said = (done.stdout + done.stderr).strip()
    assert said == (
        f"{config}: train.mode: the schema's own code raised AttributeError: "
        "'int' object has no attribute 'strip'"
    )


def test_a_daemon_refuses_the_value_and_serves_the_next(etcd: EtcdServer, tmp_path: Path) -> None:
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, app=APP, extra=SCHEMA) as daemon,
        RawClient(daemon.socket_path, "trainer") as client,
    ):
        assert client.snapshot["values"]["train"]["mode"] == "cosine"
        # ``set`` checks first, and writes nothing...
        done = run_cli(
            "set", *SCHEMA, "--app", APP, "--etcd-endpoints", etcd.endpoint, "train.mode=3"
        )
        assert done.returncode == 1 and "Traceback" not in done.stderr
        assert "train.mode (from etcd): the schema's own code raised AttributeError" in done.stderr
        # ...and a value written around it is refused by the daemon.
        etcd.etcdctl("put", P + "train/mode", "3")
        (rejected,) = wait_for("the rejection", lambda: daemon.events("change_rejected"))
        assert rejected["key"] == "train.mode" and "AttributeError" in rejected["reason"]
        etcd.etcdctl("put", P + "train/lr", "0")
        wait_for("two rejections", lambda: len(daemon.events("change_rejected")) == 2)
        etcd.etcdctl("put", P + "train/mode", '"linear"')
        update = client.next_update()
        assert update["changed"] == {"train.mode": "linear"}
        assert update["values"]["train"]["lr"] == 0.1
        assert not daemon.events("event_failed")
        assert daemon.proc is not None and daemon.proc.poll() is None


# --- the blame's harder cases -----------------------------------------------------------


class _Pairs(BaseModel):
    a: int = 0
    b: int = 0
    c: int = 0
    d: int = 0
    e: int = 0  # innocent

    @model_validator(mode="after")
    def pairs(self) -> _Pairs:
        if (self.a and self.b) or (self.c and self.d):
            raise TypeError("a pair together")
        return self


def test_two_pairs_that_raise_together_leave_an_innocent_value_alone() -> None:
    values = {"a": 1, "b": 1, "c": 1, "d": 1, "e": 42}
    layers = [defaults_layer(_Pairs), Layer("etcd", values, dict.fromkeys(values, "put"))]
    snap, dropped = merge_dropping_invalid(_Pairs, layers)
    assert snap.flat["e"] == 42
    kept = {key for key in "abcd" if snap.flat[key]}
    assert len(dropped) == 2 and kept in ({"a", "c"}, {"a", "d"}, {"b", "c"}, {"b", "d"})


class _Context(BaseModel):
    warmup: int = 0
    cooldown: int = 0
    other: int = 0
    mode: str = "plain"

    @model_validator(mode="after")
    def rules(self) -> _Context:
        if self.mode == "x" and not self.warmup:
            raise TypeError("mode x needs a warmup")
        if self.warmup and self.cooldown:
            raise TypeError("warmup and cooldown together")
        return self


def test_a_value_that_raises_only_on_the_defaults_is_not_blamed_in_its_context() -> None:
    # ``mode=x`` raises beside the default warmup, not beside the files' warmup: the
    # fault is etcd's cooldown, and etcd's other value stays.
    layers = [
        defaults_layer(_Context),
        Layer("files", {"warmup": 5}),
        Layer("etcd", {"cooldown": 3, "other": 7}),
        cli_layer(["mode=x"]),
    ]
    exc = refused(*layers[1:], schema=_Context)
    assert [(p.key, p.layer) for p in exc.problems] == [("cooldown", "etcd")]
    snap, dropped = merge_dropping_invalid(_Context, layers)
    assert [p.key for p in dropped] == ["cooldown"] and snap.flat["other"] == 7


class _Flaky(BaseModel):
    a: int = 0
    b: int = 0

    @model_validator(mode="after")
    def lazy(self) -> _Flaky:
        _FLAKY["calls"] += 1
        if _FLAKY["calls"] == 1:
            raise RuntimeError("registry not ready")
        return self


_FLAKY = {"calls": 0}


def test_a_schema_that_raises_once_and_not_again_is_blamed_itself() -> None:
    _FLAKY["calls"] = 0
    exc = refused(etcd({"a": b"1", "b": b"2"}), schema=_Flaky)
    assert [(p.key, p.layer) for p in exc.problems] == [("", "defaults")]
    assert "RuntimeError: registry not ready" in exc.problems[0].reason


class _Appends(BaseModel):
    tags: list[str] = ["a"]
    lr: float = 0.1

    @field_validator("tags", mode="before")
    @classmethod
    def add_base(cls, value: Any) -> Any:
        value.append("base")  # edits its input in place
        return value

    @computed_field  # type: ignore[prop-decorator]
    @property
    def inverse_lr(self) -> float:
        return 1 / self.lr


def test_a_validator_that_edits_its_input_edits_no_layer() -> None:
    live = Layer("etcd", {"tags": ["x"], "lr": 0})
    defaults = defaults_layer(_Appends)
    snap, dropped = merge_dropping_invalid(_Appends, [defaults, live])
    assert [p.key for p in dropped] == ["lr"]
    assert snap.flat["tags"] == ["x", "base"]  # one append, however many trials
    assert defaults.values["tags"] == ["a"] and live.values["tags"] == ["x"]


def test_an_interrupt_during_the_trials_carries_no_secret() -> None:
    calls = {"n": 0}

    class Interrupted(BaseModel):
        token: SecretStr = SecretStr("default")
        lr: float = 0.1

        @model_validator(mode="after")
        def check(self) -> Interrupted:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt  # Ctrl-C during the first trial
            if self.lr == 0:
                raise RuntimeError(f"lr 0 with {self.token.get_secret_value()}")
            return self

    values = {"token": "sup3r-secret-tok", "lr": 0}
    with pytest.raises(KeyboardInterrupt) as info:
        merge_layers(Interrupted, [defaults_layer(Interrupted), Layer("etcd", values)])
    assert "sup3r-secret-tok" not in "".join(traceback.format_exception(info.value))


class _Quoting(BaseModel):
    token: SecretStr = SecretStr("dflt")
    blob: SecretBytes = SecretBytes(b"dflt")
    user: str = "ops"

    @field_validator("user")
    @classmethod
    def check(cls, value: str, info: ValidationInfo) -> str:
        token, blob = info.data["token"], info.data["blob"]
        if token.get_secret_value() == "dflt" and blob.get_secret_value() == b"dflt":
            return value  # raises only beside a secret given, as that is what it quotes
        if value == "k":
            raise KeyError(f'user "{value}" may not use {info.data["token"].get_secret_value()}')
        if value == "b":
            raise LookupError(f"user b may not use {info.data['blob'].get_secret_value()!r}")
        return value


@pytest.mark.parametrize(
    ("values", "secret"),
    [
        ({"token": "o'brien-secret", "user": "k"}, "brien-secret"),  # repr escapes the '
        ({"blob": "pässwörd-secret", "user": "b"}, "ss-w"),  # shown as bytes: b'p\xc3\xa4ss-w..'
    ],
)
def test_a_secret_quoted_as_repr_shows_it_is_masked(values: dict[str, str], secret: str) -> None:
    exc = refused(Layer("etcd", values), schema=_Quoting)
    (problem,) = [p for p in exc.problems if p.key == "user"]
    assert "**********" in problem.reason and secret not in problem.reason


def test_the_short_path_leaves_a_default_made_from_other_fields_to_the_whole(
    tmp_path: Path,
) -> None:
    published: list[Published] = []
    engine = Engine(
        schema=FactoryTakesData,
        app=APP,
        precedence=DEFAULT_PRECEDENCE,
        layers=[defaults_layer(FactoryTakesData), env_layer(FactoryTakesData, environ={})],
        store=StateStore(tmp_path, APP),
        publish=published.append,
        broadcast=[].append,
    )
    engine.start({}, 1)
    engine.on_etcd_change(2, {P + "a": b"5"}, [])
    assert published[-1].flat == {"a": 5, "b": 2}  # b follows a, as pydantic makes it
    engine.on_etcd_change(3, {P + "a": b"0"}, [])  # b's factory divides by a: refused
    assert [p.version for p in published] == [1, 2] and published[-1].flat["a"] == 5
