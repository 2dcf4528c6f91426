"""The runtime against a real daemon and real etcd: step-boundary apply, acks, status, restarts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.model_runtime import LiveConfig
from tests.daemon_proc import DaemonProcess, run_cli
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(90)

APP = "t"
P = f"/hotknob/{APP}/config/"


def wait_pending(live: LiveConfig, version: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while live.pending_version < version:
        if time.monotonic() > deadline:
            raise AssertionError(f"version {version} never reached the process")
        time.sleep(0.005)


def make_optimizer() -> torch.optim.Optimizer:
    model = torch.nn.Linear(4, 1)
    return torch.optim.SGD(
        [{"params": [model.weight]}, {"params": [model.bias], "lr": 1.0}], lr=0.1, momentum=0.9
    )


def status_entries(etcd: EtcdServer) -> list[dict]:
    done = run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)["processes"]


def test_put_lands_at_the_next_apply_and_is_acknowledged(etcd: EtcdServer, tmp_path: Path) -> None:
    with DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=["--node", "n1"]) as daemon:
        opt = make_optimizer()
        with LiveConfig.connect(socket=daemon.socket_path, timeout=10, client="trainer") as live:
            live.bind_optimizer(opt)
            assert [g["lr"] for g in opt.param_groups] == pytest.approx([1e-3, 1e-2])
            for step in range(3):
                live.apply(step)
            v = live.version
            etcd.etcdctl("put", P + "train/lr", "0.004")
            wait_pending(live, v + 1)
            # Received but not applied: the optimizer is untouched until the safe point.
            assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
            assert live["train.lr"] == pytest.approx(1e-3)
            assert live.apply(3) is True
            assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.004, 0.04])
            assert live.version == v + 1

            etcd.etcdctl("txn", input=f"\nput {P}train/lr 0.002\nput {P}train/momentum 0.5\n\n\n")
            wait_pending(live, v + 2)
            assert live.apply(4) is True
            assert opt.param_groups[0]["lr"] == pytest.approx(0.002)
            assert opt.param_groups[0]["momentum"] == pytest.approx(0.5)

            deadline = time.monotonic() + 10
            while True:
                entries = status_entries(etcd)
                mine = [e for e in entries if e["client"] == "trainer"]
                if mine and mine[0]["version"] == v + 2:
                    break
                assert time.monotonic() < deadline, entries
                time.sleep(0.1)
            assert mine[0]["step"] == 4
            assert mine[0]["key"] == "n1/trainer"
            assert mine[0]["revision"] > 0
        # The process closed: its entry goes when the daemon sees the disconnect.
        deadline = time.monotonic() + 10
        while any(e["client"] == "trainer" for e in status_entries(etcd)):
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_status_entry_of_a_dead_daemon_vanishes_with_its_lease(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    daemon = DaemonProcess(
        tmp_path, endpoints=etcd.endpoint, extra=["--node", "n2", "--status-ttl", "2"]
    ).start()
    try:
        with LiveConfig.connect(socket=daemon.socket_path, timeout=10, client="p") as live:
            etcd.etcdctl("put", P + "train/lr", "0.3")
            wait_pending(live, live.version + 1)
            live.apply(7)
            deadline = time.monotonic() + 10
            while not any(e["client"] == "p" for e in status_entries(etcd)):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            daemon.kill()  # no clean shutdown: only the lease can clean up
            deadline = time.monotonic() + 15
            while any(e["client"] == "p" for e in status_entries(etcd)):
                assert time.monotonic() < deadline, "entry outlived its lease"
                time.sleep(0.2)
    finally:
        daemon.stop()


def test_reports_rewrite_a_status_entry_at_most_every_status_every(
    etcd: EtcdServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reports every 0.1 s for 3 s to a daemon at ``--status-every 1``: etcd gets the
    process's entry at its first report and then about once a second (not thirty
    times), the last one holding the last report; an applied change goes at once."""
    monkeypatch.setenv("HOTKNOB_REPORT_EVERY_S", "0.1")
    extra = ["--node", "n3", "--status-every", "1"]
    store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,)))
    key = f"/hotknob/{APP}/status/n3/p"
    try:
        with (
            DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=extra) as daemon,
            LiveConfig.connect(socket=daemon.socket_path, timeout=10, client="p") as live,
        ):
            start = store.current_revision()
            step = 0
            began = time.monotonic()
            while time.monotonic() - began < 3.0:
                step += 1
                live.apply(step)
                live.report(step, loss=1.0 / step)
                time.sleep(0.01)
            last = step
            time.sleep(1.5)  # the last report's entry, held back, goes out
            writes = [e for e in store.history(key, prefix=False, limit=100).entries]
            writes = [e for e in writes if e.revision > start]
            assert 3 <= len(writes) <= 6, [e.revision for e in writes]
            assert json.loads(writes[0].value or b"{}")["metrics"]["step"] == last

            etcd.etcdctl("put", P + "train/lr", "0.3")
            wait_pending(live, live.version + 1)
            live.apply(last + 1)
            deadline = time.monotonic() + 0.9  # well within --status-every
            while json.loads(store.read_prefix(key)[0][key])["version"] != live.version:
                assert time.monotonic() < deadline, "the ack's entry was held back"
                time.sleep(0.02)
    finally:
        store.close()


