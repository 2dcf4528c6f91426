"""A process that holds a restart-only key at the value wanted again waits for no restart.

The process started with ``train.batch_size`` 32; a ``set`` of 64, its daemon restarted alone
(it starts with 64, the process holds 32), then a ``set`` of 32: its daemon holds 64 back,
the process runs 32, what is wanted. ``status`` and ``set --wait`` said it waited for a
restart, as they still must of a process that runs a third value (it started with 16). Its
ack says, per key held, a fingerprint of the value it runs (``held_digests``), which
its daemon compares with the value it wants.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from hotknob.model_runtime import LiveConfig, protocol
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer
from tests.test_guards import wait_for

pytestmark = pytest.mark.timeout(60)

APP = "t"
KEY = "train.batch_size"


def _daemon(etcd: EtcdServer, workdir: Path, node: str) -> DaemonProcess:
    return DaemonProcess(workdir, endpoints=etcd.endpoint, extra=["--node", node])


def _cli(etcd: EtcdServer, *args: str) -> Any:
    return run_cli(*args, "--app", APP, "--etcd-endpoints", etcd.endpoint)


def _entries(etcd: EtcdServer) -> dict[str, dict[str, Any]]:
    done = _cli(etcd, "status", "--json")
    assert done.returncode == 0, done.stderr
    return {e["client"]: e for e in json.loads(done.stdout)["processes"]}


def _waits(entry: dict[str, Any]) -> bool:
    """Whether ``entry`` says its process waits for a restart for ``KEY``, by either list."""
    return any(KEY in (entry.get(name) or []) for name in ("restart_pending", "held"))


def test_a_process_that_runs_the_value_wanted_waits_for_no_restart(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    daemons: list[DaemonProcess] = []

    def start(node: str) -> DaemonProcess:
        daemon = _daemon(etcd, tmp_path / node, node).start()
        daemons.append(daemon)
        return daemon

    try:
        with ExitStack() as stack:
            first = start("n1")
            runs32 = LiveConfig.connect(socket=first.socket_path, timeout=10, client="runs32")
            stack.enter_context(runs32)
            assert runs32[KEY] == 32
            runs32.apply(0)
            etcd.etcdctl("put", f"/hotknob/{APP}/config/train/batch_size", "16")
            second = start("n2")  # starts with 16
            runs16 = LiveConfig.connect(socket=second.socket_path, timeout=10, client="runs16")
            stack.enter_context(runs16)
            assert runs16[KEY] == 16
            runs16.apply(0)
            done = _cli(etcd, "set", f"{KEY}=64")
            assert done.returncode == 0, done.stderr
            # Both daemons restarted alone: they start with 64, their processes hold theirs.
            for daemon in (first, second):
                daemon.stop()
            start("n1")
            start("n2")
            step = [0]

            def both_hold() -> bool:
                step[0] += 1
                runs32.apply(step[0])
                runs16.apply(step[0])
                entries = _entries(etcd)
                clients = ("runs32", "runs16")
                return all(KEY in entries.get(c, {}).get("held", []) for c in clients)

            wait_for("both processes to say they hold the key", both_hold, timeout=20)
            assert runs32[KEY] == 32 and runs16[KEY] == 16

            done = _cli(etcd, "set", f"{KEY}=32", "--wait", "20")
            assert done.returncode == 0, done.stderr
            # Only the process that runs 16 is named as waiting for a restart.
            assert "waits for a restart of 1 of them (n2/runs16)" in done.stdout, done.stdout
            entries = _entries(etcd)
            assert not _waits(entries["runs32"]), entries["runs32"]
            assert entries["runs16"]["restart_pending"] == [KEY], entries["runs16"]
            assert entries["runs16"]["held"] == [KEY], entries["runs16"]
            # Published: the keys alone, never a fingerprint.
            assert "held_digests" not in json.dumps(entries)
            status = _cli(etcd, "status")
            waiting = [line for line in status.stdout.splitlines() if "as it started" in line]
            assert len(waiting) == 1 and "n2/runs16" in waiting[0], status.stdout

            # Wanted at 16 now: the process that runs 16 waits for none, the other does.
            done = _cli(etcd, "set", f"{KEY}=16")
            assert done.returncode == 0, done.stderr

            def flipped() -> bool:
                entries = _entries(etcd)
                return _waits(entries["runs32"]) and not _waits(entries["runs16"])

            wait_for("the other process to be the one waiting", flipped, timeout=10)
    finally:
        for daemon in daemons:
            daemon.stop()


def test_a_malformed_held_digests_is_refused(tmp_path: Path) -> None:
    """Checked as ``held`` is: 32 lowercase hex digits for each fingerprint, of keys the
    ack holds. A well-formed one is taken silently."""
    # The documented fingerprint: BLAKE2b of 16 bytes of the value's JSON.
    digest = hashlib.blake2b(b"32", digest_size=16).hexdigest()
    good = {KEY: digest}
    bad: list[Any] = [
        "x",
        [KEY],
        {KEY: "xyz"},  # not hex digits
        {KEY: digest.upper()},  # uppercase
        {KEY: "0" * 31},  # too short
        {"train.lr": digest},  # a key not held
        {KEY: 32},
    ]
    with DaemonProcess(tmp_path) as daemon:
        with RawClient(daemon.socket_path, "fine") as client:
            version = client.snapshot["version"]
            applied = protocol.applied(version, 1, held=[KEY], held_digests=good)
            client.send(applied)
            assert client.no_message(0.3)  # taken: no error, the connection stays
        for digests in bad:
            with RawClient(daemon.socket_path, "malformed") as client:
                version = client.snapshot["version"]
                client.send(protocol.applied(version, 1, held=[KEY], held_digests=digests))
                answer = client.next(timeout=3)
                assert answer["type"] == "error", (digests, answer)
                assert '"held_digests" must be' in answer["error"], answer
                with pytest.raises(EOFError):
                    client.next()
    # What the runtime sends is that fingerprint; 32 and 32.0 differ.
    assert protocol.held_digest(32) == digest
    assert protocol.held_digest(32.0) != digest
