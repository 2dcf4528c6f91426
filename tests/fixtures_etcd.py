"""pytest fixtures that start real etcd servers (see ``tests/etcd_server.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.etcd_server import EtcdCluster, EtcdServer


@pytest.fixture
def etcd() -> Iterator[EtcdServer]:
    """A fresh single-member etcd for one test (starts in about 0.2 s)."""
    server = EtcdServer().start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def etcd_session() -> Iterator[EtcdServer]:
    """One etcd shared by a whole session: use a unique key prefix per test."""
    server = EtcdServer("session").start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def etcd_cluster() -> Iterator[EtcdCluster]:
    """A fresh three-member loopback cluster for one test."""
    cluster = EtcdCluster(3).start()
    try:
        yield cluster
    finally:
        cluster.close()
