"""``hotknob run`` end to end: real etcd, real files, a real daemon process, raw socket clients."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer, free_port

pytestmark = pytest.mark.timeout(90)

APP = "t"
P = f"/hotknob/{APP}/config/"


def put(etcd: EtcdServer, key: str, value: str) -> None:
    etcd.etcdctl("put", "--", P + key, value)


def test_put_and_two_key_txn_each_arrive_as_one_update(etcd: EtcdServer, tmp_path: Path) -> None:
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path) as client,
    ):
        v0 = client.snapshot["version"]
        assert client.snapshot["values"]["train"]["lr"] == 1e-3
        assert client.snapshot["sources"]["train.lr"] == "defaults"

        put(etcd, "train/lr", "0.02")
        update = client.next_update()
        assert update["version"] == v0 + 1
        assert update["changed"] == {"train.lr": 0.02}
        assert update["values"]["train"]["lr"] == 0.02

        etcd.etcdctl(
            "txn",
            input=f"\nput {P}train/lr 0.03\nput {P}train/momentum 0.5\n\n\n",
        )
        update = client.next_update()
        assert update["version"] == v0 + 2
        assert update["changed"] == {"train.lr": 0.03, "train.momentum": 0.5}
        assert client.no_message(0.5), "a transaction must arrive as exactly one update"


@pytest.mark.parametrize(
    ("key", "raw"),
    [("train/lr", "-1"), ("train/lr", "banana"), ("sampling/top_p", "2.0"), ("train/bogus", "1")],
)
def test_invalid_values_reach_no_client(
    etcd: EtcdServer, tmp_path: Path, key: str, raw: str
) -> None:
    put(etcd, "train/lr", "0.05")
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path) as client,
    ):
        put(etcd, key, raw)
        put(etcd, "sampling/temperature", "0.5")  # a later valid change still goes through
        update = client.next_update()
        assert update["changed"] == {"sampling.temperature": 0.5}
        assert update["values"]["train"]["lr"] == 0.05
        assert update["values"]["sampling"]["top_p"] == 1.0
        assert "bogus" not in update["values"]["train"]
        rejected = daemon.events("change_rejected")
        assert rejected and key.replace("/", ".") in rejected[0]["key"]
        assert daemon.proc is not None and daemon.proc.poll() is None


def test_etcd_killed_and_restarted_during_a_stream(etcd: EtcdServer, tmp_path: Path) -> None:
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path) as client,
    ):
        versions = [client.snapshot["version"]]
        written = []
        for i in range(1, 31):
            if i == 11:
                etcd.kill()
                etcd.restart()
            value = f"0.5{i:02d}"
            put(etcd, "train/lr", value)
            written.append(float(value))
        seen_lr = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            update = client.next_update(timeout=20)
            versions.append(update["version"])
            seen_lr.append(update["values"]["train"]["lr"])
            if seen_lr[-1] == written[-1]:
                break

        # The daemon takes every value, in order, each with its version (the line of a lone
        # change is logged after its push: the client may have it first).
        def accepted_now() -> list[dict[str, Any]]:
            events = daemon.events("change_accepted")
            return [e for e in events if "train.lr" in e["new"]]

        while len(accepted := accepted_now()) < len(written) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [e["new"]["train.lr"] for e in accepted] == written, "no change is lost"
        taken = [e["version"] for e in accepted]
        assert taken == list(range(taken[0], taken[0] + len(taken)))
        # A client gets the newest state, in order; revisions that reach the daemon
        # together (the watch's catch-up after etcd came back, a busy moment) are pushed
        # as one (protocol.md: "versions a client sees strictly increase, but may skip").
        assert seen_lr[-1] == written[-1]
        assert versions == sorted(set(versions)), "versions strictly increase"
        assert seen_lr == sorted(seen_lr), "values arrive in order"
        assert len(seen_lr) == len(set(seen_lr)), "no change arrives twice"
        assert set(seen_lr) <= set(written)
        by_version = {e["version"]: e["new"]["train.lr"] for e in accepted}
        assert all(by_version[v] == lr for v, lr in zip(versions[1:], seen_lr, strict=True))


def test_compaction_while_disconnected_resyncs(etcd: EtcdServer, tmp_path: Path) -> None:
    put(etcd, "train/lr", "0.01")
    put(etcd, "train/momentum", "0.5")
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path) as client,
    ):
        daemon.signal(signal.SIGSTOP)  # frozen: it cannot see what happens next
        try:
            etcd.kill()  # its watch stream breaks; it must resume from its last revision + 1
            etcd.restart()
            for i in range(5):
                put(etcd, "train/lr", f"0.0{i + 2}")
            etcd.etcdctl("del", P + "train/momentum")
            header = json.loads(etcd.etcdctl("get", P, "--prefix", "-w", "json").stdout)["header"]
            etcd.etcdctl("compact", str(header["revision"]))  # ...which is now compacted away
        finally:
            daemon.signal(signal.SIGCONT)
        deadline = time.monotonic() + 30
        values = client.snapshot["values"]
        while time.monotonic() < deadline and not (
            values["train"]["lr"] == 0.06 and values["train"]["momentum"] == 0.9
        ):
            values = client.next_update(timeout=25)["values"]
        assert values["train"]["lr"] == 0.06
        assert values["train"]["momentum"] == 0.9  # the delete was seen: back to the default


def test_start_with_etcd_down_serves_last_known_good_then_reconciles(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    put(etcd, "train/lr", "0.07")
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        RawClient(daemon.socket_path) as client,
    ):
        assert client.snapshot["values"]["train"]["lr"] == 0.07
        first_version = client.snapshot["version"]
    etcd.stop()
    daemon = DaemonProcess(tmp_path, endpoints=etcd.endpoint)
    with daemon, RawClient(daemon.socket_path) as client:
        assert client.snapshot["values"]["train"]["lr"] == 0.07
        assert client.snapshot["version"] == first_version
        assert daemon.events("serving_last_known_good")
        etcd.restart()
        put(etcd, "train/lr", "0.08")
        update = client.next_update(timeout=30)
        assert update["values"]["train"]["lr"] == 0.08
        assert update["version"] == first_version + 1


def test_file_edit_is_one_update_and_half_written_file_none(tmp_path: Path) -> None:
    config = tmp_path / "conf" / "params.yaml"
    config.parent.mkdir()
    config.write_text("train:\n  lr: 0.1\n")
    with (
        DaemonProcess(tmp_path, configs=[config]) as daemon,
        RawClient(daemon.socket_path) as client,
    ):
        assert client.snapshot["sources"]["train.lr"] == "files"
        tmp = config.with_name(".params.yaml.tmp")
        tmp.write_text("train:\n  lr: 0.2\n")
        os.replace(tmp, config)
        update = client.next_update()
        assert update["changed"] == {"train.lr": 0.2}
        config.write_text("train:\n  lr: [0.3\n")  # half-written: not valid YAML
        assert client.no_message(1.0)
        config.write_text("train:\n  lr: 0.3\n")
        assert client.next_update()["changed"] == {"train.lr": 0.3}
        config.write_text("train:\n  lr: -5\n")  # parses, but invalid: rejected
        assert client.no_message(1.0)
        assert daemon.events("change_rejected")


def test_a_watcher_hears_why_a_file_edit_did_not_land(tmp_path: Path) -> None:
    """An unparsable or vanished config file changes nothing; ``watch`` says so (before,
    only the daemon's log did, and whoever was editing saw nothing)."""
    from hotknob.daemon.cmd_live import _describe

    config = tmp_path / "params.yaml"
    config.write_text("train:\n  lr: 0.1\n")
    with (
        DaemonProcess(tmp_path, configs=[config]) as daemon,
        RawClient(daemon.socket_path, watch=True) as watcher,
    ):
        version = watcher.snapshot["version"]
        config.write_text("train:\n  lr: [0.3\n")
        event = watcher.next()
        assert event["event"] == "file_invalid" and event["layer"] == "files"
        assert event["path"] == str(config) and event["version"] == version
        assert "not valid YAML" in event["reason"]
        line = _describe(event)
        assert "REJECTED [files]" in line and "not valid YAML" in line
        assert line.endswith(f"(v{version} stays in force)")
        config.unlink()
        gone = watcher.next()
        assert gone["event"] == "file_invalid" and "no such file" in gone["reason"]
        config.write_text("train:\n  lr: 0.3\n")
        accepted = watcher.next()
        while accepted["type"] != "event":  # the update itself comes too
            accepted = watcher.next()
        assert accepted["event"] == "change_accepted"
        assert accepted["changed"] == {"train.lr": 0.3}
        assert len(daemon.events("config_file_invalid")) == 2


def test_sighup_rereads_files(tmp_path: Path) -> None:
    config = tmp_path / "params.json"
    config.write_text('{"train": {"lr": 0.1}}')
    with (
        DaemonProcess(tmp_path, configs=[config]) as daemon,
        RawClient(daemon.socket_path) as client,
    ):
        daemon.signal(signal.SIGHUP)
        assert client.no_message(0.5)  # unchanged contents: no change
        config.write_text('{"train": {"lr": 0.4}}')
        daemon.signal(signal.SIGHUP)
        assert client.next_update()["values"]["train"]["lr"] == 0.4


def test_a_burst_of_sighups_while_a_writer_holds_a_file_is_one_wait_then_one_reread(
    tmp_path: Path,
) -> None:
    """Each re-read waits for the file's writer: a burst of signals makes one more re-read
    after the running one, not a waiting thread each (they held the executor's threads,
    and the stop queued behind them)."""
    config = tmp_path / "params.yaml"
    config.write_text("train:\n  lr: 0.1\n")
    with (
        DaemonProcess(tmp_path, configs=[config]) as daemon,
        RawClient(daemon.socket_path) as client,
    ):
        with open(config, "r+") as writer:  # an in-place writer, holding the file open
            writer.truncate(0)
            writer.write("train:\n  lr: 0.4\n")
            writer.flush()
            time.sleep(0.2)  # the watcher has seen the open for writing
            for _ in range(10):
                daemon.signal(signal.SIGHUP)
                time.sleep(0.02)
            deadline = time.monotonic() + 5
            while len(daemon.events("files_reload_requested")) < 10:
                assert time.monotonic() < deadline, "the signals were not all taken"
                time.sleep(0.02)
        assert client.next_update()["values"]["train"]["lr"] == 0.4
        time.sleep(0.3)  # the one re-read after it (the file is closed now: no wait)
        assert len(daemon.events("config_reload_waits_for_writer")) == 1


def test_twenty_clients_one_stuck(etcd: EtcdServer, tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon:
        stuck = RawClient(daemon.socket_path, name="stuck")
        clients = [RawClient(daemon.socket_path, name=f"c{i}") for i in range(19)]
        try:
            for i in range(1, 21):
                put(etcd, "train/lr", f"0.{i:02d}")
                for client in clients:
                    update = client.next_update(timeout=10)
                    assert update["values"]["train"]["lr"] == float(f"0.{i:02d}")
        finally:
            for client in [stuck, *clients]:
                client.close()


def test_sigterm_stops_cleanly_and_removes_socket(etcd: EtcdServer, tmp_path: Path) -> None:
    metrics_port = free_port()
    daemon = DaemonProcess(
        tmp_path, endpoints=etcd.endpoint, extra=["--metrics-addr", f"127.0.0.1:{metrics_port}"]
    ).start()
    try:
        with RawClient(daemon.socket_path):
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/healthz", timeout=5)
            health = json.loads(body.read())
            assert health["ok"] is True and health["etcd_connected"] is True
            text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read()
            assert b"hotknob_config_version" in text
            assert b"hotknob_clients_connected 1.0" in text
            started = time.monotonic()
            daemon.signal(signal.SIGTERM)
            assert daemon.proc is not None
            assert daemon.proc.wait(timeout=5) == 0
            assert time.monotonic() - started < 5
        assert not daemon.socket_path.exists()
        assert daemon.events("daemon_stopped")
    finally:
        daemon.stop()


def test_invalid_start_input_is_one_line_and_exit_1(tmp_path: Path) -> None:
    from tests.daemon_proc import run_cli

    done = run_cli("run", "--socket", str(tmp_path / "s.sock"), "--set", "train.lr=-1")
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()  # the daemon's log, then the one error line
    assert lines[-1].startswith("hotknob: train.lr (from cli)")
    assert "Traceback" not in done.stderr
    assert "daemon_stopped" not in done.stderr  # it never started


@pytest.mark.parametrize(
    ("flag", "value", "says"),
    [
        ("--status-ttl", "0", "--status-ttl must be 2 seconds or more, got 0"),
        ("--etcd-start-timeout", "-1", "--etcd-start-timeout must be 0 or more"),
        ("--status-every", "-1", "--status-every must be 0 to 3600 seconds, got -1.0"),
        ("--status-every", "nan", "--status-every must be 0 to 3600 seconds, got nan"),
    ],
)
def test_nonsense_timings_are_a_usage_error(
    tmp_path: Path, flag: str, value: str, says: str
) -> None:
    from tests.daemon_proc import run_cli

    done = run_cli("run", "--socket", str(tmp_path / "s.sock"), flag, value)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr


def test_a_lone_change_is_pushed_from_the_watch_thread(etcd: EtcdServer, tmp_path: Path) -> None:
    """No hand-over to the event loop for a change that comes alone
    (docs/performance-history.md, fourth round)."""
    daemon_proc, metrics_port = daemon_with_metrics(tmp_path, etcd)
    with daemon_proc as daemon, RawClient(daemon.socket_path, watch=True) as client:
        for i, lr in enumerate(("0.02", "0.03")):
            put(etcd, "train/lr", lr)
            update = client.next_update()
            assert update["values"]["train"]["lr"] == float(lr)
            event = client.next()  # the watcher's event comes from the loop, after the push
            assert event["type"] == "event" and event["event"] == "change_accepted"
            assert event["version"] == update["version"]
            # Counted once the watch thread is done with the change, which may be just
            # after its event went out from the loop.
            expected = {"watch_thread": i + 1, "loop": 0}
            deadline = time.monotonic() + 5
            while (counts := etcd_changes_by_path(metrics_port)) != expected:
                assert time.monotonic() < deadline, counts
                time.sleep(0.01)
        put(etcd, "train/lr", "-1")  # rejected on the watch thread: reaches no client
        assert client.next()["event"] == "change_rejected"
        assert daemon.events("change_rejected")


def test_etcd_changes_on_the_watch_thread_and_file_edits_on_the_loop_interleave(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """Both ways into the engine at once: one state sequence, versions only increase."""
    import threading

    config = tmp_path / "params.yaml"
    config.write_text("sampling:\n  temperature: 0.5\n")
    temperatures = [round(0.5 + i / 100, 2) for i in range(1, 13)]
    lrs = [round(0.01 + i / 1000, 3) for i in range(1, 13)]

    def edit_files() -> None:
        for t in temperatures:
            tmp = config.with_name(".params.yaml.tmp")
            tmp.write_text(f"sampling:\n  temperature: {t}\n")
            os.replace(tmp, config)
            time.sleep(0.07)

    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, configs=[config]) as daemon,
        RawClient(daemon.socket_path) as client,
    ):
        editor = threading.Thread(target=edit_files)
        editor.start()
        for lr in lrs:
            put(etcd, "train/lr", str(lr))
        editor.join()
        versions = [client.snapshot["version"]]
        values = client.snapshot["values"]
        while (values["train"]["lr"], values["sampling"]["temperature"]) != (
            lrs[-1],
            temperatures[-1],
        ):
            update = client.next_update()
            versions.append(update["version"])
            values = update["values"]
            assert values["train"]["lr"] in [1e-3, *lrs]
            assert values["sampling"]["temperature"] in [0.5, *temperatures]
        assert versions == sorted(set(versions))
        assert not daemon.events("event_failed")


def test_bursts_go_through_the_loop_and_a_lone_change_never_overtakes_them(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """Bursts (grouped on the loop, pushes held back) alternate with lone changes (taken
    on the watch thread): the client ends on the last value, no push comes out of order."""
    from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore

    daemon_proc, metrics_port = daemon_with_metrics(tmp_path, etcd)
    store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5))
    try:
        with daemon_proc as daemon, RawClient(daemon.socket_path) as client:
            value = 0
            for _ in range(5):
                for _ in range(60):  # back to back: a burst
                    value += 1
                    store.put(P + "train/warmup_steps", str(value))
                time.sleep(0.003)
                value += 1
                store.put(P + "train/warmup_steps", str(value))  # then one alone
                time.sleep(0.02)
            versions = [client.snapshot["version"]]
            values = client.snapshot["values"]
            while values["train"]["warmup_steps"] != value:
                update = client.next_update()
                versions.append(update["version"])
                values = update["values"]
            assert versions == sorted(set(versions))
            counts = etcd_changes_by_path(metrics_port)
            assert counts["watch_thread"] + counts["loop"] == value
            assert counts["watch_thread"] >= 1 and counts["loop"] > 0
            assert not daemon.events("publish_out_of_order")
            assert not daemon.events("event_failed")
    finally:
        store.close()


