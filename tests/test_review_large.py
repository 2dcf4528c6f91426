"""Large schemas and configurations as a review drove them: thousands of keys with long
dotted names, a mapping of thousands of entries, a real daemon, real etcd, real clients.

``--schema tests.test_review_large:Wide`` (400 sections of 10 keys, each dotted key 250
characters long), ``Narrower`` (the same, 150 characters) and ``Weighted`` (a
``dict[str, float]`` of 3,000 entries): built at import, in the daemon too.
"""

from __future__ import annotations

import gc
import json
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, Field, create_model

from hotknob.config.errors import InvalidChange
from hotknob.config.merge import merge_layers
from hotknob.config.sendable import MAX_STATE_BYTES, oversized, state_bytes
from hotknob.config.sources import Layer, defaults_layer
from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.model_runtime import LiveConfig, protocol
from tests.daemon_proc import DaemonProcess, RawClient
from tests.etcd_server import EtcdServer
from tests.test_guards import wait_for

pytestmark = pytest.mark.timeout(60)

_Ten = create_model("Ten", **{f"x{j}": (int, j) for j in range(10)})  # type: ignore[call-overload]


def _wide(name: str, length: int) -> type[BaseModel]:
    sections: dict[str, Any] = {f"{'s' * length}{i:03d}": (_Ten, _Ten()) for i in range(400)}
    return create_model(name, note=(str, ""), **sections)  # type: ignore[call-overload]


Wide = _wide("Wide", 250)
Narrower = _wide("Narrower", 150)
NARROWER_KEY = f"{'s' * 150}007.x3"


class Weighted(BaseModel):
    lr: float = 0.1
    weights: dict[str, float] = Field(
        default_factory=lambda: {f"expert_{i:05d}": 1.0 for i in range(3000)}
    )


def daemon(tmp_path: Path, etcd: EtcdServer, schema: str, app: str = "big") -> DaemonProcess:
    extra = ["--schema", f"tests.test_review_large:{schema}"]
    return DaemonProcess(tmp_path / app, app=app, endpoints=etcd.endpoint, extra=extra)


def test_the_line_limit_is_the_protocols() -> None:
    from hotknob.config.sendable import LINE_BYTES

    assert LINE_BYTES == protocol.MAX_LINE_BYTES


def test_keys_too_long_for_one_line_are_refused_at_start(etcd: EtcdServer, tmp_path: Path) -> None:
    """4,000 keys of 250 characters: 131 KB of values, but a snapshot names each key with
    its layer (1.2 MB in all). Such a daemon used to start and then refuse every client
    (``the daemon cannot send its state``); now it does not start, and says why."""
    assert state_bytes(Wide().model_dump()) < MAX_STATE_BYTES // 3
    with pytest.raises(InvalidChange, match="one line of the socket protocol"):
        merge_layers(Wide, [defaults_layer(Wide)])
    proc = daemon(tmp_path, etcd, "Wide")
    try:
        with pytest.raises(RuntimeError, match="exited with 1") as started:
            proc.start()
        assert "one line of the socket protocol carries" in str(started.value)
        assert "4001 keys by dotted name" in str(started.value)
    finally:
        proc.stop()


def test_a_wide_state_within_the_line_reaches_its_clients(etcd: EtcdServer, tmp_path: Path) -> None:
    """The same shape with 150-character names fits (0.8 MB a snapshot): served, and a lone
    put among the 4,001 keys is an update that names that key alone."""
    with daemon(tmp_path, etcd, "Narrower") as proc:
        raw = RawClient(proc.socket_path)
        live = LiveConfig.connect(str(proc.socket_path), client="wide", timeout=10)
        try:
            assert len(raw.snapshot["sources"]) == 4001
            store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5))
            try:
                store.put("/hotknob/big/config/" + NARROWER_KEY.replace(".", "/"), "42")
            finally:
                store.close()
            update = raw.next_update()
            assert update["changed"] == {NARROWER_KEY: 42}
            wait_for("the update", lambda: live.apply(1) or live[NARROWER_KEY] == 42, 10, 0.02)
        finally:
            live.close()
            raw.close()


def test_room_keeps_a_grown_state_sendable() -> None:
    """``room``: how far a change taken without a whole merge (the engine's short path) may
    grow the values and the state still be sent, with its long keys."""
    from hotknob.config.sendable import room

    snapshot = merge_layers(Narrower, [defaults_layer(Narrower)])
    size = state_bytes(snapshot.values)
    left = room(snapshot.values, snapshot.flat)
    assert 0 < left < MAX_STATE_BYTES - size  # the keys, not the values' limit, bound it
    layers = [defaults_layer(Narrower), Layer("etcd", {"note": "n" * (left - 10)})]
    merged = merge_layers(Narrower, layers)  # each line it may take is within the protocol's
    values = json.loads(json.dumps(dict(merged.values)))
    sources = dict.fromkeys(merged.flat, "defaults")
    protocol.encode(protocol.snapshot(1, 1, values, sources, app="big"))
    protocol.encode(protocol.update(2, 2, dict(merged.flat), values))
    layers[1] = Layer("etcd", {"note": "n" * (left + 20_000)})
    with pytest.raises(InvalidChange, match="one line of the socket protocol") as refused:
        merge_layers(Narrower, layers)
    assert refused.value.problems[0].key == "note"
    assert oversized(merged.values, merged.flat, {"note": "etcd"}) is None


