"""A refused secret's refusal says which rule it broke, never what derives from the value.

pydantic's own message for a too-short ``SecretStr`` ("Value should have at least 12 items
after validation, not 5") told the secret's length, and its parsers' messages tell of the
input ("input is too short"). Every way a refusal is shown takes its reason from the
merge: the CLI (``set``, ``set --dry-run``, ``rollback``, ``validate``, ``explain``), the
daemon's start (a config file, an env variable, a ``--set`` flag), and a running daemon's
log line, ``change_rejected`` event and ``watch`` stream for an etcd put. Real etcd, the
real CLI, a real daemon.

``--schema tests.test_review_secret_refusals:Keys``.
"""

from __future__ import annotations

import json
import re
import urllib.request
from datetime import date
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, Secret, SecretStr

from hotknob.config import InvalidChange, merge_layers
from hotknob.config.errors import LayerError
from hotknob.config.schema import TrainParams
from hotknob.config.secrecy import refusal_shown
from hotknob.config.sources import Layer, defaults_layer
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer, free_port
from tests.test_secrets_hidden import WatchCli, wait_for, watching

pytestmark = pytest.mark.timeout(60)

APP = "refsec"
P = f"/hotknob/{APP}/config/"
KEYS = ["--schema", "tests.test_review_secret_refusals:Keys"]
WITHHELD = "(too short; its length is withheld: secret)"

# A secret of each length is refused under its own key, so that a length shown anywhere
# is one of these numbers after "not".
FILE, ENV, CLI, ETCD, ROLLED = "a" * 3, "b" * 5, "c" * 7, "d" * 9, "e" * 10


def _key() -> Any:
    return Field(SecretStr("k" * 16), min_length=12, max_length=40)


class KeySet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file_key: SecretStr = _key()
    env_key: SecretStr = _key()
    cli_key: SecretStr = _key()
    etcd_key: SecretStr = _key()
    expires: Secret[date] = Secret(date(2030, 1, 1))
    plain: Annotated[str, Field(min_length=12)] = "p" * 12


def _hf(token: SecretStr) -> SecretStr:
    text = token.get_secret_value()
    if not text.startswith("hf_"):  # a message that quotes part of the secret, and its length
        raise ValueError(f"a token starting {text[:4]!r} ({len(text)} chars) lacks hf_")
    return token


class Keys(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)

    train: TrainParams = Field(default_factory=TrainParams)
    keys: KeySet = Field(default_factory=KeySet)
    tokens: dict[str, Annotated[SecretStr, Field(min_length=12)]] = Field(default_factory=dict)
    hub: dict[str, Annotated[SecretStr, AfterValidator(_hf)]] = Field(default_factory=dict)


def assert_no_length(text: str, *secrets: str) -> None:
    """No refused secret, and no length of one, is in ``text``."""
    for secret in secrets:
        assert secret not in text, text
    assert not re.search(r"\bnot \d+\b", text), text
    assert "too short;" in text or "too long;" in text or "withheld" in text, text


def refused_by(*args: str, env: dict[str, str] | None = None) -> str:
    done = run_cli(*args, *KEYS, env=env)
    assert done.returncode == 1, (done.stdout, done.stderr)
    return done.stdout + done.stderr


def cli(etcd: EtcdServer, *args: str, env: dict[str, str] | None = None) -> str:
    return refused_by(*args, "--app", APP, "--etcd-endpoints", etcd.endpoint, env=env)


def refused(layer: str, values: dict[str, object]) -> str:
    with pytest.raises(InvalidChange) as info:
        merge_layers(Keys, [defaults_layer(Keys), Layer(layer, values)])
    return str(info.value)


def test_pydantic_s_messages_about_a_secret_keep_the_rule_and_not_the_value() -> None:
    short = refused("etcd", {"keys.etcd_key": ETCD})
    rule = "Value should have at least 12 items after validation"
    assert short == f"keys.etcd_key (from etcd): {rule} {WITHHELD}"
    long = refused("etcd", {"keys.etcd_key": "x" * 41})
    assert "at most 40 items" in long and "too long; its length is withheld" in long
    assert_no_length(long)
    # A parser's account of the value ("input is too short") is withheld too.
    parsed = refused("etcd", {"keys.expires": "2030-01"})
    assert parsed.startswith("keys.expires (from etcd): Input should be a valid date or datetime")
    assert "too short" not in parsed and "(withheld: secret)" in parsed, parsed
    # A key of a mapping of secrets is one too.
    token = refused("etcd", {"tokens.hf": "hf_1"})
    assert "at least 12" in token and WITHHELD in token, token
    # A key that is no secret keeps pydantic's message whole, and a secret's message that
    # tells nothing of the value is left as it is.
    plain = refused("etcd", {"keys.plain": "x" * 5})
    assert plain.endswith("String should have at least 12 characters"), plain
    assert refusal_shown("greater_than", "Input should be greater than 0", {"gt": 0}) == (
        "Input should be greater than 0"
    )
    # A value's own part that cannot be rendered as text is left out with the message.
    offset = refusal_shown("timezone_offset", "got 7200", {"tz_expected": 0, "tz_actual": 7200})
    assert offset == "refused (timezone_offset; its message is withheld: secret)"


