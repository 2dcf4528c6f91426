"""The throwaway etcd every integration test starts: its start must survive a slow probe
and a port that another process took first.

CI once failed at a fixture's setup: on a loaded machine one ``etcdctl endpoint health``
probe ran past its own time limit, the ``TimeoutExpired`` ended the whole start, and the
etcd it had launched was left running (the suite's leak check then failed the test too).
"""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.etcd_server import EtcdCluster, EtcdServer


def test_a_probe_that_runs_out_of_time_is_one_more_try_not_the_end(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = EtcdServer.etcdctl
    calls: list[tuple[str, ...]] = []

    def first_probe_hangs(self: EtcdServer, *args: str, **kwargs: object):  # type: ignore[no-untyped-def]
        calls.append(args)
        if len(calls) == 1:
            raise subprocess.TimeoutExpired(["etcdctl", *args], 2.0)
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(EtcdServer, "etcdctl", first_probe_hangs)
    server = EtcdServer()
    try:
        server.start()
        assert server.running()
        assert len(calls) >= 2, "the start returned without probing again"
        server.etcdctl("put", "k", "v")
        assert server.etcdctl("get", "k", "--print-value-only").stdout.strip() == "v"
    finally:
        server.close()


def test_a_start_that_is_interrupted_leaves_no_etcd_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def interrupted(self: EtcdServer, timeout: float = 10.0) -> None:
        assert self.running()  # launched, then the wait is cut short
        raise KeyboardInterrupt

    monkeypatch.setattr(EtcdServer, "wait_healthy", interrupted)
    server = EtcdServer()
    try:
        with pytest.raises(KeyboardInterrupt):
            server.start()
        assert not server.running(), "the launched etcd outlived its failed start"
    finally:
        server.close()


def test_a_port_taken_between_the_pick_and_the_bind_is_retried_on_new_ports(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # CI failed once on this: the retry after "bind: address already in use" kept the
    # taken port, so all three tries clashed the same way.
    from tests import etcd_server

    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    taken_port = int(taken.getsockname()[1])
    real_free_port = etcd_server.free_port
    picks = iter([taken_port])
    monkeypatch.setattr(etcd_server, "free_port", lambda: next(picks, None) or real_free_port())
    server = EtcdServer()
    try:
        assert server.client_port == taken_port
        server.start()
        assert server.running()
        assert server.client_port != taken_port
        server.etcdctl("put", "k", "v")
        assert server.etcdctl("get", "k", "--print-value-only").stdout.strip() == "v"
    finally:
        server.close()
        taken.close()


def test_a_cluster_member_whose_port_was_taken_is_started_again_on_new_ports() -> None:
    # CI failed once on this: a cluster's member lost its client port to another process
    # between the pick and etcd's bind, and the cluster, unlike one server, did not retry.
    cluster = EtcdCluster(3)
    taken_port = cluster.members[0].client_port
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    taken.bind(("127.0.0.1", taken_port))
    taken.listen()
    try:
        cluster.start()
        assert all(member.running() for member in cluster.members)
        assert cluster.members[0].client_port != taken_port
        cluster.members[0].etcdctl("put", "k", "v")
        got = cluster.members[2].etcdctl("get", "k", "--print-value-only")
        assert got.stdout.strip() == "v", "the members form one cluster"
    finally:
        cluster.close()
        taken.close()
