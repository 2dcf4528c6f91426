"""LiveConfig against a real protocol-1 server on a real Unix socket."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from hotknob.model_runtime import DaemonUnavailable, LiveConfig, protocol
from hotknob.model_runtime.errors import LiveConfigError

from .daemon_stub import DaemonStub

BASE: dict[str, Any] = {
    "train": {"lr": 0.001, "momentum": 0.9, "weight_decay": 0.0},
    "sampling": {"temperature": 1.0, "top_p": 1.0},
}


def with_values(**sections: dict[str, Any]) -> dict[str, Any]:
    values = {name: dict(section) for name, section in BASE.items()}
    for name, overrides in sections.items():
        values[name].update(overrides)
    return values


def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


@pytest.fixture
def stub(sock_path: str) -> Iterator[DaemonStub]:
    with DaemonStub(sock_path, BASE, version=7) as server:
        yield server


@pytest.fixture
def live(stub: DaemonStub) -> Iterator[LiveConfig]:
    with LiveConfig.connect(stub.path, timeout=5, client="trainer-0") as client:
        yield client


def acks(stub: DaemonStub) -> list[tuple[int, int]]:
    return [(m["version"], m["step"]) for m in stub.messages("applied")]


def test_connect_applies_the_first_snapshot(stub: DaemonStub, live: LiveConfig) -> None:
    assert live.version == 7
    assert live.revision == 100
    assert live.pending_version == 7
    assert live["train.lr"] == 0.001
    assert live["sampling"]["top_p"] == 1.0
    assert live.values["train"]["momentum"] == 0.9
    assert "train.lr" in live and "train.nope" not in live
    assert live.get("train.nope", "d") == "d"
    with pytest.raises(KeyError):
        live["train.nope"]
    hello = stub.messages("hello")[0]
    assert hello["client"] == "trainer-0" and hello["protocol"] == 1
    assert hello["pid"] == os.getpid()
    stub.wait_for(lambda: acks(stub) == [(7, 0)])


def test_values_are_read_only(live: LiveConfig) -> None:
    with pytest.raises(TypeError):
        live.values["train"]["lr"] = 1.0
    with pytest.raises(TypeError):
        live.values["extra"] = {}


def test_default_client_name_and_hello_extra(stub: DaemonStub) -> None:
    with LiveConfig.connect(stub.path, timeout=5, role="eval"):
        hello = stub.messages("hello")[0]
    assert hello["client"] == f"{socket.gethostname()}-{os.getpid()}"
    assert hello["role"] == "eval"


def test_socket_found_from_env_and_from_app(
    sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with DaemonStub(sock_path, BASE):
        monkeypatch.setenv("HOTKNOB_SOCKET", sock_path)
        with LiveConfig.connect(timeout=5) as live:
            assert live.socket_path == sock_path
    folder = os.path.dirname(sock_path)
    monkeypatch.delenv("HOTKNOB_SOCKET")
    monkeypatch.setenv("XDG_RUNTIME_DIR", folder)
    os.mkdir(os.path.join(folder, "hotknob"))
    app_path = os.path.join(folder, "hotknob", "myjob.sock")
    with DaemonStub(app_path, BASE):
        with LiveConfig.connect(app="myjob", timeout=5) as live:
            assert live.socket_path == app_path
        monkeypatch.setenv("HOTKNOB_APP", "myjob")
        with LiveConfig.connect(timeout=5) as live:
            assert live.socket_path == app_path


def test_no_daemon_raises_daemon_unavailable_quickly(sock_path: str) -> None:
    started = time.monotonic()
    with pytest.raises(DaemonUnavailable) as info:
        LiveConfig.connect(sock_path, timeout=0.5, app="myjob")
    assert time.monotonic() - started < 4
    message = str(info.value)
    assert sock_path in message
    assert "hotknob run --app myjob" in message
    assert info.value.exit_code == 3
    assert isinstance(info.value, LiveConfigError)


def test_no_daemon_at_the_socket_hotknob_socket_names_says_to_start_one_there(
    sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The hint was "start one with `hotknob run --app myjob`, or ... set HOTKNOB_SOCKET",
    # set already: a daemon started so listens elsewhere.
    monkeypatch.setenv("HOTKNOB_SOCKET", sock_path)
    with pytest.raises(DaemonUnavailable) as info:
        LiveConfig.connect(timeout=0.2, app="myjob")
    message = str(info.value)
    assert f"start one with `hotknob run --app myjob --socket {sock_path}`" in message, message
    assert "set HOTKNOB_SOCKET" not in message


def test_distributed_needs_an_initialised_group(stub: DaemonStub) -> None:
    with pytest.raises(ValueError, match="distributed"):
        LiveConfig.connect(stub.path, timeout=1, distributed=True)


def test_update_is_invisible_until_apply(stub: DaemonStub, live: LiveConfig) -> None:
    assert live.apply(1) is False
    version = stub.push(with_values(train={"lr": 0.0005}))
    eventually(lambda: live.pending_version == version)
    assert live["train.lr"] == 0.001
    assert live.version == 7
    assert live.apply(2) is True
    assert live["train.lr"] == 0.0005
    assert live.version == version == 8
    assert live.revision == 101
    assert live.apply(3) is False
    stub.wait_for(lambda: (8, 2) in acks(stub))


def test_updates_between_applies_coalesce(stub: DaemonStub, live: LiveConfig) -> None:
    seen: list[float] = []
    live.on_change("train.lr", seen.append)
    for lr in (0.01, 0.02, 0.03):
        stub.push(with_values(train={"lr": lr}))
    eventually(lambda: live.pending_version == 10)
    assert live.apply(50) is True
    assert live.apply(51) is False
    assert live["train.lr"] == 0.03
    assert seen == [0.03]
    stub.wait_for(lambda: len(acks(stub)) == 2)
    time.sleep(0.05)
    assert acks(stub) == [(7, 0), (10, 50)]


def test_on_change_fires_once_per_real_change(stub: DaemonStub, live: LiveConfig) -> None:
    lr_seen: list[float] = []
    temp_seen: list[tuple[float, float]] = []
    sections: list[Mapping[str, Any]] = []
    live.on_change("train.lr", lr_seen.append)
    live.on_change("sampling.temperature", lambda new, old: temp_seen.append((new, old)))
    live.on_change("train", sections.append)

    stub.push(with_values(sampling={"temperature": 0.7}))
    eventually(lambda: live.pending_version == 8)
    live.apply(1)
    assert lr_seen == [] and sections == []
    assert temp_seen == [(0.7, 1.0)]

    stub.push(with_values(sampling={"temperature": 0.7}, train={"lr": 0.1, "momentum": 0.5}))
    eventually(lambda: live.pending_version == 9)
    live.apply(2)
    assert lr_seen == [0.1]
    assert temp_seen == [(0.7, 1.0)]
    assert len(sections) == 1 and sections[0]["momentum"] == 0.5


def test_removed_handle_stops_callbacks(stub: DaemonStub, live: LiveConfig) -> None:
    seen: list[float] = []
    handle = live.on_change("train.lr", seen.append)
    handle.remove()
    handle.remove()
    assert handle.removed
    stub.push(with_values(train={"lr": 0.2}))
    eventually(lambda: live.pending_version == 8)
    live.apply(1)
    assert seen == []


def test_raising_callback_is_reported_and_others_still_run(
    stub: DaemonStub, live: LiveConfig, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[float] = []

    def broken(value: float) -> None:
        raise RuntimeError("no such knob")

    live.on_change("train.lr", broken)
    live.on_change("train.lr", seen.append)
    stub.push(with_values(train={"lr": 0.3}))
    eventually(lambda: live.pending_version == 8)
    assert live.apply(4) is True
    assert seen == [0.3]
    assert live["train.lr"] == 0.3
    stub.wait_for(lambda: len(stub.messages("applied")) == 2)
    ack = stub.messages("applied")[1]
    assert (ack["version"], ack["step"]) == (8, 4)
    assert ack["errors"] == [{"key": "train.lr", "error": "RuntimeError: no such knob"}]
    assert "live_callback_failed" in caplog.text
    assert "errors" not in stub.messages("applied")[0]


class RecordingBinding:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.fail = fail
        self.state = {"applies": 0}

    def apply(self, values: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
        self.calls.append((dict(values), dict(changed)))
        self.state["applies"] += 1
        if self.fail:
            raise ValueError("rejected")

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.state = dict(state)


def test_bindings_get_flat_values_and_the_changed_subset(
    stub: DaemonStub, live: LiveConfig
) -> None:
    broken, binding = RecordingBinding(fail=True), RecordingBinding()
    live.add_binding(broken)
    handle = live.add_binding(binding)
    stub.push(with_values(train={"lr": 0.05}))
    eventually(lambda: live.pending_version == 8)
    live.apply(3)
    values, changed = binding.calls[0]
    assert changed == {"train.lr": 0.05}
    assert values["train.lr"] == 0.05 and values["sampling.top_p"] == 1.0
    assert len(broken.calls) == 1
    stub.wait_for(lambda: len(acks(stub)) == 2)
    assert stub.messages("applied")[1]["errors"] == [
        {"binding": "RecordingBinding", "error": "ValueError: rejected"}
    ]
    handle.remove()
    stub.push(with_values(train={"lr": 0.06}))
    eventually(lambda: live.pending_version == 9)
    live.apply(4)
    assert len(binding.calls) == 1 and len(broken.calls) == 2


def test_daemon_restart_keeps_values_and_picks_up_the_new_state(
    sock_path: str,
) -> None:
    seen: list[float] = []
    with DaemonStub(sock_path, BASE, version=7) as first:
        live = LiveConfig.connect(sock_path, timeout=5)
        live.on_change("train.lr", seen.append)
        first.wait_for(lambda: first.connections == 1)
    try:
        time.sleep(0.1)
        assert live.apply(1) is False
        assert live.version == 7 and live["train.lr"] == 0.001

        with DaemonStub(sock_path, with_values(train={"lr": 0.004}), version=9) as second:
            eventually(lambda: live.pending_version == 9)
            assert live["train.lr"] == 0.001
            assert live.apply(2) is True
            assert live["train.lr"] == 0.004 and live.version == 9
            assert seen == [0.004]
            second.wait_for(lambda: acks(second) == [(9, 2)])
    finally:
        live.close()


def test_restart_with_same_values_records_the_version_without_callbacks(
    sock_path: str,
) -> None:
    seen: list[Any] = []
    with DaemonStub(sock_path, BASE, version=7):
        live = LiveConfig.connect(sock_path, timeout=5)
        live.on_change("train", seen.append)
    try:
        with DaemonStub(sock_path, BASE, version=7) as same:
            # Nothing to apply: the client tells the daemon what it has in force.
            same.wait_for(lambda: acks(same) == [(7, 0)])
            assert live.pending_version == 7 and live.apply(1) is False
        with DaemonStub(sock_path, BASE, version=12) as newer:
            eventually(lambda: live.pending_version == 12)
            assert live.apply(5) is True
            assert live.version == 12 and seen == []
            newer.wait_for(lambda: acks(newer) == [(12, 5)])
    finally:
        live.close()


def test_a_restart_only_key_keeps_the_value_the_process_started_with(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A daemon (restarted after the key changed) sends a restart-only key at another value
    than the process runs: the process keeps its own, says so in its ack, and logs it once;
    the live keys beside it are applied as usual."""
    seen: list[Any] = []
    with (
        DaemonStub(sock_path, BASE, version=7, restart_only=("train.momentum",)) as stub,
        LiveConfig.connect(sock_path, timeout=5) as live,
    ):
        live.on_change("train.momentum", seen.append)
        assert live["train.momentum"] == 0.9  # the first state: what it starts with
        with caplog.at_level("WARNING", logger="hotknob.model_runtime"):
            version = stub.push(with_values(train={"momentum": 0.5, "lr": 0.004}))
            eventually(lambda: live.pending_version == version)
            assert live.apply(1) is True
            assert live["train.lr"] == 0.004 and live["train.momentum"] == 0.9
            assert live.values["train"]["momentum"] == 0.9 and seen == []
            stub.wait_for(lambda: len(stub.messages("applied")) == 2)
            assert stub.messages("applied")[-1] == {
                "type": "applied",
                "version": version,
                "step": 1,
                "held": ["train.momentum"],
                # The value it runs, 0.9, for its daemon to compare with the one wanted.
                "held_digests": {"train.momentum": protocol.held_digest(0.9)},
            }
            version = stub.push(with_values(train={"momentum": 0.5, "lr": 0.005}))
            eventually(lambda: live.pending_version == version)
            assert live.apply(2) is True and live["train.momentum"] == 0.9
        said = [r for r in caplog.records if "live_restart_only_held" in r.getMessage()]
        assert len(said) == 1, said  # once per value the daemon wants
        assert "running=0.9 daemon=0.5" in said[0].getMessage()
        # Sent its own value again: nothing held, a plain ack.
        version = stub.push(with_values(train={"momentum": 0.9, "lr": 0.006}))
        eventually(lambda: live.pending_version == version)
        assert live.apply(3) is True
        stub.wait_for(lambda: stub.messages("applied")[-1]["version"] == version)
        assert "held" not in stub.messages("applied")[-1]


