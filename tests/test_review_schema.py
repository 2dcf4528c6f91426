"""User schemas as a review drove them: secrets inside dataclasses, TypedDicts and
``Secret[int]``; a validator that raises a ``BaseException``; a model validator's
refusal; a key of the other member of a discriminated union; a computed field's change.

Unit tests on the config package, and a real daemon with a real etcd and the real CLI.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Secret,
    SecretStr,
    computed_field,
    field_validator,
    model_validator,
)
from pydantic.dataclasses import dataclass as pydantic_dataclass
from typing_extensions import TypedDict

from hotknob.config import InvalidChange, merge_layers
from hotknob.config.dropping_invalid import merge_dropping_invalid
from hotknob.config.secrecy import SECRET_MASK, mask_secrets, revealed, secret_keys
from hotknob.config.sources import Layer, defaults_layer
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(120)

APP = "rvs"
P = f"/hotknob/{APP}/config/"


# --- the schemas -------------------------------------------------------------------------------


@dataclasses.dataclass
class PlainCreds:
    user: str = "dc-user"
    token: SecretStr = dataclasses.field(default_factory=lambda: SecretStr(DEFAULTS[0]))


DEFAULTS = ("dc-default-token-1111", "pdc-default-token-2222")


@pydantic_dataclass
class TypedCreds:
    user: str = "pdc-user"
    token: SecretStr = SecretStr("pdc-default-token-2222")


class DictCreds(TypedDict):
    token: SecretStr


class Service(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = "https://localhost"
    dc: PlainCreds = Field(default_factory=PlainCreds)


class Held(BaseModel):
    """Secrets a dataclass, a pydantic dataclass or a TypedDict holds: ``--schema
    tests.test_review_schema:Held``."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    svc: Service = Field(default_factory=Service)
    pdc: TypedCreds = Field(default_factory=TypedCreds)
    td: DictCreds | None = None
    many: dict[str, PlainCreds] = Field(default_factory=dict)
    n: int = 1


class Pinned(BaseModel):
    """pydantic's generic ``Secret[int]``: ``--schema tests.test_review_schema:Pinned``."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    pin: Secret[int] = Secret[int](4321)
    n: int = 1


HELD = ["--schema", "tests.test_review_schema:Held"]
PINNED = ["--schema", "tests.test_review_schema:Pinned"]


class Stop(BaseException):
    """A ``BaseException`` of a schema's own."""