def test_a_client_keeps_few_whole_configurations(etcd: EtcdServer, tmp_path: Path) -> None:
    """Each update brings the whole configuration, frozen anew (a mapping of 3,000 entries:
    ~0.6 MB in memory). A process that is not one rank of a group kept the last 64 of them
    all the same, for the ranks' agreement it does not take part in: 40 MB here, hundreds
    of MiB for a configuration near the limit, in every process."""
    with daemon(tmp_path, etcd, "Weighted") as proc:
        live = LiveConfig.connect(str(proc.socket_path), client="lean", timeout=10)
        store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5))
        try:
            live.apply(0)
            gc.collect()
            tracemalloc.start()
            try:
                before, _ = tracemalloc.get_traced_memory()
                for step in range(1, 71):
                    store.put("/hotknob/big/config/lr", json.dumps(step / 1000))
                    wait_for(
                        "the put", lambda s=step: live.apply(s) or live.version == s + 1, 10, 0.005
                    )
                gc.collect()
                grown = tracemalloc.get_traced_memory()[0] - before
            finally:
                tracemalloc.stop()
            assert live["lr"] == 0.07 and live["weights.expert_02999"] == 1.0
            assert grown < 8 * 1024 * 1024, f"{grown} bytes kept after 70 updates"
        finally:
            store.close()
            live.close()


def test_a_watcher_hears_of_a_change_too_large_for_one_line(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """A file that changes each of the 4,001 keys: ``changed`` and ``old`` take 1.3 MB,
    over a line. The event was dropped (``event_dropped``), and ``watch`` clients never
    heard of the change; now it comes with the keys that fit, the rest counted."""
    conf = tmp_path / "conf.json"

    def sections(base: int) -> dict[str, Any]:
        return {f"{'s' * 150}{i:03d}": {f"x{j}": base + j for j in range(10)} for i in range(400)}

    conf.write_text(json.dumps(sections(100)))
    proc = DaemonProcess(
        tmp_path / "w",
        app="big",
        endpoints=etcd.endpoint,
        configs=[conf],
        extra=["--schema", "tests.test_review_large:Narrower"],
    )
    with proc:
        watcher = RawClient(proc.socket_path, "watcher", watch=True)
        try:
            (tmp_path / "conf.tmp").write_text(json.dumps(sections(200)))
            (tmp_path / "conf.tmp").rename(conf)
            while (event := watcher.next())["type"] != "event":
                pass
        finally:
            watcher.close()
    assert event["event"] == "change_accepted" and event["version"] == 2
    listed, unlisted = event["changed"], event["unlisted"]["keys"]
    assert listed and unlisted and len(listed) + unlisted == 4000
    assert listed[NARROWER_KEY] == 203 and event["old"][NARROWER_KEY] == 103
    assert set(event["old"]) == set(listed)
    assert not proc.events("event_dropped") and proc.events("event_cut")


def test_a_lone_put_that_would_overflow_the_line_is_refused_not_pushed(tmp_path: Path) -> None:
    """The engine's short path measured a lone put against ``MAX_STATE_BYTES`` alone: a
    300 KB text among 4,001 keys of 150 characters was pushed, and every client that
    connected after it was refused the snapshot (over one protocol line)."""
    from tests.test_engine import make_engine

    events: list[dict[str, Any]] = []
    published: list[Any] = []
    engine = make_engine(tmp_path, schema=Narrower, events=events, published=published)
    engine.start({}, 1)
    big = json.dumps("n" * 300_000).encode()
    engine.on_etcd_change(2, {"/hotknob/eng/config/note": big}, [])
    assert engine.current is not None and engine.current.flat["note"] == ""
    assert any(e.get("event") == "change_rejected" for e in events)
    # What it serves still fits: a client that connects now gets its snapshot.
    current = engine.current
    line = protocol.encode(
        protocol.snapshot(current.version, current.revision, current.values, current.sources)
    )
    assert len(line) <= protocol.MAX_LINE_BYTES
    engine.close()


def test_restart_only_and_secret_lists_count_toward_the_line() -> None:
    """A snapshot names the schema's restart-only keys once more: 4,000 of 125 characters
    passed the check (81 KB of values), and every client got a snapshot over the line."""
    ten = create_model(
        "TenHeld",
        **{f"x{j}": (int, Field(j, json_schema_extra={"live": False})) for j in range(10)},
    )  # type: ignore[call-overload]
    held = create_model("Held", **{f"{'h' * 125}{i:03d}": (ten, ten()) for i in range(400)})  # type: ignore[call-overload]
    with pytest.raises(InvalidChange, match="one line of the socket protocol"):
        merge_layers(held, [defaults_layer(held)])


def test_a_sections_default_is_made_once_for_all_its_leaves() -> None:
    """``defaults_layer`` made a section's default (a deep copy, or its factory's call) once
    per leaf: 4,000 leaves in one section took 4.4 s. Once per section now, and the
    leaves' defaults are those of that one object."""
    made: list[int] = []

    def section() -> BaseModel:
        made.append(1)
        return _Ten(x3=33)

    holder = create_model("Holder", s=(_Ten, Field(default_factory=section)))  # type: ignore[call-overload]
    layer = defaults_layer(holder)
    assert len(made) == 1
    assert layer.values["s.x3"] == 33 and layer.values["s.x9"] == 9