def test_a_validator_s_message_about_a_key_of_a_mapping_of_secrets_is_withheld() -> None:
    """``hub.hf`` given by its own key was no secret key to the merge: the validator's
    message, quoting the start of the token and its length, was shown."""
    given = refused("etcd", {"hub.hf": "XYZW-secret-token"})
    assert given == (
        "hub.hf (from etcd): refused by a validator of the schema (its message is withheld "
        "for a secret key; error type value_error)"
    )
    # Given whole, it always was (the leaf ``hub`` is secret).
    whole = refused("etcd", {"hub": {"hf": "XYZW-secret-token"}})
    assert "XYZW" not in whole and "17" not in whole and "withheld" in whole, whole


def test_the_cli_refuses_a_short_secret_without_its_length(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    shown = {
        "set": cli(etcd, "set", f"keys.etcd_key={ETCD}"),
        "dry-run": cli(etcd, "set", "--dry-run", f"tokens.hf={ETCD}"),
        "explain": cli(etcd, "explain", "keys.env_key", env={"HOTKNOB_PARAM_KEYS__ENV_KEY": ENV}),
    }
    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  file_key: {FILE}\n")
    shown["validate"] = refused_by("validate", str(path))
    # A revision that held a short key, which the CLI could not have written: a rollback
    # to it is refused.
    put = json.loads(
        etcd.etcdctl("put", P + "keys/cli_key", json.dumps(ROLLED), "-w", "json").stdout
    )
    etcd.etcdctl("del", P + "keys/cli_key")
    shown["rollback"] = cli(etcd, "rollback", "--to-revision", str(put["header"]["revision"]))
    for where, text in shown.items():
        assert "at least 12" in text, (where, text)
        assert_no_length(text, FILE, ENV, CLI, ETCD, ROLLED)


def test_the_daemon_refuses_a_short_secret_without_its_length(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    # At its start: a --set flag (the other layers take the same reason from the merge).
    flag = DaemonProcess(
        tmp_path / "flag",
        app=APP,
        endpoints=etcd.endpoint,
        extra=[*KEYS, "--set", f"keys.cli_key={CLI}"],
    )
    with pytest.raises(RuntimeError) as info:
        flag.start()
    assert "keys.cli_key (from cli)" in str(info.value) and WITHHELD in str(info.value)
    assert_no_length(str(info.value), CLI)
    # Running: an etcd put, in the log, its change_rejected event, watch, /healthz and
    # status (a process connected, whose entry names its daemon's refusal).
    port = free_port()
    extra = [*KEYS, "--node", "n1", "--metrics-addr", f"127.0.0.1:{port}"]
    with (
        DaemonProcess(tmp_path / "run", app=APP, endpoints=etcd.endpoint, extra=extra) as daemon,
        RawClient(daemon.socket_path, "c1"),
    ):
        text, as_json = WatchCli(daemon, 1), WatchCli(daemon, 1, "--json")
        try:
            watching(daemon, 2)
            etcd.etcdctl("put", P + "keys/etcd_key", json.dumps(ETCD))
            (rejected,) = wait_for("the rejection", lambda: daemon.events("change_rejected"))
        finally:
            watched = text.output() + as_json.output()
        health = healthz(port)
        status = wait_for("status to name the rejection", lambda: rejected_in_status(etcd))
        log = daemon.log()
    assert "keys.etcd_key" in rejected["reason"] and WITHHELD in rejected["reason"], rejected
    assert WITHHELD in watched and "keys.etcd_key" in watched, watched
    assert WITHHELD in health["rejected"]["reason"], health
    for shown in (log, watched, json.dumps(health), status):
        assert_no_length(shown, ETCD)


def healthz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
        return json.loads(answer.read())


def rejected_in_status(etcd: EtcdServer) -> str:
    done = run_cli("status", "--json", "--app", APP, "--etcd-endpoints", etcd.endpoint, *KEYS)
    return done.stdout if "keys.etcd_key (from etcd)" in done.stdout else ""


def test_an_env_var_that_is_no_json_for_a_mapping_of_secrets_says_not_where_it_broke() -> None:
    """Where the parser stopped ("at character 27") tells how long the secret before it is."""
    from hotknob.config.environ import env_layer

    text = '{"hf": "hf_secretvalue123" x}'
    with pytest.raises(LayerError) as raised:
        env_layer(Keys, environ={"HOTKNOB_PARAM_HUB": text})
    said = str(raised.value)
    assert "HOTKNOB_PARAM_HUB" in said and "not valid JSON" in said
    assert "character" not in said and "secretvalue" not in said