class Raises(BaseModel):
    """A validator that raises what is no ``Exception``: ``--schema
    tests.test_review_schema:Raises``."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    x: int = 1

    @field_validator("x")
    @classmethod
    def _odd_raises(cls, value: int) -> int:
        if value == 15:
            raise KeyboardInterrupt
        if value == 16:
            raise Stop("a stop of the schema's own")
        if value == 17:
            raise GeneratorExit
        return value


RAISES = ["--schema", "tests.test_review_schema:Raises"]


class Cat(BaseModel):
    kind: Literal["cat"] = "cat"
    meow: int = 1


class Dog(BaseModel):
    kind: Literal["dog"] = "dog"
    bark: int = 2


class Range(BaseModel):
    model_config = ConfigDict(extra="forbid")

    low: float = 0.0
    high: float = 1.0

    @model_validator(mode="after")
    def _ordered(self) -> Range:
        if self.low >= self.high:
            raise ValueError(f"low {self.low} must be below high {self.high}")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def width(self) -> float:
        return self.high - self.low


class Shaped(BaseModel):
    """A model validator, a computed field, a discriminated union: ``--schema
    tests.test_review_schema:Shaped``."""

    model_config = ConfigDict(extra="forbid", validate_default=True)

    rng: Range = Field(default_factory=Range)
    pet: Annotated[Cat | Dog, Field(discriminator="kind")] = Field(default_factory=Cat)


SHAPED = ["--schema", "tests.test_review_schema:Shaped"]


# --- helpers -----------------------------------------------------------------------------------


def hk(etcd: EtcdServer, schema: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--app", APP, "--etcd-endpoints", etcd.endpoint, *schema)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout + done.stderr


def wait_for(what: str, check: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def merged(schema: type[BaseModel], **values: Any) -> Any:
    return merge_layers(schema, [defaults_layer(schema), Layer("etcd", values)])


def refused(schema: type[BaseModel], **values: Any) -> InvalidChange:
    with pytest.raises(InvalidChange) as info:
        merged(schema, **values)
    return info.value


@pytest.fixture
def daemon_of(etcd: EtcdServer, tmp_path: Path) -> Iterator[Callable[[list[str]], DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(schema: list[str]) -> DaemonProcess:
        daemon = DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=schema)
        started.append(daemon.start())
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


# --- B3, D9: secrets a dataclass, a TypedDict or Secret[T] holds -------------------------------


def test_a_secret_inside_a_dataclass_or_typeddict_makes_its_leaf_secret() -> None:
    assert {"svc.dc", "pdc", "td", "many"} <= secret_keys(Held)
    assert "n" not in secret_keys(Held) and "svc.url" not in secret_keys(Held)


def test_the_clients_get_the_real_values_and_people_the_mask() -> None:
    snap = merged(
        Held,
        **{
            "td": {"token": "td-token-3333"},
            "many.a.token": "many-token-4444",
            "pdc.token": "pdc-token-5555",
        },
    )
    values = json.loads(json.dumps(dict(snap.values)))
    assert values["svc"]["dc"] == {"user": "dc-user", "token": DEFAULTS[0]}
    assert values["pdc"] == {"user": "pdc-user", "token": "pdc-token-5555"}
    assert values["td"] == {"token": "td-token-3333"}
    assert values["many"] == {"a": {"user": "dc-user", "token": "many-token-4444"}}
    shown = json.dumps(mask_secrets(dict(snap.flat), secret_keys(Held)))
    for secret in (*DEFAULTS, "td-token-3333", "many-token-4444", "pdc-token-5555"):
        assert secret not in shown
    assert revealed(TypedCreds()) == {"user": "pdc-user", "token": DEFAULTS[1]}


def test_a_change_to_a_secret_inside_a_dataclass_alone_is_a_change() -> None:
    before = merged(Held)
    after = merged(Held, **{"svc.dc.token": "new-token-6666"})
    assert before.flat["svc.dc"] != after.flat["svc.dc"]
    assert after.flat["svc.dc"]["token"] == "new-token-6666"


def test_a_secret_int_takes_its_default_and_refuses_a_boolean() -> None:
    assert "pin" in secret_keys(Pinned)
    assert merged(Pinned).flat["pin"] == 4321
    assert merged(Pinned, pin=99).flat["pin"] == 99
    (problem,) = refused(Pinned, pin=True).problems
    assert problem.key == "pin" and "true/false" in problem.reason


def test_get_loads_a_secret_int_and_masks_it(etcd: EtcdServer) -> None:
    shown = ok(hk(etcd, PINNED, "get"))
    assert SECRET_MASK in shown and "4321" not in shown


def test_the_daemon_pushes_and_hides_a_secret_inside_a_dataclass(
    etcd: EtcdServer, daemon_of: Callable[[list[str]], DaemonProcess]
) -> None:
    daemon = daemon_of(HELD)
    set_tokens = ("svc-dc-token-7777", "pdc-token-8888", "td-token-9999")
    with RawClient(daemon.socket_path) as client:
        values = client.snapshot["values"]
        assert values["svc"]["dc"]["token"] == DEFAULTS[0]
        assert values["pdc"]["token"] == DEFAULTS[1]
        shown = [ok(hk(etcd, HELD, "set", f"svc.dc.token={set_tokens[0]}"))]
        update = client.next_update()
        assert update["values"]["svc"]["dc"]["token"] == set_tokens[0]
        assert update["changed"] == {"svc.dc": {"user": "dc-user", "token": set_tokens[0]}}
        shown.append(ok(hk(etcd, HELD, "set", f"pdc.token={set_tokens[1]}")))
        assert client.next_update()["changed"] == {
            "pdc": {"user": "pdc-user", "token": set_tokens[1]}
        }
        shown.append(ok(hk(etcd, HELD, "set", "td=" + json.dumps({"token": set_tokens[2]}))))
        assert client.next_update()["changed"] == {"td": {"token": set_tokens[2]}}
    for args in (
        ("get",),
        ("get", "--json"),
        ("explain",),
        ("explain", "--json"),
        ("history", "svc.dc.token"),
        ("history", "pdc"),
        ("history", "--json"),
    ):
        shown.append(ok(hk(etcd, HELD, *args)))
    assert SECRET_MASK in shown[0]
    text = "\n".join(shown) + daemon.log()
    for secret in (*DEFAULTS, *set_tokens):
        assert secret not in text, secret


# --- B5: a validator that raises a BaseException -----------------------------------------------


def _in_a_thread(call: Callable[[], Any]) -> BaseException | None:
    caught: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # what the thread would die of
            caught.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    return caught[0] if caught else None


@pytest.mark.parametrize(("value", "name"), [(15, "KeyboardInterrupt"), (16, "Stop")])
def test_a_base_exception_off_the_main_thread_is_refused_like_an_invalid_value(
    value: int, name: str
) -> None:
    exc = _in_a_thread(lambda: merged(Raises, x=value))
    assert isinstance(exc, InvalidChange), repr(exc)
    (problem,) = exc.problems
    assert (problem.key, problem.layer) == ("x", "etcd")
    assert problem.reason.startswith(f"the schema's own code raised {name}")


def test_a_base_exception_of_the_schema_s_own_is_refused_on_the_main_thread_too() -> None:
    (problem,) = refused(Raises, x=16).problems
    assert problem.reason == "the schema's own code raised Stop: a stop of the schema's own"


def test_a_keyboard_interrupt_is_the_schema_s_while_sigint_is_handled_otherwise() -> None:
    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        (problem,) = refused(Raises, x=15).problems
    finally:
        signal.signal(signal.SIGINT, previous)
    assert problem.reason == "the schema's own code raised KeyboardInterrupt"


def test_a_real_ctrl_c_and_generator_exit_are_passed_on() -> None:
    with pytest.raises(KeyboardInterrupt):  # main thread, Python's own SIGINT handler
        merged(Raises, x=15)
    with pytest.raises(GeneratorExit):
        merged(Raises, x=17)
    assert isinstance(_in_a_thread(lambda: merged(Raises, x=17)), GeneratorExit)


def test_the_daemon_refuses_a_keyboard_interrupt_and_takes_the_next_change(
    etcd: EtcdServer, daemon_of: Callable[[list[str]], DaemonProcess]
) -> None:
    daemon = daemon_of(RAISES)
    with RawClient(daemon.socket_path) as client:
        for value in (15, 16):
            etcd.etcdctl("put", P + "x", str(value))
            wait_for(f"x={value} refused", partial(_rejected, daemon, value))
        etcd.etcdctl("put", P + "x", "3")
        update = client.next_update()
        assert update["changed"] == {"x": 3}
    reasons = [event["reason"] for event in daemon.events("change_rejected")]
    assert "x (from etcd): the schema's own code raised KeyboardInterrupt" in reasons
    assert "Traceback" not in daemon.log() and daemon.proc is not None
    assert daemon.proc.poll() is None


def _rejected(daemon: DaemonProcess, value: int) -> bool:
    return any(event.get("new") == {"x": value} for event in daemon.events("change_rejected"))


# --- D1: a model validator's refusal names the keys and their layers ---------------------------


def test_a_section_rule_blames_the_keys_below_it_with_their_layers() -> None:
    layers = [
        defaults_layer(Shaped),
        Layer("files", {"rng.high": 5.0}),
        Layer("etcd", {"rng.low": 7.0}),
    ]
    with pytest.raises(InvalidChange) as info:
        merge_layers(Shaped, layers)
    assert {(p.key, p.layer) for p in info.value.problems} == {
        ("rng.high", "files"),
        ("rng.low", "etcd"),
    }
    assert all("low 7.0 must be below high 5.0" in p.reason for p in info.value.problems)
    snap, dropped = merge_dropping_invalid(Shaped, layers)
    assert [p.key for p in dropped] == ["rng.low"] and snap.flat["rng.high"] == 5.0


def test_set_and_the_daemon_blame_a_section_rule_on_etcd(
    etcd: EtcdServer, daemon_of: Callable[[list[str]], DaemonProcess]
) -> None:
    daemon = daemon_of(SHAPED)
    ok(hk(etcd, SHAPED, "set", "rng.high=5"))
    done = hk(etcd, SHAPED, "set", "rng.low=7")
    assert done.returncode == 1
    assert "rng.low (from etcd): Value error, low 7.0 must be below high 5.0" in done.stderr
    assert "defaults" not in done.stderr
    etcd.etcdctl("put", P + "rng/low", "9")  # around set: the daemon refuses it
    (rejected,) = wait_for("the refusal", lambda: daemon.events("change_rejected"))
    assert rejected["layer"] == "etcd" and "defaults" not in rejected["reason"]
    assert "rng.low (from etcd): Value error, low 9.0 must be below high 5.0" in rejected["reason"]


# --- D2: a key of the other member of a discriminated union ------------------------------------


def test_a_key_of_the_other_member_of_a_union_is_refused_not_dropped() -> None:
    (problem,) = refused(Shaped, **{"pet.bark": 4}).problems
    assert (problem.key, problem.layer) == ("pet.bark", "etcd")
    assert "pet holds a Cat, which has no field 'bark'" in problem.reason
    assert merged(Shaped, **{"pet.kind": "dog", "pet.bark": 4}).flat["pet"] == {
        "kind": "dog",
        "bark": 4,
    }
    (problem,) = refused(Shaped, **{"pet.kind": "dog", "pet.meow": 3}).problems
    assert problem.key == "pet.meow" and "pet holds a Dog" in problem.reason


def test_set_refuses_a_key_of_the_other_member(etcd: EtcdServer) -> None:
    done = hk(etcd, SHAPED, "set", "pet.bark=4")
    assert done.returncode == 1 and "pet.bark (from etcd)" in done.stderr
    assert etcd.etcdctl("get", P + "pet/bark").stdout == ""
    ok(hk(etcd, SHAPED, "set", "pet.kind=dog", "pet.bark=4"))
    assert json.loads(ok(hk(etcd, SHAPED, "get", "pet", "--json"))) == {"kind": "dog", "bark": 4}


# --- D3: a computed field's change is in ``changed`` -------------------------------------------


def test_a_computed_field_is_a_key_of_the_state() -> None:
    snap = merged(Shaped, **{"rng.high": 5.0})
    assert snap.flat["rng.width"] == 5.0 and snap.sources["rng.width"] == "defaults"
    assert "rng.width" not in secret_keys(Shaped)
    # Beside a secret it may be made from one: it is masked, as a key no layer sets.
    assert "rng.width" in secret_keys(WithSecret)
    assert merged(WithSecret).flat["token"] == "with-secret-token-1212"


class WithSecret(Shaped):
    token: SecretStr = SecretStr("with-secret-token-1212")


def test_an_update_names_a_computed_field_that_changed(
    etcd: EtcdServer, daemon_of: Callable[[list[str]], DaemonProcess]
) -> None:
    daemon = daemon_of(SHAPED)
    with RawClient(daemon.socket_path) as client:
        assert client.snapshot["sources"]["rng.width"] == "defaults"
        ok(hk(etcd, SHAPED, "set", "rng.high=5"))
        update = client.next_update()
        assert update["changed"] == {"rng.high": 5.0, "rng.width": 5.0}
        assert update["values"]["rng"]["width"] == 5.0
    accepted = daemon.events("change_accepted")
    assert accepted and accepted[-1]["new"] == {"rng.high": 5.0, "rng.width": 5.0}