def test_a_restart_only_secret_it_holds_is_logged_without_its_values(
    sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A restart-only key the snapshot names ``secret`` (a key the schema keeps secret): the
    process still holds it and says so, but logs no value of it; the log line of a process
    ends in the logs an operator reads."""
    with (
        DaemonStub(
            sock_path,
            BASE,
            version=7,
            restart_only=("train.momentum",),
            secret=("train.momentum",),
        ) as stub,
        LiveConfig.connect(sock_path, timeout=5) as live,
        caplog.at_level("WARNING", logger="hotknob.model_runtime"),
    ):
        version = stub.push(with_values(train={"momentum": 0.5, "lr": 0.004}))
        eventually(lambda: live.pending_version == version)
        assert live.apply(1) is True and live["train.momentum"] == 0.9
    said = [r.getMessage() for r in caplog.records if "live_restart_only_held" in r.getMessage()]
    assert len(said) == 1, said
    assert "key=train.momentum running='**********' daemon='**********'" in said[0], said
    assert "0.9" not in said[0] and "0.5" not in said[0]


def test_a_restart_only_mapping_is_held_whole_and_the_type_counts(sock_path: str) -> None:
    with (
        DaemonStub(sock_path, BASE, version=7, restart_only=("sampling", "train.lr")) as stub,
        LiveConfig.connect(sock_path, timeout=5) as live,
    ):
        version = stub.push(
            with_values(sampling={"temperature": 0.5}, train={"lr": 0.001, "momentum": 0.8})
        )
        eventually(lambda: live.pending_version == version)
        assert live.apply(1) is True
        assert live.values["sampling"] == {"temperature": 1.0, "top_p": 1.0}
        assert live["train.momentum"] == 0.8 and live["train.lr"] == 0.001
        values = with_values(train={"lr": 1}, sampling={})  # 1 is not the float 0.001...
        values["sampling"] = dict(BASE["sampling"])
        version = stub.push(values)
        eventually(lambda: live.pending_version == version)
        live.apply(2)
        assert live["train.lr"] == 0.001 and type(live["train.lr"]) is float


def test_a_resumed_run_takes_the_daemon_s_restart_only_values_at_the_load(
    sock_path: str,
) -> None:
    """The daemon's state is newer than the checkpoint: it wins at the next apply, and its
    restart-only values already at the load, since what the process builds with them
    (a data loader) is built after the load, before that apply."""
    seen: list[Any] = []
    daemon_values = with_values(train={"momentum": 0.5})
    with (
        DaemonStub(sock_path, daemon_values, version=9, restart_only=("train.momentum",)),
        LiveConfig.connect(sock_path, timeout=5) as live,
    ):
        live.on_change("train.momentum", seen.append)
        checkpoint = {
            "format": 1,
            "version": 5,
            "revision": 50,
            "step": 1000,
            "values": with_values(train={"momentum": 0.9, "lr": 0.002}),
            "bindings": [],
        }
        live.load_state_dict(checkpoint)
        assert live["train.momentum"] == 0.5 and live["train.lr"] == 0.002
        assert live.apply(1001) is True
        assert live["train.lr"] == 0.001 and live["train.momentum"] == 0.5 and seen == []
        # A checkpoint newer than the daemon's state keeps its own, restart-only ones too.
        live.load_state_dict({**checkpoint, "version": 20, "revision": 500})
        assert live["train.momentum"] == 0.9 and seen == [0.9]


def test_without_restart_only_keys_named_nothing_is_held(sock_path: str) -> None:
    with (
        DaemonStub(sock_path, BASE, version=7) as stub,
        LiveConfig.connect(sock_path, timeout=5) as live,
    ):
        version = stub.push(with_values(train={"momentum": 0.5}))
        eventually(lambda: live.pending_version == version)
        assert live.apply(1) is True and live["train.momentum"] == 0.5


def test_malformed_line_from_the_daemon_drops_only_that_connection(
    stub: DaemonStub, live: LiveConfig
) -> None:
    stub.send_raw(b"this is not json\n")
    stub.wait_for(lambda: len(stub.messages("hello")) == 2)
    assert live["train.lr"] == 0.001
    # Either end answers a malformed message with ``error`` before it closes.
    (said,) = stub.messages("error")
    assert said["error"].startswith("line is not JSON")
    version = stub.push(with_values(train={"lr": 0.009}))
    eventually(lambda: live.pending_version == version)
    assert live.apply(1) is True and live["train.lr"] == 0.009


def test_state_dict_round_trip(stub: DaemonStub, live: LiveConfig) -> None:
    binding = RecordingBinding()
    live.add_binding(binding)
    stub.push(with_values(train={"lr": 0.02}))
    eventually(lambda: live.pending_version == 8)
    live.apply(11)
    saved = live.state_dict()
    assert saved["version"] == 8 and saved["step"] == 11
    assert saved["values"]["train"]["lr"] == 0.02
    assert saved["bindings"] == [{"applies": 1}]
    saved["values"]["train"]["lr"] = 99.0  # a plain copy: editing it changes nothing live
    assert live["train.lr"] == 0.02

    with (
        DaemonStub(stub.path + "2", BASE, version=3) as older,
        LiveConfig.connect(older.path, timeout=5) as resumed,
    ):
        resumed_binding = RecordingBinding()
        resumed.add_binding(resumed_binding)
        seen: list[float] = []
        resumed.on_change("train.lr", seen.append)
        resumed.load_state_dict(saved)
        assert resumed.version == 8 and resumed["train.lr"] == 99.0
        assert seen == [99.0]
        assert resumed_binding.state["applies"] == 2  # restored 1, then the load's apply
        assert resumed.apply(12) is False  # the daemon's version 3 is older

        # An edit made after the resume is a real change, whatever its version number.
        assert older.push(with_values(train={"lr": 0.25})) == 4
        eventually(lambda: resumed.pending_version == 4)
        assert resumed.apply(13) is True and resumed["train.lr"] == 0.25


def test_newer_daemon_state_wins_over_a_loaded_checkpoint(
    stub: DaemonStub, live: LiveConfig
) -> None:
    saved = live.state_dict()
    saved["values"]["train"]["lr"] = 0.123
    saved["version"] = 5
    live.load_state_dict(saved)
    assert live["train.lr"] == 0.123 and live.version == 5
    assert live.pending_version == 7
    assert live.apply(1) is True
    assert live["train.lr"] == 0.001 and live.version == 7


def test_a_second_checkpoint_is_compared_with_the_daemon_not_with_the_first(
    stub: DaemonStub, live: LiveConfig
) -> None:
    """The daemon sent version 7. Checkpoint A (version 9) stays; checkpoint B (version 8)
    loaded after it stays too: it is newer than the daemon's state. (B was compared with
    A, found older, and A came back at the next apply.)"""
    first = live.state_dict()
    first["version"], first["values"]["train"]["lr"] = 9, 0.9
    live.load_state_dict(first)
    second = live.state_dict()
    second["version"], second["values"]["train"]["lr"] = 8, 0.5
    live.load_state_dict(second)
    assert live.apply(1) is False and live["train.lr"] == 0.5 and live.version == 8
    # And one older than the daemon's state gives way to it, whatever came before.
    third = live.state_dict()
    third["version"], third["values"]["train"]["lr"] = 6, 0.6
    live.load_state_dict(third)
    assert live.apply(2) is True and live["train.lr"] == 0.001 and live.version == 7


def test_an_ack_whose_error_text_is_not_valid_utf8_is_still_sent(
    stub: DaemonStub, live: LiveConfig
) -> None:
    def fails(value: float) -> None:
        raise ValueError("cannot read /data/run-\udcff/ckpt")  # a path of undecodable bytes

    live.on_change("train.lr", fails)
    version = stub.push(with_values(train={"lr": 0.5}))
    eventually(lambda: live.pending_version == version)
    assert live.apply(3) is True
    stub.wait_for(lambda: (version, 3) in acks(stub))
    [ack] = [m for m in stub.messages("applied") if m["version"] == version]
    assert "run-\\udcff" in ack["errors"][0]["error"]


def test_a_step_no_ack_can_carry_is_not_sent_again_at_a_reconnect(sock_path: str) -> None:
    # apply(5.5) applies unacknowledged (logged); a reconnect must not send 5.5 in the
    # snapshot's ack: a daemon closes a connection on it, and it would be sent each time.
    with DaemonStub(sock_path, BASE, version=3) as stub:
        live = LiveConfig.connect(sock_path, timeout=5)
        try:
            version = stub.push(with_values(train={"lr": 0.5}))
            eventually(lambda: live.pending_version == version)
            eventually(lambda: acks(stub) == [(3, 0)])  # the connect's (it may come late)
            assert live.apply(5.5) is True  # type: ignore[arg-type]  # a fractional epoch
            time.sleep(0.3)
            assert acks(stub) == [(3, 0)]  # none for 5.5
        except BaseException:
            live.close()
            raise
    try:
        with DaemonStub(sock_path, with_values(train={"lr": 0.5}), version=version) as again:
            again.wait_for(lambda: again.messages("hello"))
            eventually(lambda: live.pending_version == version)
            time.sleep(0.3)
            assert again.messages("applied") == []
            assert live.apply(6) is False and live["train.lr"] == 0.5
    finally:
        live.close()


@pytest.mark.parametrize("again", [3, 4], ids=["same-version", "renumbered-after-a-crash"])
def test_a_loaded_checkpoint_outlives_a_reconnect_that_resends_the_replaced_state(
    sock_path: str, again: int
) -> None:
    with DaemonStub(sock_path, BASE, version=3):
        live = LiveConfig.connect(sock_path, timeout=5)
        saved = live.state_dict()
        saved["version"], saved["values"]["train"]["lr"] = 8, 99.0
        live.load_state_dict(saved)
        assert live.apply(1) is False and live["train.lr"] == 99.0
    try:
        # The daemon comes back with the state the checkpoint replaced: nothing was
        # edited, so the checkpoint stays in force (and the daemon hears what is).
        # (A daemon restarted after a crash numbers the same state above the one it had.)
        with DaemonStub(sock_path, BASE, version=again) as same:
            same.wait_for(lambda: acks(same) == [(8, 0)])  # the checkpoint's step
            assert live.pending_version == 8 and live.apply(2) is False
            assert live["train.lr"] == 99.0
            # An edit is a real change, whatever its version number; after it the
            # daemon's state wins again, the replaced one included.
            assert same.push(with_values(train={"lr": 0.25})) == again + 1
            eventually(lambda: live.pending_version == again + 1)
            assert live.apply(3) is True and live["train.lr"] == 0.25
        with DaemonStub(sock_path, BASE, version=3):
            eventually(lambda: live.pending_version == 3)
            assert live.apply(4) is True and live["train.lr"] == 0.001
    finally:
        live.close()


def test_section_callbacks_fire_when_a_key_under_them_goes_away(sock_path: str) -> None:
    with DaemonStub(sock_path, BASE, version=7):
        live = LiveConfig.connect(sock_path, timeout=5)
    try:
        sections: list[dict[str, Any]] = []
        leaves: list[Any] = []
        untouched: list[Any] = []
        live.on_change("sampling", lambda new: sections.append(dict(new)))
        live.on_change("sampling.top_p", lambda new, old: leaves.append((new, old)))
        live.on_change("train", untouched.append)
        fewer = {"train": dict(BASE["train"]), "sampling": {"temperature": 1.0}}
        with DaemonStub(sock_path, fewer, version=8):  # restarted on another schema
            eventually(lambda: live.pending_version == 8)
            assert live.apply(1) is True
        assert sections == [{"temperature": 1.0}]
        assert leaves == [(None, BASE["sampling"]["top_p"])]
        assert untouched == []
    finally:
        live.close()


def test_load_state_dict_rejects_garbage(live: LiveConfig) -> None:
    with pytest.raises(ValueError, match="state_dict"):
        live.load_state_dict({"version": "x", "revision": 1, "values": {}})
    with pytest.raises(ValueError, match="bindings"):
        live.load_state_dict({"version": 1, "revision": 1, "values": {}, "bindings": [{}]})


def test_bind_optimizer_starts_from_and_follows_live_values(
    stub: DaemonStub, live: LiveConfig
) -> None:
    torch = pytest.importorskip("torch")
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = torch.optim.SGD(params, lr=1.0, momentum=0.0)
    live.bind_optimizer(optimizer)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)
    assert optimizer.param_groups[0]["momentum"] == pytest.approx(0.9)
    stub.push(with_values(train={"lr": 0.04}))
    eventually(lambda: live.pending_version == 8)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.001)
    live.apply(1)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.04)


def test_close_is_idempotent_and_stops_the_thread(stub: DaemonStub) -> None:
    live = LiveConfig.connect(stub.path, timeout=5)
    live.close()
    live.close()
    assert live.apply(1) is False
    stub.wait_for(lambda: stub.connections == 0)


def test_import_does_not_pull_torch_or_pydantic() -> None:
    code = (
        "import sys, hotknob.model_runtime; "
        "assert 'torch' not in sys.modules, 'torch'; "
        "assert 'pydantic' not in sys.modules, 'pydantic'"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_client_name_carries_the_rank_only_if_torch_distributed_is_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from hotknob.model_runtime.finding import default_client_name as _default_client_name

    base = f"{socket.gethostname()}-{os.getpid()}"
    monkeypatch.delitem(sys.modules, "torch.distributed", raising=False)
    assert _default_client_name() == base
    fake = types.SimpleNamespace(
        is_available=lambda: True, is_initialized=lambda: True, get_rank=lambda: 3
    )
    monkeypatch.setitem(sys.modules, "torch.distributed", fake)
    assert _default_client_name() == f"{base}-rank3"
    fake.is_initialized = lambda: False
    assert _default_client_name() == base


def test_apply_writes_its_ack_without_waking_the_connection_thread(
    stub: DaemonStub, live: LiveConfig
) -> None:
    stub.wait_for(lambda: acks(stub) == [(7, 0)])
    wakes: list[int] = []
    wake = live._conn._wake
    live._conn._wake = lambda: (wakes.append(1), wake())[1]  # type: ignore[method-assign]
    version = stub.push(with_values(train={"lr": 0.5}))
    eventually(lambda: live.pending_version == version)
    assert live.apply(3)
    stub.wait_for(lambda: acks(stub) == [(7, 0), (version, 3)])
    assert wakes == []  # written by the applying thread: the socket took it whole


def test_what_the_socket_cannot_take_is_written_by_the_thread_whole_and_in_order(
    sock_path: str,
) -> None:
    """A daemon that stops reading: messages pile up in the client, none is lost or cut."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path)
    listener.listen(1)
    accepted: list[socket.socket] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        accepted.append(conn)
        assert protocol.decode(conn.makefile("rb").readline())["type"] == "hello"
        conn.sendall(protocol.encode(protocol.snapshot(1, 1, BASE, {})))

    server = threading.Thread(target=serve)
    server.start()
    with LiveConfig.connect(sock_path, timeout=5, client="slow") as live:
        server.join(5)
        conn = accepted[0]
        reader = conn.makefile("rb")
        pad = "x" * 2000
        for seq in range(300):  # about 600 KB: more than the socket holds
            live._conn.send({"type": "metrics", "seq": seq, "pad": pad})
        assert live._conn._out, "the socket took only part: the thread holds the rest"
        seen = []
        while len(seen) < 300:
            message = protocol.decode(reader.readline())
            if message["type"] == "applied":
                continue
            seen.append(message["seq"])
            assert message["pad"] == pad
        assert seen == list(range(300))
        conn.close()
    listener.close()


