"""A three-member etcd cluster losing members under hotknob: what its errors say.

A member whose cluster has lost its majority still takes calls, and refuses each after
etcd's own request timeout (7 s by default) with "request timed out". That is no
failed connection: the member was reached, the others were not. A daemon started while
every member is down says why it cannot read them, not that they "all failed recently".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from hotknob.config.errors import Unavailable
from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from tests.daemon_proc import DaemonProcess
from tests.etcd_server import EtcdCluster, free_port

pytestmark = pytest.mark.timeout(60)

P = "/hotknob/t/config/"


def test_a_member_without_a_majority_says_it_could_not_serve_not_that_it_was_not_reached(
    etcd_cluster: EtcdCluster,
) -> None:
    alone, *others = etcd_cluster.members
    for member in others:
        member.kill()
    # Longer than etcd's own request timeout, so that etcd's answer comes first.
    options = EtcdOptions(endpoints=(alone.endpoint,), timeout=10.0)
    errors: dict[str, BaseException] = {}

    def call(name: str, fn: Callable[[EtcdStore], object]) -> None:
        store = EtcdStore(options)
        try:
            fn(store)
        except BaseException as exc:  # checked below
            errors[name] = exc
        finally:
            store.close()

    calls: dict[str, Callable[[EtcdStore], object]] = {
        "read": lambda s: s.read_prefix_state(P),
        "put": lambda s: s.put(P + "train/lr", "0.5"),
    }
    threads = [threading.Thread(target=call, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert set(errors) == set(calls), errors
    for name, exc in errors.items():
        text = str(exc)
        assert isinstance(exc, Unavailable), (name, text)
        assert alone.endpoint in text, text
        assert "connection failed" not in text, text
        assert "the member could not serve it: request timed out" in text, text
        assert "a majority of etcd's members must be up" in text, text


def test_a_daemon_started_with_every_member_down_logs_why_it_cannot_read_them(
    tmp_path: Path,
) -> None:
    """The first read asks a member that failed again while another is out; the client
    library keeps a failed member out of use for a while, and asked on the same client
    it refused at once, so the reason logged was its refusal, not the member's."""
    endpoints = ",".join(f"127.0.0.1:{free_port()}" for _ in range(3))
    with DaemonProcess(tmp_path, endpoints=endpoints) as daemon:
        deadline = time.monotonic() + 15
        while not (lost := daemon.events("etcd_disconnected")):
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        assert daemon.proc is not None and daemon.proc.poll() is None
    detail = lost[0]["detail"]
    assert "all failed recently" not in detail, detail
    assert "Connection refused" in detail, detail