# Without the alarm: what a system without timerfd runs (the watch thread sleeps).
NO_ALARM = "import hotknob.daemon.alarm as alarm\nalarm.Alarm.create = lambda: None"


@pytest.mark.parametrize("before_main", ["", NO_ALARM], ids=["alarm", "no alarm"])
def test_a_lone_change_is_accepted_before_a_client_acks_it(
    etcd: EtcdServer, tmp_path: Path, before_main: str
) -> None:
    """A lone change's work after the push (``change_accepted`` among it) runs a little
    later, once the clients had it; an ack that comes first makes the loop run that work
    before the ack: no version is acked before it was accepted."""
    from hotknob.model_runtime import protocol

    daemon = DaemonProcess(
        tmp_path,
        endpoints=etcd.endpoint,
        extra=["--log-level", "debug"],
        before_main=before_main,
    )
    with daemon, RawClient(daemon.socket_path) as client:
        versions = []
        for lr in ("0.02", "0.03", "0.04"):
            put(etcd, "train/lr", lr)
            update = client.next_update()
            client.send(protocol.applied(update["version"], 1))  # at once
            versions.append(update["version"])
        deadline = time.monotonic() + 5
        while len(daemon.events("change_applied")) < len(versions):
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.01)
        order = [
            (e["event"], e["version"]) for e in daemon.events("change_accepted", "change_applied")
        ]
        for version in versions:
            accepted = order.index(("change_accepted", version))
            assert accepted < order.index(("change_applied", version)), order


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the alarm is a timerfd")
def test_a_change_right_after_a_lone_one_is_not_held_back_by_its_tail(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """The watch thread arms an alarm for a lone change's tail and goes back to etcd at
    once: the next change is pushed without waiting for that tail (which it runs first),
    and its own tail runs when the alarm goes off, with nothing else coming. Here the
    tail waits 3 s instead of 1.5 ms, so that what waits for it is plain to see."""
    tail_s = 3.0
    set_tail = f"import hotknob.daemon.held_tail as held\nheld.TAIL_AFTER_S = {tail_s}"
    daemon = DaemonProcess(tmp_path, endpoints=etcd.endpoint, before_main=set_tail)
    with daemon, RawClient(daemon.socket_path) as client:
        put(etcd, "train/lr", "0.02")
        first = client.next_update()["version"]
        time.sleep(0.05)  # a lone change: not within the feed's drain spacing of the first
        sent = time.monotonic()
        put(etcd, "train/lr", "0.03")
        second = client.next_update()["version"]
        assert time.monotonic() - sent < tail_s / 2
        accepted = [e["version"] for e in daemon.events("change_accepted")]
        assert first in accepted and second not in accepted  # the first's tail ran first
        deadline = sent + tail_s + 10
        while second not in [e["version"] for e in daemon.events("change_accepted")]:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        assert time.monotonic() - sent >= tail_s / 2  # the alarm, not an early call


def daemon_with_metrics(tmp_path: Path, etcd: EtcdServer) -> tuple[DaemonProcess, int]:
    """A daemon on ``etcd`` serving its metrics, and the metrics port."""
    port = free_port()
    extra = ["--metrics-addr", f"127.0.0.1:{port}"]
    return DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=extra), port


