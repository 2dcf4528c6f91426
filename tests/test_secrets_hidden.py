"""Secret values are shown nowhere: every CLI output, the daemon's log and ``watch``.

Real etcd, the real CLI and a real daemon. A schema field typed ``SecretStr`` reaches
the training process only; each test puts distinct secret strings in through every
way in and asserts that none of them appears in what was printed or logged.
"""

from __future__ import annotations

import base64
import copy
import json
import pickle
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from hotknob.config.schema import MLParams, TrainParams
from hotknob.config.secrecy import SECRET_MASK, SecretKeys, hides, mask_secrets, secret_keys
from tests.daemon_proc import DaemonProcess, RawClient, hotknob_cmd, run_cli
from tests.etcd_server import EtcdServer
from tests.secret_schema import Params

pytestmark = pytest.mark.timeout(120)

APP = "sec"
P = f"/hotknob/{APP}/config/"
G = f"/hotknob/{APP}/guards/"
SCHEMA = ["--schema", "tests.secret_schema:Params"]
CHECKED = ["--schema", "tests.secret_schema:Checked"]
MAPPED = ["--schema", "tests.test_secrets_hidden:Mapped"]


class Vault(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = "http://localhost:8000"
    api_key: SecretStr = SecretStr("default-api-key-0000")


class Mapped(BaseModel):
    """A schema with a secret, a mapping of plain values and a mapping of secrets:
    ``--schema tests.test_secrets_hidden:Mapped``."""

    model_config = ConfigDict(extra="forbid")

    train: TrainParams = Field(default_factory=TrainParams)
    vault: Vault = Field(default_factory=Vault)
    weights: dict[str, float] = Field(default_factory=dict)
    tokens: dict[str, SecretStr] = Field(default_factory=dict)


def hk(
    etcd: EtcdServer, *args: str, schema: list[str] = SCHEMA, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--app", APP, "--etcd-endpoints", etcd.endpoint, *schema, env=env)


def ok(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done.stdout + done.stderr


def assert_hidden(secrets: Iterable[str], **shown: str) -> None:
    for secret in secrets:
        for where, text in shown.items():
            assert secret not in text, f"secret {secret!r} shown in {where}:\n{text}"


def wait_for(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return value


def guard_records(etcd: EtcdServer) -> list[dict[str, Any]]:
    out = json.loads(etcd.etcdctl("get", G, "--prefix", "-w", "json").stdout)
    return [json.loads(base64.b64decode(item["value"])) for item in out.get("kvs") or []]


class WatchCli:
    """``hotknob watch --count N`` (text or ``--json``) against a daemon: it exits after
    ``count`` events; its output is read at the end."""

    def __init__(self, daemon: DaemonProcess, count: int, *extra: str) -> None:
        args = ["--app", daemon.app, "--socket", str(daemon.socket_path), "--count", str(count)]
        self.proc = subprocess.Popen(
            hotknob_cmd("watch", *args, *extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )

    def output(self) -> str:
        try:
            out, _ = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.send_signal(signal.SIGINT)
            try:
                out, _ = self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                out, _ = self.proc.communicate()
        return out


def watching(daemon: DaemonProcess, count: int) -> None:
    """Wait until ``count`` ``hotknob watch`` processes are connected to ``daemon``."""

    def connected() -> bool:
        found = daemon.events("client_connected")
        return sum(str(e.get("client")).startswith("hotknob-watch") for e in found) >= count

    wait_for("watch to connect", connected)


def metrics(step: int, **values: Any) -> dict[str, Any]:
    return {
        "type": "metrics",
        "step": step,
        "latest": values,
        "window": {k: [v] for k, v in values.items()},
    }


# --- the masking rule -------------------------------------------------------------------------


def test_keys_outside_a_schema_with_secrets_are_hidden_and_others_shown() -> None:
    from hotknob.config.secrecy import hides

    secrets = secret_keys(Params)
    assert hides("service.api_key", secrets) and hides("service.backup_key", secrets)
    assert hides("service", secrets) and hides("service.api_keyy", secrets)
    assert not hides("train.lr", secrets) and not hides("service.url", secrets)
    masked = mask_secrets({"service": {"api_key": "x"}, "train.lr": 0.1, "x.y": None}, secrets)
    assert masked == {"service": SECRET_MASK, "train.lr": 0.1, "x.y": None}
    # A schema without secrets shows every value, as it always did.
    plain = secret_keys(MLParams)
    assert not hides("train.lrr", plain) and not hides("train", plain)


def test_a_key_of_a_mapping_field_is_shown_or_hidden_as_that_field_is() -> None:
    secrets = secret_keys(Mapped)
    for shown in ("weights", "weights.head", "weights.a.b", "train.lr", "vault.url"):
        assert not hides(shown, secrets), shown
    for hidden in ("tokens", "tokens.a", "vault.api_key", "vault.api_key.x", "vault.x", "weight"):
        assert hides(hidden, secrets), hidden
    masked = mask_secrets({"weights.head": 0.5, "tokens.a": "t", "weightz.a": 1}, secrets)
    assert masked == {"weights.head": 0.5, "tokens.a": SECRET_MASK, "weightz.a": SECRET_MASK}
    # A plain set of keys hides those keys and the keys under them.
    assert hides("tokens.a", frozenset({"tokens"})) and not hides("weights.a", frozenset({"x"}))


@pytest.mark.parametrize(
    "made",
    [
        copy.copy,
        copy.deepcopy,
        lambda s: pickle.loads(pickle.dumps(s)),
        lambda s: s.copy(),
        lambda s: s | {"x.y"},
        lambda s: frozenset({"x.y"}) | s,
        lambda s: s & {"vault.api_key"},
        lambda s: frozenset({"vault.api_key", "x.y"}) & s,
        lambda s: s - {"tokens"},
        lambda s: (frozenset({"x.y"}) - s) | s,
        lambda s: s ^ {"x.y"},
        lambda s: s.union({"x.y"}, {"z"}),
        lambda s: s.intersection(s),
        lambda s: s.difference(set()),
        lambda s: s.symmetric_difference(set()),
    ],
)
def test_secret_keys_keep_their_schema_through_copies_pickles_and_set_operations(
    made: Callable[[SecretKeys], frozenset[str]],
) -> None:
    """A plain frozenset in their place would silently show a mistyped key's value."""
    secrets = secret_keys(Mapped)
    other = made(secrets)
    assert "vault.api_key" in other
    assert hides("vault.api_keyy", other) and hides("vault.api_key", other)
    assert not hides("train.lr", other)
    assert isinstance(other, SecretKeys)
    assert other.leaves == secrets.leaves and other.mappings == secrets.mappings
    assert not hides("weights.head", other)


def test_secret_keys_cannot_be_edited() -> None:
    secrets = secret_keys(Mapped)
    with pytest.raises(AttributeError):
        secrets.leaves = frozenset()
    assert "train.lr" in secrets.leaves


# --- the CLI ----------------------------------------------------------------------------------


def test_a_key_of_a_mapping_field_is_shown_and_one_of_a_secret_mapping_is_not(
    etcd: EtcdServer,
) -> None:
    token = "mapped-token-secret-1111"
    shown = {"set": ok(hk(etcd, "set", "weights.head=0.5", schema=MAPPED))}
    assert "weights.head  -    0.5" in shown["set"] and SECRET_MASK not in shown["set"]
    done = hk(etcd, "set", "--json", "weights.tail=0.25", f"tokens.a={token}", schema=MAPPED)
    shown["set --json"] = ok(done)
    assert json.loads(done.stdout)["changed"] == {"weights.tail": 0.25, "tokens.a": SECRET_MASK}
    shown["history"] = ok(hk(etcd, "history", "--json", schema=MAPPED))
    values = {e["key"]: e["value"] for e in json.loads(shown["history"])["entries"]}
    assert values == {"weights.head": 0.5, "weights.tail": 0.25, "tokens.a": SECRET_MASK}
    guard = ["--guard", "loss < 100", "--window", "5"]
    shown["set --guard"] = ok(hk(etcd, "set", "weights.head=0.75", *guard, schema=MAPPED))
    (record,) = guard_records(etcd)
    assert record["keys"]["weights.head"] == {"old": 0.5, "existed": True, "new": 0.75}
    shown["status"] = ok(hk(etcd, "status", schema=MAPPED))
    assert "weights.head=0.75 (was 0.5)" in shown["status"]
    assert_hidden((token,), **shown)


def test_set_history_unset_and_rollback_show_no_secret(etcd: EtcdServer) -> None:
    first, dry, second = "set-first-secret-1111", "dry-run-secret-2222", "set-json-secret-3333"
    pinned, env_pinned = "cli-pinned-secret-4444", "env-pinned-secret-5555"
    typed, section, typo = "etcd-shadowed-secret-6666", "section-secret-7777", "typo-secret-8888"
    secrets = (first, dry, second, pinned, env_pinned, typed, section, typo)
    shown: dict[str, str] = {}
    shown["set"] = ok(hk(etcd, "set", f"service.api_key={first}", "train.lr=0.02"))
    assert "0.02" in shown["set"] and SECRET_MASK in shown["set"]  # other values still shown
    shown["set --dry-run --json"] = ok(
        hk(etcd, "set", "--dry-run", "--json", f"service.api_key={dry}")
    )
    diff = json.loads(shown["set --dry-run --json"])
    assert diff == {
        "service.api_key": {
            "old": SECRET_MASK,
            "new": SECRET_MASK,
            "existed": True,
            "deleted": False,
        }
    }
    done = hk(etcd, "set", "--json", f"service.api_key={second}")
    shown["set --json"] = ok(done)
    assert json.loads(done.stdout)["changed"] == {"service.api_key": SECRET_MASK}
    rollback_to = json.loads(done.stdout)["revision"]
    # Shadowed: the warning names the effective value, here one the operator never typed.
    shown["set shadowed by cli"] = ok(
        hk(etcd, "set", f"service.backup_key={typed}", "--set", f"service.backup_key={pinned}")
    )
    env = {"HOTKNOB_PARAM_SERVICE__BACKUP_KEY": env_pinned}
    shown["set shadowed by env"] = ok(hk(etcd, "set", f"service.backup_key={typed}x", env=env))
    assert "shadowed by the env layer" in shown["set shadowed by env"]
    shown["rollback"] = ok(hk(etcd, "rollback", "--to-revision", str(rollback_to)))
    assert f"service.backup_key  {SECRET_MASK}  (deleted)" in shown["rollback"]
    # Written around hotknob: a section key holding JSON, and a mistyped key.
    etcd.etcdctl("put", P + "service", json.dumps({"api_key": section}))
    etcd.etcdctl("put", P + "service/api_keyy", typo)
    for args in (
        ("get",),
        ("history", "service.api_key"),
        ("history",),
        ("history", "--json"),
        ("history", "service", "--json"),
        ("unset", "service.api_key", "--dry-run"),
        ("unset", "service", "--dry-run", "--json"),
        ("rollback", "--to-revision", str(rollback_to), "--dry-run"),
        ("rollback", "--to-revision", "1", "--dry-run", "--json"),
    ):
        shown[" ".join(args)] = ok(hk(etcd, *args))
    assert "not a key of the schema" in shown["get"]
    entries = json.loads(shown["history --json"])["entries"]
    assert {e["value"] for e in entries if not e["deleted"]} == {SECRET_MASK, 0.02}
    assert "train.lr" in shown["history"] and "0.02" in shown["history"]
    assert_hidden(secrets, **shown)
    # Only what is shown is masked: etcd holds the real value.
    out = etcd.etcdctl("get", P + "service/api_key", "--print-value-only").stdout
    assert out.strip() == json.dumps(second)


def test_status_shows_no_secret_of_a_guarded_change(etcd: EtcdServer) -> None:
    old, new = "guard-old-secret-1111", "guard-new-secret-2222"
    ok(hk(etcd, "set", f"service.api_key={old}"))
    guarded = ok(
        hk(etcd, "set", f"service.api_key={new}", "--guard", "loss < 100", "--window", "5")
    )
    status = ok(hk(etcd, "status"))
    status_json = hk(etcd, "status", "--json")
    (record,) = json.loads(status_json.stdout)["guards"]
    assert record["keys"]["service.api_key"] == {
        "old": SECRET_MASK,
        "existed": True,
        "new": SECRET_MASK,
        "secret": True,
    }
    assert f"service.api_key={SECRET_MASK} (was {SECRET_MASK})" in status
    # Without the schema at hand, the record itself says which keys are secret.
    plain = run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint)
    assert_hidden(
        (old, new),
        set=guarded,
        status=status,
        status_json=status_json.stdout + status_json.stderr,
        status_without_schema=ok(plain),
    )
    # The record in etcd keeps the real values: a revert writes the old one back.
    (stored,) = guard_records(etcd)
    assert stored["keys"]["service.api_key"]["old"] == old
    assert stored["keys"]["service.api_key"]["new"] == new


# --- the daemon's log and watch ---------------------------------------------------------------


def test_a_reverted_secret_change_is_masked_in_the_log_watch_and_status(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    old, new = "revert-old-secret-1111", "revert-new-secret-2222"
    etcd.etcdctl("put", P + "service/api_key", json.dumps(old))
    with (
        DaemonProcess(
            tmp_path, app=APP, endpoints=etcd.endpoint, extra=[*SCHEMA, "--node", "n1"]
        ) as daemon,
        RawClient(daemon.socket_path, "w", watch=True) as watcher,
        RawClient(daemon.socket_path, "c1") as client,
    ):
        # Three events: the guarded change accepted, reverted, and the revert accepted.
        watch_text, watch_json = WatchCli(daemon, 3), WatchCli(daemon, 3, "--json")
        try:
            watching(daemon, 2)
            client.send({"type": "applied", "version": client.snapshot["version"], "step": 0})
            guarded = hk(
                etcd, "set", f"service.api_key={new}", "--guard", "loss < 3", "--window", "50"
            )
            update = client.next_update()
            assert update["values"]["service"]["api_key"] == new  # the process gets it
            client.send({"type": "applied", "version": update["version"], "step": 1})
            wait_for("the guard to be armed", lambda: daemon.events("guard_armed"))
            client.send(metrics(2, loss="inf"))
            # The revert put the real old value back.
            assert client.next_update()["values"]["service"]["api_key"] == old
            (reverted,) = wait_for("the revert", lambda: daemon.events("change_reverted"))
            assert reverted["restored"] == {"service.api_key": SECRET_MASK}
            assert reverted["replaced"] == {"service.api_key": SECRET_MASK}
            # A watch connection gets the updates too (with the values, as any process
            # does); what ``hotknob watch`` prints for people is the events.
            events: list[dict[str, Any]] = []
            while not events or events[-1].get("event") != "change_reverted":
                message = watcher.next()
                if message["type"] == "event":
                    events.append(message)
            assert events[-1]["restored"] == {"service.api_key": SECRET_MASK}
            wait_for("the record ended", lambda: guard_records(etcd)[0]["state"] == "reverted")
            status = ok(hk(etcd, "status", "--json"))
        finally:
            text, as_json = watch_text.output(), watch_json.output()
        assert "REVERTED" in text and "change_reverted" in as_json
        log = daemon.log()
    (stored,) = guard_records(etcd)
    assert stored["keys"]["service.api_key"]["old"] == old  # kept for the revert
    assert stored["outcome"]["restored"] == {"service.api_key": SECRET_MASK}
    assert_hidden(
        (old, new),
        set=ok(guarded),
        log=log,
        watch_events=json.dumps(events),
        watch=text,
        watch_json=as_json,
        status=status,
    )


def test_a_validator_s_message_about_a_secret_is_withheld(etcd: EtcdServer, tmp_path: Path) -> None:
    token, pin, typed = "BAD-token-secret-1111", "12ab-pin-secret-2222", "BAD-typed-secret-3333"
    with DaemonProcess(
        tmp_path, app=APP, endpoints=etcd.endpoint, extra=[*CHECKED, "--node", "n1"]
    ) as daemon:
        watch = WatchCli(daemon, 2, "--json")
        try:
            watching(daemon, 1)
            etcd.etcdctl("put", P + "svc/token", token)
            etcd.etcdctl("put", P + "svc/pin", json.dumps(pin))
            wait_for("both rejected", lambda: len(daemon.events("change_rejected")) >= 2)
        finally:
            watched = watch.output()
        log = daemon.log()
    rejected = daemon.events("change_rejected")
    assert all("its message is withheld for a secret key" in r["reason"] for r in rejected)
    assert "error type value_error" in rejected[0]["reason"]
    assert "error type assertion_error" in rejected[1]["reason"]
    assert "withheld" in watched
    done = hk(etcd, "set", f"svc.token={typed}", schema=CHECKED)
    assert done.returncode == 1 and "refused by a validator of the schema" in done.stderr
    get = hk(etcd, "get", schema=CHECKED)
    assert "ignoring etcd value of svc.token: refused by a validator" in ok(get)
    # Pydantic's own messages never hold the input, and a message about a key that is
    # not secret is not withheld.
    short = hk(etcd, "set", "svc.token=tk-1", schema=CHECKED)
    assert "at least 12" in short.stderr
    name = hk(etcd, "set", "svc.name=UPPER", schema=CHECKED)
    assert "name must be lowercase, got 'UPPER'" in name.stderr
    assert_hidden(
        (token, pin, typed),
        log=log,
        watch=watched,
        set=done.stdout + done.stderr,
        get=get.stdout + get.stderr,
    )


def test_values_under_keys_outside_the_schema_are_masked_in_the_log_and_watch(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    section, typo = "section-secret-1111", "typo-secret-2222"
    with DaemonProcess(
        tmp_path, app=APP, endpoints=etcd.endpoint, extra=[*SCHEMA, "--node", "n1"]
    ) as daemon:
        watch_text, watch_json = WatchCli(daemon, 2), WatchCli(daemon, 2, "--json")
        try:
            watching(daemon, 2)
            etcd.etcdctl("put", P + "service", json.dumps({"api_key": section}))
            etcd.etcdctl("put", P + "service/api_keyy", typo)
            wait_for("both rejected", lambda: len(daemon.events("change_rejected")) >= 2)
        finally:
            text, as_json = watch_text.output(), watch_json.output()
        log = daemon.log()
    rejected = daemon.events("change_rejected")
    assert [r["new"] for r in rejected] == [
        {"service": SECRET_MASK},
        {"service.api_keyy": SECRET_MASK},
    ]
    assert "a section, not one value" in rejected[0]["reason"]
    assert "not a key of the schema" in rejected[1]["reason"]
    assert "not a key of the schema" in text
    get = hk(etcd, "get")
    assert_hidden(
        (section, typo), log=log, watch=text, watch_json=as_json, get=get.stdout + get.stderr
    )


class _Creds(BaseModel):
    user: str = "ada"
    token: SecretStr = SecretStr("s3cret-default")


class _HeldSecrets(BaseModel):
    """Leaves that hold secrets inside them: a model, a mapping of them, a list of models."""

    opt: _Creds | None = Field(default_factory=_Creds)
    keys: dict[str, SecretStr] = Field(default_factory=lambda: {"hf": SecretStr("hf_abc123")})
    many: list[_Creds] = Field(default_factory=lambda: [_Creds()])
    lr: float = 0.1


def test_a_leaf_that_holds_secrets_reaches_clients_whole_and_is_shown_nowhere() -> None:
    from hotknob.config import cli_layer, defaults_layer, merge_layers
    from hotknob.config.secrecy import secret_keys, shown_value

    secrets = secret_keys(_HeldSecrets)
    assert set(secrets) == {"opt", "keys", "many"}
    defaults = defaults_layer(_HeldSecrets)
    assert defaults.values["opt"] == {"user": "ada", "token": "s3cret-default"}
    cli = cli_layer(['opt.token="given-secret"', 'keys={"hf": "hf_given"}'])
    snap = merge_layers(_HeldSecrets, [defaults, cli])
    # Clients get the values themselves, as for a secret leaf...
    assert snap.values["opt"] == {"user": "ada", "token": "given-secret"}
    assert snap.values["keys"] == {"hf": "hf_given"}
    assert snap.values["many"] == [{"user": "ada", "token": "s3cret-default"}]
    # ...and whatever shows a value to people masks the whole leaf, and keys inside it.
    for key in ("opt", "keys", "many", "opt.token", "keys.hf"):
        assert shown_value(key, "x", secrets) == SECRET_MASK
    assert shown_value("lr", 0.1, secrets) == 0.1
