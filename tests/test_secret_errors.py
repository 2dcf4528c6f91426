"""Error messages never quote a secret: a config file that cannot be parsed, and a
validator of a section or of the whole model whose message quotes a secret's value.

PyYAML's text of an error quotes the line it stopped at, which may be ``api_key: ...``;
a validator that is not on a secret field may still quote one (``ValueError(f"...
{self.api_key.get_secret_value()}")``), and pydantic gives it the whole input, secrets
and all. What reaches a person (the CLI, the daemon's log, ``watch`` events) must keep
the place and the reason, and mask the secret.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import pytest
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from hotknob.config import InvalidChange, LayerError, merge_layers, read_config_file
from hotknob.config.dropping_invalid import merge_dropping_invalid
from hotknob.config.secrecy import SECRET_MASK, mask_secrets, secret_keys, shown_value
from hotknob.config.sources import Layer, defaults_layer
from hotknob.daemon.announce import Announcer
from tests.daemon_proc import DaemonProcess, run_cli
from tests.etcd_server import EtcdServer
from tests.test_secrets_hidden import WatchCli, assert_hidden, hk, ok, wait_for, watching

pytestmark = pytest.mark.timeout(120)

SECRET = "Hunter2-s3cret-9999"
DEFAULT_KEY = "default-api-key-0000"
APP = "sec"
P = f"/hotknob/{APP}/config/"
PARAMS = ["--schema", "tests.secret_schema:Params"]
GUARDED = ["--schema", "tests.test_secret_errors:Guarded"]


# --- files that cannot be parsed --------------------------------------------------------------

BROKEN_YAML = [
    # (name, content, where, problem)
    ("quote", 'service:\n  api_key: "{S}\n', "line 2, column 12", "unexpected end of stream"),
    ("colon", "service:\n  api_key: {S}: x\n", "line 2", "mapping values are not allowed"),
    ("dup", "service:\n  api_key: {S}\n  api_key: {S}\n", "line 3, column 3", "duplicate key"),
    ("tab", "service:\n\tapi_key: {S}\n", "line 2, column 1", "cannot start any token"),
    ("flow", "service:\n  api_key: [{S}\n", "line 3", "expected ',' or ']'"),
    # A value that starts with ``!`` or ``&`` is a tag or an anchor, and PyYAML's problem
    # names it.
    ("tag", "service:\n  api_key: !{S}\n", "line 2, column 12", "constructor for a tag"),
    ("handle", "service:\n  api_key: !{S}!x\n", "line 2, column 12", "undefined tag handle"),
    (
        "anchor",
        "service:\n  api_key: &{S} a\n  url: &{S} b\n",
        "line 3, column 8",
        "duplicate anchor",
    ),
]


@pytest.mark.parametrize(("name", "content", "where", "problem"), BROKEN_YAML)
def test_a_yaml_error_names_the_line_and_not_its_content(
    tmp_path: Path, name: str, content: str, where: str, problem: str
) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(content.replace("{S}", SECRET))
    with pytest.raises(LayerError) as info:
        read_config_file(path)
    message = str(info.value)
    assert SECRET not in message
    assert message.startswith(f"{path}: not valid YAML: ")
    assert where in message and problem in message, message
    assert "<unicode string>" not in message
    shown = "".join(traceback.format_exception(info.value))
    assert SECRET not in shown, shown


@pytest.mark.parametrize("tag", ["!!int", "!!float", "!!bool", "!!timestamp"])
def test_a_value_its_yaml_tag_cannot_make_is_refused_without_quoting_it(
    tmp_path: Path, tag: str
) -> None:
    """PyYAML's constructors raise what the conversion raises (ValueError, KeyError,
    AttributeError), quoting the value; one of them used to escape as a traceback."""
    path = tmp_path / "tagged.yaml"
    path.write_text(f"service:\n  api_key: {tag} {SECRET}\n")
    with pytest.raises(LayerError) as info:
        read_config_file(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML: ") and "explicit tag" in message
    assert SECRET not in message and SECRET.lower() not in message
    shown = "".join(traceback.format_exception(info.value))
    assert SECRET not in shown and SECRET.lower() not in shown, shown


BROKEN_TOML_AND_JSON = [
    ("unclosed.toml", '[service]\napi_key = "{S}\n', "line 2"),
    ("bare.toml", "[service]\napi_key = {S}\n", "line 2"),
    ("escape.toml", '[service]\napi_key = "{S}\\q"\n', "line 2"),
    ("dup.toml", '[service]\napi_key = "{S}"\napi_key = "{S}"\n', "line 3"),
    ("comma.json", '{"service": {"api_key": "{S}", }}', "line 1"),
    ("control.json", '{"service": {"api_key": "{S}\n"}}', "line 1"),
    ("bare.json", '{"service":\n {"api_key": {S}}}', "line 2"),
    ("escape.json", '{"service": {"api_key": "{S}\\q"}}', "line 1"),
]


@pytest.mark.parametrize(("name", "content", "where"), BROKEN_TOML_AND_JSON)
def test_toml_and_json_errors_name_the_place_only(
    tmp_path: Path, name: str, content: str, where: str
) -> None:
    path = tmp_path / name
    path.write_text(content.replace("{S}", SECRET))
    with pytest.raises(LayerError) as info:
        read_config_file(path)
    assert SECRET not in str(info.value)
    assert where in str(info.value), str(info.value)


def test_the_cli_shows_no_line_of_a_broken_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(f'service:\n  api_key: "{SECRET}\n')
    validate = run_cli("validate", *PARAMS, str(path))
    assert validate.returncode == 1 and "line 2, column 12" in validate.stdout
    get = run_cli("get", *PARAMS, "--config", str(path))
    assert get.returncode == 1 and "line 2, column 12" in get.stderr
    assert "Traceback" not in validate.stderr + get.stderr
    assert_hidden([SECRET], validate=validate.stdout + validate.stderr, get=get.stdout + get.stderr)


def test_the_daemon_logs_no_line_of_a_broken_file(tmp_path: Path) -> None:
    config = tmp_path / "params.yaml"
    config.write_text(f"service:\n  api_key: {SECRET}-0\n")
    with DaemonProcess(tmp_path, configs=[config], extra=PARAMS) as daemon:
        config.write_text(f"service:\n  api_key: {SECRET}-1: x\n")  # not valid YAML
        wait_for("the file refused", lambda: daemon.events("config_file_invalid"))
        log = daemon.log()
    assert_hidden([SECRET], log=log)
    (invalid,) = daemon.events("config_file_invalid")
    assert "mapping values are not allowed here at line 2" in invalid["reason"]


# --- validators that quote a secret -----------------------------------------------------------


class Service(BaseModel):
    model_config = ConfigDict(extra="forbid")

    api_key: SecretStr = SecretStr(DEFAULT_KEY)
    backup_key: SecretStr | None = None
    url: str = "https://localhost:8000"

    @field_validator("url")
    @classmethod
    def _https_for_a_key(cls, url: str, info: ValidationInfo) -> str:
        key = info.data.get("api_key")
        secret = key.get_secret_value() if isinstance(key, SecretStr) else DEFAULT_KEY
        if secret != DEFAULT_KEY and not url.startswith("https:"):
            raise ValueError(f"the api key {secret} needs an https url")
        return url

    @model_validator(mode="after")
    def _distinct_keys(self) -> Service:
        if self.backup_key is not None and self.backup_key == self.api_key:
            key = self.api_key.get_secret_value()
            raise ValueError(f"backup_key must differ from api_key, both are {key!r}")
        return self


class Guarded(BaseModel):
    """``--schema tests.test_secret_errors:Guarded``: validators of a section and of the
    whole model, and one of a plain field, that quote a secret in their messages."""

    model_config = ConfigDict(extra="forbid")

    mode: str = "open"
    service: Service = Field(default_factory=Service)

    @model_validator(mode="before")
    @classmethod
    def _closed_has_no_key(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("mode") == "closed":
            key = (data.get("service") or {}).get("api_key")
            if key is not None:
                raise ValueError(f"a closed service takes no api key, got {key}")
        return data


def refused(*values: dict[str, Any], defaults: bool = True) -> InvalidChange:
    layers = [defaults_layer(Guarded)] if defaults else []
    layers += [Layer(name, v) for name, v in zip(("files", "etcd"), values, strict=False)]
    with pytest.raises(InvalidChange) as info:
        merge_layers(Guarded, layers)
    return info.value


def shown(exc: InvalidChange) -> str:
    """Everything of ``exc`` that could be shown: its text, each problem's value as the
    daemon shows it, and the traceback of it (with its chain)."""
    secrets = secret_keys(Guarded)
    values = [repr(shown_value(p.key, p.value, secrets)) for p in exc.problems]
    return "\n".join([str(exc), *values, *traceback.format_exception(exc)])


@pytest.mark.parametrize(
    ("values", "keys", "kept"),
    [
        (  # a section's validator: each key given below it is blamed, with its layer
            {"service.api_key": SECRET, "service.backup_key": SECRET},
            ["service.api_key", "service.backup_key"],
            f"backup_key must differ from api_key, both are '{SECRET_MASK}'",
        ),
        (  # the whole model's validator
            {"mode": "closed", "service.api_key": SECRET},
            ["mode", "service.api_key"],
            f"a closed service takes no api key, got {SECRET_MASK}",
        ),
        (  # a plain field's validator, quoting another field
            {"service.api_key": SECRET, "service.url": "http://plain"},
            ["service.url"],
            f"the api key {SECRET_MASK} needs an https url",
        ),
    ],
)
def test_a_validator_s_message_has_each_secret_masked(
    values: dict[str, Any], keys: list[str], kept: str
) -> None:
    exc = refused(values)
    assert [(p.key, p.layer) for p in exc.problems] == [(key, "files") for key in keys]
    assert all(kept in p.reason for p in exc.problems), exc.problems
    assert SECRET not in shown(exc), shown(exc)


def test_the_values_a_section_or_model_validator_refused_have_their_secrets_masked() -> None:
    section = refused({"service.api_key": SECRET, "service.backup_key": SECRET}).problems
    model = refused({"mode": "closed", "service.api_key": SECRET}).problems
    secrets = secret_keys(Guarded)
    assert {p.key: shown_value(p.key, p.value, secrets) for p in [*section, *model]} == {
        "service.api_key": SECRET_MASK,
        "service.backup_key": SECRET_MASK,
        "mode": "closed",
    }


def test_a_secret_default_a_validator_quotes_is_masked_too() -> None:
    exc = refused({"service.backup_key": DEFAULT_KEY}, defaults=False)
    assert f"both are '{SECRET_MASK}'" in str(exc)
    assert DEFAULT_KEY not in shown(exc)


def test_a_secret_given_in_any_form_is_masked_where_quoted() -> None:
    odd = 'we"ird\\sec\nret'  # quoted by repr and by JSON as escapes
    for key in (odd, SECRET, "short"):
        exc = refused({"service.api_key": key, "service.backup_key": key})
        for form in (key, repr(key)[1:-1], json.dumps(key)[1:-1]):
            assert form not in shown(exc), form


def test_a_live_layer_s_keys_dropped_for_a_rule_are_announced_without_the_secret() -> None:
    logged: list[tuple[str, dict[str, Any]]] = []
    events: list[dict[str, Any]] = []

    class Log:
        def warning(self, event: str, **fields: Any) -> None:
            logged.append((event, fields))

    secrets = secret_keys(Guarded)
    announcer = Announcer(
        Log(),
        secrets=secrets,
        broadcast=events.append,
        on_accepted=lambda layer, version: None,
        on_rejected=lambda layer, revision, reason, keys: None,
    )
    etcd = {"service.api_key": SECRET, "service.backup_key": SECRET, "mode": "closed"}
    layers = [defaults_layer(Guarded), Layer("etcd", etcd)]

    def on_drop(exc: InvalidChange, problems: list[Any]) -> None:
        announcer.rejected("etcd", 7, 3, exc, {p.key: etcd.get(p.key) for p in problems}, {})

    snapshot, dropped = merge_dropping_invalid(Guarded, layers, layer="etcd", on_drop=on_drop)
    assert snapshot.flat["mode"] == "open"
    assert {p.key for p in dropped} == set(etcd)
    assert events and logged
    text = json.dumps([logged, events]) + repr(
        mask_secrets({p.key: p.value for p in dropped}, secrets)
    )
    text += "".join(p.reason for p in dropped)
    assert SECRET_MASK in text and SECRET not in text, text


def test_the_daemon_and_cli_show_no_secret_a_validator_quotes(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    live, typed = "live-secret-quoted-1111", "typed-secret-quoted-2222"
    etcd.etcdctl("put", P + "service/api_key", json.dumps(live))
    with DaemonProcess(
        tmp_path, app=APP, endpoints=etcd.endpoint, extra=[*GUARDED, "--node", "n1"]
    ) as daemon:
        watch = WatchCli(daemon, 1, "--json")
        try:
            watching(daemon, 1)
            etcd.etcdctl("put", P + "service/backup_key", json.dumps(live))
            wait_for("the change rejected", lambda: daemon.events("change_rejected"))
        finally:
            watched = watch.output()
        log = daemon.log()
    (rejected,) = daemon.events("change_rejected")
    assert "backup_key must differ from api_key" in rejected["reason"]
    assert SECRET_MASK in rejected["reason"]
    done = hk(etcd, "set", "mode=closed", schema=GUARDED)
    assert done.returncode == 1 and "a closed service takes no api key" in done.stderr
    own = hk(etcd, "set", f"service.api_key={typed}", "service.url=http://plain", schema=GUARDED)
    assert own.returncode == 1 and "needs an https url" in own.stderr
    get = hk(etcd, "get", schema=GUARDED)
    assert "ignoring etcd value of service" in ok(get)
    assert_hidden(
        (live, typed),
        log=log,
        watch=watched,
        set=done.stdout + done.stderr,
        set_own=own.stdout + own.stderr,
        get=get.stdout + get.stderr,
    )
