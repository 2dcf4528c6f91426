"""gRPC gets the very bytes of the TLS files that were checked, each time a connection is
built: a key replaced between the daemon's check and the read for gRPC (a renewal under a
reconnecting daemon) is refused with the daemon's own error naming the file, not handed to
gRPC, which would say it only in lines of its own on stderr, at every try."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from hotknob.config.errors import UsageError
from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.daemon.etcd_types import TLS_READS
from tests.certs import Pki, make_pki

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def _key_checked_then(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, after: Callable[[Path, int], None]
) -> tuple[Path, list[bytes]]:
    """A copy of the client key, and each check of the TLS files followed by ``after(key,
    checks so far)``; the key's bytes each check saw are listed."""
    key = tmp_path / "client.key"
    shutil.copy(pki.client_key, key)
    check = EtcdOptions.check_tls_files
    checks: list[bytes] = []

    def check_then(options: EtcdOptions) -> None:
        check(options)
        checks.append(key.read_bytes())
        after(key, len(checks))

    monkeypatch.setattr(EtcdOptions, "check_tls_files", check_then)
    return key, checks


def _options(pki: Pki, key: Path) -> EtcdOptions:
    return EtcdOptions(
        endpoints=("https://127.0.0.1:1",),  # never reached: the files are refused first
        ca_cert=str(pki.ca),
        cert_cert=str(pki.client_cert),
        cert_key=str(key),
        timeout=2.0,
    )


def test_a_key_replaced_right_after_its_check_is_refused_not_given_to_grpc(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def renewed(key: Path, checks: int) -> None:
        if checks == 1:  # the renewal lands between the check and gRPC's read
            shutil.copy(pki.server_key, key)

    key, checks = _key_checked_then(pki, tmp_path, monkeypatch, renewed)
    store = EtcdStore(_options(pki, key))
    try:
        with pytest.raises(UsageError, match="does not match the client certificate") as caught:
            store.read_prefix("/hotknob/t/config/")
    finally:
        store.close()
    assert str(key) in str(caught.value)
    assert len(checks) == 1  # the second check refused the replaced key


def test_the_bytes_checked_are_those_read_when_nothing_changes(pki: Pki, tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    shutil.copy(pki.client_key, key)
    ca, read_key, cert = _options(pki, key).checked_tls_bytes()
    assert (ca, read_key, cert) == (
        pki.ca.read_bytes(),
        pki.client_key.read_bytes(),
        pki.client_cert.read_bytes(),
    )


def test_files_that_keep_changing_are_refused_after_a_few_checks(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def touched(key: Path, checks: int) -> None:
        key.write_bytes(pki.client_key.read_bytes() + b"\n" * checks)  # same key, new bytes

    key, checks = _key_checked_then(pki, tmp_path, monkeypatch, touched)
    with pytest.raises(UsageError, match="keep changing"):
        _options(pki, key).checked_tls_bytes()
    assert len(checks) == TLS_READS
