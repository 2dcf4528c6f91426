"""Secrets in the places a review found them shown: a real daemon, real etcd, the real CLI.

``--schema tests.test_review_secrets:Booted``: a restart-only secret (``boot_key``,
``json_schema_extra={"live": False}``) beside the secrets of ``tests.secret_schema``.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, SecretStr

from hotknob.config.schema import TrainParams
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer, free_port
from tests.secret_schema import ServiceParams
from tests.test_secrets_hidden import assert_hidden, hk, ok, wait_for

pytestmark = pytest.mark.timeout(120)

APP = "sec"
BOOTED = ["--schema", "tests.test_review_secrets:Booted"]
BOOT_DEFAULT = "boot-default-secret-0000"


class Booted(BaseModel):
    """A schema with a restart-only secret: a process keeps the one it started with."""

    model_config = ConfigDict(extra="forbid")

    train: TrainParams = Field(default_factory=TrainParams)
    service: ServiceParams = Field(default_factory=ServiceParams)
    boot_key: SecretStr = Field(SecretStr(BOOT_DEFAULT), json_schema_extra={"live": False})


def healthz(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
        return json.loads(answer.read())


def test_a_restart_only_secret_pending_a_restart_is_masked_in_the_log_and_healthz(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """``restart_pending`` logged the running and the wanted value, and ``/healthz`` listed
    the wanted one under ``pending_restart``, both as they were: a secret in the clear."""
    new = "boot-new-secret-1111"
    port = free_port()
    extra = [*BOOTED, "--node", "n1", "--metrics-addr", f"127.0.0.1:{port}"]
    with (
        DaemonProcess(tmp_path, app=APP, endpoints=etcd.endpoint, extra=extra) as daemon,
        RawClient(daemon.socket_path, "c1") as client,
    ):
        assert client.snapshot["values"]["boot_key"] == BOOT_DEFAULT  # the process gets it
        # ... and is told not to log it, should it hold it at a restart (``LiveConfig``),
        # as every secret key of the schema.
        secret = ["boot_key", "service.api_key", "service.backup_key"]
        assert client.snapshot["secret"] == secret, client.snapshot
        done = hk(etcd, "set", f"boot_key={new}", schema=BOOTED)
        (pending,) = wait_for("restart_pending", lambda: daemon.events("restart_pending"))
        health = healthz(port)
        log = daemon.log()
    assert (pending["key"], pending["running"], pending["wanted"]) == (
        "boot_key",
        "**********",
        "**********",
    )
    assert health["pending_restart"] == {"boot_key": "**********"}
    assert_hidden((new, BOOT_DEFAULT), set=ok(done), log=log, healthz=json.dumps(health))


def test_a_process_s_error_about_a_secret_key_is_withheld_in_its_status_entry(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """An ``on_change`` callback that raised quoting the secret it was given (``auth
    failed for key ...``) had that text published as it was, in the process's status
    entry in etcd and by ``status``; an error about another key is shown as it is."""
    secret = "callback-secret-2222"
    errors = [
        {"key": "service.api_key", "error": f"RuntimeError: auth failed for key {secret}"},
        {"key": "service", "error": f"KeyError: '{secret}'"},
        {"key": "train.lr", "error": "ValueError: lr 5.0 is too high"},
    ]
    with (
        DaemonProcess(
            tmp_path, app=APP, endpoints=etcd.endpoint, extra=[*BOOTED, "--node", "n1"]
        ) as daemon,
        RawClient(daemon.socket_path, "c1") as client,
    ):
        version = client.snapshot["version"]
        client.send({"type": "applied", "version": version, "step": 0, "errors": errors})

        def entry() -> str:
            return etcd.etcdctl("get", f"/hotknob/{APP}/status/n1/c1", "--print-value-only").stdout

        published = json.loads(wait_for("the status entry", lambda: entry().strip()))
        status = ok(hk(etcd, "status", "--json", schema=BOOTED))
    withheld = "(its message is withheld for a secret key)"
    assert published["errors"] == [
        {"key": "service.api_key", "error": f"RuntimeError {withheld}"},
        {"key": "service", "error": f"KeyError {withheld}"},
        errors[2],
    ]
    assert_hidden((secret,), entry=json.dumps(published), status=status)
