"""StatusPublisher against a real etcd: entries on a lease, and a quiet log while etcd is away."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

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