def test_a_checkpoint_does_not_bring_back_values_etcd_changed_under_a_daemon_that_lost_its_state(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """A job saves a checkpoint at lr 0.3 and dies; the operator sets lr 0.01; the job comes
    back on a daemon with a new state dir (a pod rescheduled with an emptyDir), whose
    versions begin again at 1, below the checkpoint's. Loading the checkpoint must not put
    lr 0.3 back over what etcd holds (before, it did, silently, until the next edit)."""
    first = DaemonProcess(tmp_path / "a", endpoints=etcd.endpoint)
    (tmp_path / "a").mkdir()
    with first:
        for lr in ("0.1", "0.2", "0.3"):
            etcd.etcdctl("put", P + "train/lr", lr)
        with LiveConfig.connect(socket=first.socket_path, timeout=10) as live:
            opt = make_optimizer()
            live.bind_optimizer(opt)
            deadline = time.monotonic() + 10
            while live.pending_version < 4 and live.version < 4:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            live.apply(100)
            saved, saved_opt = live.state_dict(), opt.state_dict()
    assert saved["version"] >= 4 and saved["values"]["train"]["lr"] == 0.3
    etcd.etcdctl("put", P + "train/lr", "0.01")
    (tmp_path / "b").mkdir()
    with (
        DaemonProcess(tmp_path / "b", endpoints=etcd.endpoint) as second,
        LiveConfig.connect(socket=second.socket_path, timeout=10) as resumed,
    ):
        assert resumed.version < saved["version"] and resumed["train.lr"] == 0.01
        opt = make_optimizer()  # resuming: bind first, then load (docs/schedulers.md)
        resumed.bind_optimizer(opt)
        opt.load_state_dict(saved_opt)
        resumed.load_state_dict(saved)
        assert resumed["train.lr"] == 0.3  # the checkpoint's, until the next apply
        assert opt.param_groups[0]["lr"] == pytest.approx(0.3)
        assert resumed.apply(101) is True
        assert resumed["train.lr"] == 0.01
        assert opt.param_groups[0]["lr"] == pytest.approx(0.01)


def test_daemon_killed_and_restarted_mid_training(etcd: EtcdServer, tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, endpoints=etcd.endpoint).start()
    opt = make_optimizer()
    try:
        with LiveConfig.connect(socket=daemon.socket_path, timeout=10) as live:
            live.bind_optimizer(opt)
            etcd.etcdctl("put", P + "train/lr", "0.05")
            wait_pending(live, live.version + 1)
            step = 0
            live.apply(step)
            assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
            daemon.kill()
            for _ in range(50):  # training goes on with its last values
                step += 1
                assert live.apply(step) is False
                assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
            daemon = DaemonProcess(tmp_path, endpoints=etcd.endpoint).start()
            etcd.etcdctl("put", P + "train/lr", "0.06")
            deadline = time.monotonic() + 20
            while opt.param_groups[0]["lr"] != pytest.approx(0.06):
                assert time.monotonic() < deadline, "change after restart never landed"
                step += 1
                live.apply(step)
                time.sleep(0.01)
            assert live["train.lr"] == pytest.approx(0.06)
    finally:
        daemon.stop()


def _entry_field(etcd: EtcdServer, client: str, field: str, timeout: float = 20.0) -> object:
    """``field`` of ``client``'s status entry, once it has one."""
    deadline = time.monotonic() + timeout
    while True:
        entries = {e["client"]: e for e in status_entries(etcd)}
        if field in entries.get(client, {}):
            return entries[client][field]
        assert time.monotonic() < deadline, entries
        time.sleep(0.1)


def test_a_restarted_daemon_never_changes_a_restart_only_key_of_a_running_process(
    etcd: EtcdServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``train.batch_size`` changed while the run goes on: its daemon holds it back. The
    daemon's container restarted (a liveness probe) starts with the new value: the running
    process still keeps the one it started with; only a process started now gets it."""
    daemon = DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=["--node", "n1"]).start()
    try:
        with LiveConfig.connect(socket=daemon.socket_path, timeout=10, client="trainer") as live:
            changes: list[tuple[object, object]] = []
            live.on_change("train.batch_size", lambda new, old: changes.append((new, old)))
            assert live["train.batch_size"] == 32
            live.apply(0)
            done = run_cli(
                "set",
                "train.batch_size=64",
                "--wait",
                "30",
                "--app",
                APP,
                "--etcd-endpoints",
                etcd.endpoint,
            )
            assert done.returncode == 0, done.stderr
            assert "a running process keeps the value it started with" in done.stderr
            assert "train.batch_size restart-only: waits for a restart of it" in done.stdout
            # Its daemon holds it back, and says so in the process's entry.
            assert _entry_field(etcd, "trainer", "restart_pending") == ["train.batch_size"]

            daemon.stop()
            daemon = DaemonProcess(tmp_path, endpoints=etcd.endpoint, extra=["--node", "n1"])
            daemon.start()
            with caplog.at_level("WARNING", logger="hotknob.model_runtime"):
                # The restarted daemon's snapshot is applied (a new version) and acknowledged
                # with train.batch_size held: the process's entry says so.
                step, deadline = 0, time.monotonic() + 20
                while True:
                    step += 1
                    live.apply(step)
                    entry = {e["client"]: e for e in status_entries(etcd)}.get("trainer", {})
                    if "held" in entry:
                        break
                    assert time.monotonic() < deadline, entry
                    time.sleep(0.05)
            held = entry["held"]
            assert held == ["train.batch_size"]
            assert live["train.batch_size"] == 32 and changes == []
            assert "live_restart_only_held key=train.batch_size running=32 daemon=64" in (
                caplog.text
            )
            status = run_cli("status", "--app", APP, "--etcd-endpoints", etcd.endpoint)
            assert "runs train.batch_size as it started" in status.stdout, status.stdout
            # A live key still goes through.
            etcd.etcdctl("put", P + "train/lr", "0.02")
            wait_pending(live, live.version + 1)
            assert live.apply(step + 1) is True
            assert live["train.lr"] == pytest.approx(0.02) and live["train.batch_size"] == 32
        # A process started now starts with the daemon's value.
        with LiveConfig.connect(socket=daemon.socket_path, timeout=10, client="fresh") as fresh:
            assert fresh["train.batch_size"] == 64
    finally:
        daemon.stop()


def test_a_clean_daemon_restart_keeps_the_age_of_the_change_in_status(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """The process acks its state again at the reconnect; its entry's time was that of the
    reconnect, so ``status`` showed an old change (AGE) as just made."""

    def entry() -> dict | None:
        mine = [e for e in status_entries(etcd) if e["client"] == "trainer"]
        return mine[0] if mine else None

    daemon = DaemonProcess(tmp_path, endpoints=etcd.endpoint).start()
    try:
        with LiveConfig.connect(socket=daemon.socket_path, timeout=10, client="trainer") as live:
            etcd.etcdctl("put", P + "train/lr", "0.004")
            wait_pending(live, live.version + 1)
            before = time.time()
            assert live.apply(7) is True
            applied = time.time()
            deadline = time.monotonic() + 10
            while (first := entry()) is None or first["version"] != live.version:
                assert time.monotonic() < deadline, first
                time.sleep(0.1)
            assert before <= first["time"] <= time.time()
            time.sleep(1.5)
            assert daemon.stop() == 0
            deadline = time.monotonic() + 10
            while entry() is not None:  # a clean stop takes its entries away
                assert time.monotonic() < deadline
                time.sleep(0.1)
            daemon.start()  # the same state dir: the same version, clean
            restarted = time.time()
            deadline = time.monotonic() + 10
            while (again := entry()) is None or again["pid"] != first["pid"]:
                assert time.monotonic() < deadline, again
                time.sleep(0.1)
            live.apply(8)  # nothing new
            assert again["version"] == first["version"] and again["step"] == 7
            assert before <= again["time"] <= applied < restarted, (again, restarted)
    finally:
        daemon.stop()


def test_sampling_change_reaches_an_inference_loop(etcd: EtcdServer, tmp_path: Path) -> None:
    from hotknob.model_runtime.sampling import SamplingParams, sample

    with (
        DaemonProcess(tmp_path, endpoints=etcd.endpoint) as daemon,
        LiveConfig.connect(socket=daemon.socket_path, timeout=10) as live,
    ):
        params = SamplingParams.from_values(live.values)
        live.on_change("sampling", lambda _: None)
        logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
        gen = torch.Generator().manual_seed(0)
        etcd.etcdctl("put", P + "sampling/temperature", "0")
        wait_pending(live, live.version + 1)
        assert params.temperature == 1.0
        if live.apply(1):
            params = SamplingParams.from_values(live.values)
        assert params.temperature == 0.0
        assert all(int(sample(logits, params, gen)[0]) == 1 for _ in range(20))