def etcd_changes_by_path(metrics_port: int) -> dict[str, float]:
    """``hotknob_etcd_changes_total`` by path: taken on the watch thread or on the loop."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics").read().decode()
    counts = {}
    for path in ("watch_thread", "loop"):
        sample = f'hotknob_etcd_changes_total{{path="{path}"}} '
        [line] = [line for line in text.splitlines() if line.startswith(sample)]
        counts[path] = float(line.removeprefix(sample))
    return counts


def test_sighup_offers_the_files_again_even_unchanged(etcd: EtcdServer, tmp_path: Path) -> None:
    """A file edit rejected as a whole (valid alone, not with what etcd holds) may fit once
    another layer changes: SIGHUP offers the files to the engine again, changed on disk
    or not."""
    config = tmp_path / "params.yaml"
    config.write_text("band:\n  hi: 4\n")
    banded = ["--schema", "tests.banded_schema:Banded"]
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, configs=[config], extra=banded) as daemon,
        RawClient(daemon.socket_path) as client,
    ):
        put(etcd, "band/lo", "2")
        assert client.next_update()["values"]["band"] == {"lo": 2, "hi": 4}
        config.write_text("band:\n  hi: 1.5\n")  # rejected: lo 2 (etcd) > hi 1.5
        deadline = time.monotonic() + 10
        while not daemon.events("change_rejected"):
            assert time.monotonic() < deadline, "the edit was never rejected"
            time.sleep(0.05)
        put(etcd, "band/lo", "1")  # now the file would fit
        assert client.next_update()["values"]["band"] == {"lo": 1, "hi": 4}
        daemon.signal(signal.SIGHUP)
        assert client.next_update()["values"]["band"] == {"lo": 1, "hi": 1.5}


def test_a_file_value_etcd_shadows_is_refused_and_never_blocks_an_unset(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """An invalid file value is refused though etcd shadows it now: taken in, it would take
    effect (and be refused) only when the key leaves etcd, and ``unset`` would be refused
    for a file nobody is editing."""
    from tests.daemon_proc import run_cli

    config = tmp_path / "params.yaml"
    config.write_text("train:\n  lr: 0.05\n")
    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint, configs=[config]) as daemon,
        RawClient(daemon.socket_path) as client,
    ):
        put(etcd, "train/lr", "0.1")
        assert client.next_update()["changed"] == {"train.lr": 0.1}
        config.write_text("train:\n  lr: -1\n  momentum: 0.5\n")
        deadline = time.monotonic() + 10
        while not daemon.events("change_rejected"):
            assert time.monotonic() < deadline, "the edit was never rejected"
            time.sleep(0.05)
        (rejected,) = daemon.events("change_rejected")
        assert rejected["layer"] == "files"
        assert f"train.lr (from files: {config})" in rejected["reason"]
        assert client.no_message(0.3)

        endpoints = ["--app", APP, "--etcd-endpoints", etcd.endpoint]
        done = run_cli("unset", "train.lr", *endpoints)
        assert done.returncode == 0, done.stderr
        update = client.next_update()
        assert update["changed"] == {"train.lr": 0.05}  # the file's last good value
        assert update["values"]["train"]["momentum"] == 0.9  # the refused edit stays out


def test_signals_while_the_start_waits_for_etcd(tmp_path: Path) -> None:
    """SIGHUP during the start (etcd unreachable for now) is taken, not fatal; SIGTERM
    then stops the daemon cleanly once the start is over."""
    from tests.daemon_proc import hotknob_cmd

    config = tmp_path / "p.yaml"
    config.write_text("train:\n  lr: 0.1\n")
    log_path = tmp_path / "d.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            hotknob_cmd(
                "run", "--app", "t", "--socket", str(tmp_path / "s" / "t.sock"),
                "--state-dir", str(tmp_path / "st"), "--config", str(config),
                "--etcd-endpoints", f"127.0.0.1:{free_port()}", "--etcd-start-timeout", "3",
            ),
            stdout=log, stderr=log, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "config_files_watched" not in log_path.read_text(errors="replace"):
            assert time.monotonic() < deadline and proc.poll() is None, log_path.read_text()
            time.sleep(0.02)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert proc.poll() is None, log_path.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log_path.read_text()
        assert "files_reload_requested" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_metrics_port_in_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    from tests.daemon_proc import run_cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        sock = tmp_path / "s" / "t.sock"
        done = run_cli(
            "run", "--socket", str(sock), "--state-dir", str(tmp_path / "st"),
            "--metrics-addr", f"127.0.0.1:{port}",
        )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"--metrics-addr 127.0.0.1:{port}: cannot listen" in done.stderr
    assert not sock.exists()
