"""What README.md promises about the CLI's options, checked where the program differs."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.daemon_proc import run_cli

pytestmark = pytest.mark.timeout(60)


def run_cli_without_etcd(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI run to completion with no ``HOTKNOB_ETCD_*`` variable of the caller's."""
    result: subprocess.CompletedProcess[str] = run_cli(*args, drop="HOTKNOB_ETCD_")
    return result


def test_a_client_certificate_without_its_key_is_refused_without_endpoints(
    tmp_path: Path,
) -> None:
    """README: a client certificate without its key is a usage error (exit 2); with no
    etcd endpoints, `get --etcd-cert FILE` printed the value and exited 0."""
    cert = tmp_path / "client.pem"
    cert.write_text("not a certificate\n")
    result = run_cli_without_etcd("get", "train.lr", "--etcd-cert", str(cert))
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "--etcd-key" in result.stderr


def test_a_client_certificate_without_its_key_is_refused_with_endpoints(
    tmp_path: Path,
) -> None:
    """The same flags with an endpoint: refused before etcd is asked (none runs there)."""
    cert = tmp_path / "client.pem"
    cert.write_text("not a certificate\n")
    result = run_cli_without_etcd(
        "get", "train.lr", "--etcd-endpoints", "127.0.0.1:1", "--etcd-cert", str(cert)
    )
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "--etcd-key" in result.stderr


def test_a_ca_file_that_does_not_load_is_refused_without_endpoints(tmp_path: Path) -> None:
    result = run_cli_without_etcd("get", "train.lr", "--etcd-ca", str(tmp_path / "none.pem"))
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert "none.pem" in result.stderr


def test_no_etcd_option_at_all_still_reads_the_local_layers() -> None:
    result = run_cli_without_etcd("get", "train.lr")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
