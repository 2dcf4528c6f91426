"""A custom layer order (``--precedence``) as users give it: real daemons, real etcd, real
files, and the commands that read and write the configuration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from hotknob.config import UsageError, parse_precedence
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guards import wait_for

pytestmark = pytest.mark.timeout(60)

FILES_OVER_ETCD = "defaults,etcd,files,env,cli"  # git wins over live edits


def _save(path: Path, text: str) -> None:
    """Saved as an editor saves it: written aside, renamed over."""
    aside = path.with_name(path.name + ".new")
    aside.write_text(text)
    os.replace(aside, path)


@pytest.mark.parametrize(
    "order",
    ["files,defaults,etcd,env,cli", "cli,env,etcd,files,defaults", "env,defaults,files,etcd,cli"],
)
def test_an_order_with_defaults_not_first_is_a_usage_error(order: str) -> None:
    with pytest.raises(UsageError):
        parse_precedence(order)
    done = run_cli("get", "train.lr", "--precedence", order, drop="HOTKNOB_")
    assert done.returncode == 2, done
    assert done.stderr.startswith("hotknob: --precedence must"), done.stderr
    assert "Traceback" not in done.stderr


def test_files_over_etcd_an_invalid_etcd_value_the_files_shadow_is_refused(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """Under ``defaults,etcd,files,...`` an etcd value a file shadows comes into force when
    the file drops its key. Taken while shadowed, it made the daemon refuse that valid edit
    of the file later. It is refused as it comes (at the start, and as a live change), as
    ``set`` refuses it, and the file's edit is taken."""
    config = tmp_path / "params.yaml"
    config.write_text("train:\n  lr: 0.5\n  momentum: 0.5\n")
    etcd.etcdctl("put", "--", "/hotknob/t/config/train/lr", "-1")  # before the daemon
    daemon = DaemonProcess(
        tmp_path,
        endpoints=etcd.endpoint,
        configs=[config],
        extra=["--precedence", FILES_OVER_ETCD],
    )
    with daemon:
        client = RawClient(daemon.socket_path)
        try:
            assert client.snapshot["values"]["train"]["lr"] == 0.5
            assert client.snapshot["sources"]["train.lr"] == "files"
            etcd.etcdctl("put", "/hotknob/t/config/train/momentum", "1.5")  # live, shadowed

            def refused() -> set[str]:
                events = daemon.events("change_rejected")
                return {key for event in events for key in event["key"].split(",")}

            wait_for(
                "both etcd values refused", lambda: {"train.lr", "train.momentum"} <= refused()
            )
            _save(config, "train:\n  weight_decay: 0.1\n")
            update = client.next_update()
            assert update["changed"] == {
                "train.lr": 0.001,
                "train.momentum": 0.9,
                "train.weight_decay": 0.1,
            }
        finally:
            client.close()
    rejected = daemon.events("change_rejected")
    assert rejected and all(e["layer"] == "etcd" for e in rejected), rejected
    assert all("config files" in e["reason"] for e in rejected), rejected


def test_get_and_explain_leave_out_what_the_daemon_refuses_under_the_files(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """The daemon refuses an etcd value the files shadow from above and would refuse once
    they drop its key; ``get`` and ``explain`` showed it as the etcd layer's value."""
    config = tmp_path / "params.yaml"
    config.write_text("train:\n  lr: 0.5\n")
    etcd.etcdctl("put", "--", "/hotknob/t/config/train/lr", "-1")  # around hotknob's checks
    common = ["--app", "t", "--precedence", FILES_OVER_ETCD, "--config", str(config)]
    common += ["--etcd-endpoints", etcd.endpoint]
    for command in ("get", "explain"):
        done = run_cli(command, "train.lr", *common, drop="HOTKNOB_")
        assert done.returncode == 0, done
        assert "ignoring etcd value of train.lr" in done.stderr, done.stderr
        assert "shadowed by the config files" in done.stderr
        assert "-1" not in done.stdout, done.stdout
