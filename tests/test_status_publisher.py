"""StatusPublisher against a real etcd: entries on a lease, and a quiet log while etcd is away."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from structlog.testing import capture_logs

from hotknob.config.errors import Unavailable
from hotknob.daemon import status
from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.daemon.status import StatusPublisher
from tests.etcd_server import EtcdServer


def _wait_for(check: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_an_unreachable_etcd_is_logged_once_then_sparingly_then_recovered(
    etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status, "WARN_EVERY_S", 2.5)
    down_until = time.monotonic() + 5.5  # about six retries, one a second
    attempts = []

    def factory() -> EtcdStore:
        attempts.append(time.monotonic())
        if time.monotonic() < down_until:
            raise Unavailable("cannot reach etcd at nowhere")
        return EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=3.0))

    publisher = StatusPublisher(factory, "app", "node1", ttl=6)
    with capture_logs() as logs:
        publisher.start()
        try:
            publisher.publish("proc", {"version": 3, "step": 7})
            _wait_for(lambda: any(e["event"] == "status_publish_recovered" for e in logs))
            key = publisher.key("proc")
            _wait_for(lambda: bool(etcd.etcdctl("get", key, "--print-value-only").stdout.strip()))
            entry = json.loads(etcd.etcdctl("get", key, "--print-value-only").stdout)
        finally:
            publisher.stop()
    assert entry == {"version": 3, "step": 7}  # kept through the failures, then written
    failed = [e for e in logs if e["event"] == "status_publish_failed"]
    failures = len(attempts) - 1
    assert failures >= 5, attempts
    # The first failure, then one each 2.5 s (at most three in 5.5 s): not one a second.
    assert [e["failures"] for e in failed][:1] == [1]
    assert 2 <= len(failed) <= 3 < failures, (failed, failures)
    (recovered,) = [e for e in logs if e["event"] == "status_publish_recovered"]
    assert recovered["failures"] == failures
    assert logs.index(recovered) > logs.index(failed[-1])


def _value(etcd: EtcdServer, key: str) -> dict[str, Any] | None:
    text = etcd.etcdctl("get", key, "--print-value-only").stdout.strip()
    return json.loads(text) if text else None


def test_an_entry_etcd_refuses_does_not_hold_back_the_others() -> None:
    # An etcd that takes requests of at most 64 KiB, to refuse an entry without megabytes.
    server = EtcdServer(extra_args=["--max-request-bytes", str(64 * 1024)]).start()
    options = EtcdOptions(endpoints=(server.endpoint,), timeout=3.0)
    publisher = StatusPublisher(lambda: EtcdStore(options), "app", "node1", ttl=6)
    wide = {"version": 1, "metrics": {"latest": {f"m{i}": 1.0 for i in range(10_000)}}}
    huge = {"version": 1, "note": "x" * 100_000}  # too large even without its metrics
    try:
        with capture_logs() as logs:
            publisher.start()
            for round_ in range(3):  # every second write of the same entries: still once
                publisher.publish("wide", {**wide, "step": round_})
                publisher.publish("huge", {**huge, "step": round_})
                publisher.publish("good", {"version": 1, "step": round_})
                good = {"version": 1, "step": round_}
                _wait_for(lambda: _value(server, publisher.key("good")) == good)  # noqa: B023
            _wait_for(lambda: (_value(server, publisher.key("wide")) or {}).get("step") == 2)
            assert _value(server, publisher.key("wide")) == {
                "version": 1,
                "step": 2,
                "left_out": ["metrics"],
            }
            assert _value(server, publisher.key("huge")) is None
            publisher.publish("huge", {"version": 2, "step": 3})  # small again: written
            _wait_for(lambda: _value(server, publisher.key("huge")) == {"version": 2, "step": 3})
        events = [e["event"] for e in logs]
        assert "status_publish_failed" not in events, logs
        assert events.count("status_entry_trimmed") == 1, logs
        assert events.count("status_entry_skipped") == 1, logs
    finally:
        publisher.stop()
        server.close()


def test_an_entry_over_the_size_bound_is_written_without_its_large_parts(
    etcd: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(status, "MAX_ENTRY_BYTES", 2000)
    options = EtcdOptions(endpoints=(etcd.endpoint,), timeout=3.0)
    publisher = StatusPublisher(lambda: EtcdStore(options), "app", "node1", ttl=6)
    errors = [{"binding": "B", "error": "e" * 3000}]
    publisher.start()
    try:
        publisher.publish("p", {"version": 4, "errors": errors, "metrics": {"latest": {}}})
        _wait_for(lambda: _value(etcd, publisher.key("p")) is not None)
        assert _value(etcd, publisher.key("p")) == {"version": 4, "left_out": ["metrics", "errors"]}
    finally:
        publisher.stop()


def test_a_guard_waits_for_other_nodes_processes_it_has_not_seen_a_window_of() -> None:
    """Another daemon's process whose entry shows no window of the guard yet (the change
    or the window not yet published) is among those not heard from, unless its daemon
    refused the change; one done on its daemon is not waited for."""
    import json

    from hotknob.daemon.status_entries import remote_open_windows

    prefix = "/hotknob/t/status/"
    guard = "g1"
    entries = {
        "n1/here": {"revision": 8, "guards": {guard: {"reported": True}}},  # this node's
        "n2/late": {"revision": 7},  # the change not yet published
        "n2/open": {"revision": 8, "guards": {guard: {"reported": False}}},
        "n3/inside": {"revision": 8, "guards": {guard: {"reported": True}}},
        "n3/done": {"revision": 8, "guards": {guard: {"reported": True, "done": True}}},
        "n4/refused": {"revision": 7, "rejected": {"revision": 8, "reason": "too hot"}},
        "n4/older": {"revision": 7, "rejected": {"revision": 5, "reason": "an old one"}},
    }
    kvs = {prefix + name: json.dumps(entry).encode() for name, entry in entries.items()}
    inside, unheard = remote_open_windows(kvs, prefix, "n1", guard, 8)
    assert inside == ["n3/inside"]
    assert sorted(unheard) == ["n2/late", "n2/open", "n4/older"]