def test_a_callback_removed_by_an_earlier_one_does_not_run(
    stub: DaemonStub, live: LiveConfig
) -> None:
    calls: list[str] = []
    later: list[Any] = []

    def first(value: float) -> None:
        calls.append("first")
        for handle in later:
            handle.remove()

    class RemovingBinding(RecordingBinding):
        def apply(self, values: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
            super().apply(values, changed)
            later[1].remove()

    remover, removed_binding = RemovingBinding(), RecordingBinding()
    live.add_binding(remover)
    later.append(live.on_change("train.lr", lambda v: calls.append("second")))
    later.append(live.add_binding(removed_binding))
    live.on_change("train.lr", first)
    later.append(live.on_change("train.lr", lambda v: calls.append("third")))
    stub.push(with_values(train={"lr": 0.2}))
    eventually(lambda: live.pending_version == 8)
    assert live.apply(1) is True
    # "second" ran before "first" removed it; "third" and the binding were removed first.
    assert calls == ["second", "first"]
    assert len(remover.calls) == 1 and removed_binding.calls == []


def test_apply_from_a_callback_is_refused_and_nothing_is_applied_out_of_order(
    stub: DaemonStub, live: LiveConfig, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[float] = []
    nested: list[bool] = []

    def first(value: float) -> None:
        if value == 0.2:
            stub.push(with_values(train={"lr": 0.3}, sampling={"temperature": 0.3}))
            eventually(lambda: live.pending_version == 9)
            nested.append(live.apply(11))  # raises: never appended

    live.on_change("train.lr", first)
    live.on_change("sampling.temperature", seen.append)
    stub.push(with_values(train={"lr": 0.2}, sampling={"temperature": 0.2}))
    eventually(lambda: live.pending_version == 8)
    assert live.apply(10) is True
    assert nested == [] and live.version == 8 and seen == [0.2]
    assert "apply() at one safe point, on one thread" in caplog.text
    stub.wait_for(lambda: len(acks(stub)) == 2)
    (error,) = stub.messages("applied")[1]["errors"]
    assert error["error"].startswith("RuntimeError: LiveConfig.apply() (or load_state_dict)")
    # What arrived meanwhile waits for the next apply, in order.
    assert live.pending_version == 9
    assert live.apply(12) is True and seen == [0.2, 0.3]
    stub.wait_for(lambda: len(acks(stub)) == 3)
    assert acks(stub) == [(7, 0), (8, 10), (9, 12)]


def test_apply_from_another_thread_while_one_runs_returns_false_and_changes_nothing(
    stub: DaemonStub, live: LiveConfig
) -> None:
    """Request threads of a server may each call apply: one applies, the others return
    False at once (neither wait nor raise), and nothing is applied or acked out of order."""
    inside, release = threading.Event(), threading.Event()
    seen: list[float] = []

    def slow(value: float) -> None:
        seen.append(value)
        inside.set()
        release.wait(5)

    live.on_change("train.lr", slow)
    stub.push(with_values(train={"lr": 0.2}))
    eventually(lambda: live.pending_version == 8)
    worker = threading.Thread(target=live.apply, args=(10,))
    worker.start()
    try:
        assert inside.wait(5)
        stub.push(with_values(train={"lr": 0.3}))
        eventually(lambda: live.pending_version == 9)
        assert live.apply(11) is False
        assert live.pending_version == 9  # still pending, for the next apply
    finally:
        release.set()
        worker.join(5)
    assert live.version == 8 and seen == [0.2]
    assert live.apply(12) is True and seen == [0.2, 0.3]
    stub.wait_for(lambda: len(acks(stub)) == 3)
    assert acks(stub) == [(7, 0), (8, 10), (9, 12)]


def test_a_live_config_cannot_be_pickled_or_copied(live: LiveConfig) -> None:
    import copy
    import pickle

    for make_copy in (pickle.dumps, copy.copy, copy.deepcopy):
        with pytest.raises(TypeError, match=r"cannot be pickled or copied.*LiveConfig.connect"):
            make_copy(live)


def test_an_ack_carries_errors_cut_to_size_however_long_or_many(
    stub: DaemonStub, live: LiveConfig
) -> None:
    from hotknob.model_runtime.acks import ACK_ERROR_CHARS_MAX, ACK_ERRORS_MAX

    def fails(value: float) -> None:
        raise ValueError("x" * 2_000_000)  # an exception quoting a whole batch, say

    for _ in range(ACK_ERRORS_MAX + 5):
        live.on_change("train.lr", fails)
    version = stub.push(with_values(train={"lr": 0.5}))
    eventually(lambda: live.pending_version == version)
    assert live.apply(3) is True
    stub.wait_for(lambda: (version, 3) in acks(stub))  # the ack is sent, not dropped
    [ack] = [m for m in stub.messages("applied") if m["version"] == version]
    assert len(ack["errors"]) == ACK_ERRORS_MAX + 1
    assert ack["errors"][-1] == {"error": "and 5 more (in the process's log)"}
    first = ack["errors"][0]["error"]
    assert first.startswith("ValueError: xxx") and len(first) < ACK_ERROR_CHARS_MAX + 40


def test_a_value_that_changes_only_its_type_runs_its_callbacks(
    stub: DaemonStub, live: LiveConfig
) -> None:
    # protocol.md: a change of type counts (1 -> 1.0); 1 == 1.0 == True in Python.
    seen: list[Any] = []
    version = stub.push(with_values(train={"lr": 1}))
    eventually(lambda: live.pending_version == version)
    assert live.apply(1) is True
    live.on_change("train.lr", seen.append)
    for value in (1.0, True):
        version = stub.push(with_values(train={"lr": value}))
        eventually(lambda v=version: live.pending_version == v)
        assert live.apply(2) is True
    assert [(v, type(v)) for v in seen] == [(1.0, float), (True, bool)]


@pytest.mark.parametrize(
    ("kwargs", "said"),
    [
        ({"app": "../etc"}, "invalid app name '../etc' (app= or HOTKNOB_APP): an app name is"),
        ({"socket": "/tmp/" + "s" * 120}, "bytes, longer than a Unix socket's path may be (107)"),
    ],
    ids=["app-name", "long-path"],
)
def test_connect_refuses_at_once_what_no_daemon_could_be_reached_at(
    kwargs: dict[str, Any], said: str
) -> None:
    # Before: DaemonUnavailable, once the whole timeout had passed.
    with pytest.raises(ValueError, match=re.escape(said)):
        LiveConfig.connect(timeout=2, **kwargs)
