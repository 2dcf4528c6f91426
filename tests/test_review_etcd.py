"""What a review that drove hotknob against real etcd servers found, each against a real etcd.

- a client certificate without its key (or the reverse) is a usage error, not an abort
  inside gRPC, for the CLI and for ``run``;
- ``--etcd-timeout`` of 0, below 0, ``nan`` or ``inf`` is a usage error, not an etcd that
  cannot be reached;
- TLS files that cannot load (a key that does not match its certificate, garbage, an
  encrypted key) are refused at the start in one line naming the file; files broken
  under a running daemon are named in its log, with no line of gRPC's own in it;
- etcd wiped and written again up to the same revisions under a watcher that was cut off
  is read again in full, and so is another cluster;
- an etcd with authentication on, asked without credentials, says so; a transaction over
  etcd's operation limit says how ``unset`` of a large section gets under it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from tests.certs import Pki, make_pki
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer
from tests.test_access import TlsEtcdServer, enable_auth, one_line
from tests.test_etcd_recovery import Relay, cut_off_and_wait
from tests.test_etcd_watcher import P as WATCHED
from tests.test_etcd_watcher import Recorder, watch

pytestmark = pytest.mark.timeout(60)

APP = "t"
P = f"/hotknob/{APP}/config/"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@pytest.fixture
def tls_etcd(pki: Pki) -> Iterator[TlsEtcdServer]:
    with TlsEtcdServer(pki) as server:
        yield server


def run_daemon_to_exit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``hotknob run`` that is expected to refuse its options and exit at once."""
    common = ["--app", APP, "--socket", str(tmp_path / "d.sock")]
    common += ["--state-dir", str(tmp_path / "state")]
    done: subprocess.CompletedProcess[str] = run_cli("run", *common, *args, timeout=15)
    return done


def start_failed(stderr: str) -> tuple[dict[str, Any], str]:
    """``run``'s stderr when it failed to start: the ``daemon_start_failed`` JSON line,
    then the plain line, and nothing else (no line of gRPC's)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 2, stderr
    event = json.loads(lines[0])
    assert event["event"] == "daemon_start_failed", stderr
    return event, lines[1]


# --- a client certificate without its key, or the reverse --------------------------------------


@pytest.mark.timeout(60)
def test_a_client_certificate_without_its_key_is_a_usage_error(
    tls_etcd: TlsEtcdServer, pki: Pki, tmp_path: Path
) -> None:
    url = tls_etcd.client_url
    half = (["--etcd-cert", str(pki.client_cert)], ["--etcd-key", str(pki.client_key)])
    for option in half:
        tls = ["--etcd-ca", str(pki.ca), *option]
        done = run_cli("get", "--app", APP, "--etcd-endpoints", url, *tls, "train.lr")
        line = one_line(done.stderr)
        assert done.returncode == 2, done.stderr
        assert "--etcd-cert and --etcd-key" in line, line

        done = run_daemon_to_exit(tmp_path, "--etcd-endpoints", url, *tls)
        event, line = start_failed(done.stderr)
        assert done.returncode == 2 and event["exit_code"] == 2, done.stderr
        assert "--etcd-cert and --etcd-key" in line, line


# --- --etcd-timeout ---------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_an_etcd_timeout_that_is_not_above_0_and_finite_is_a_usage_error(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    etcd.etcdctl("put", P + "train/lr", "0.2")
    common = ["--app", APP, "--etcd-endpoints", etcd.endpoint]
    for value in ("0", "-1", "nan", "inf"):
        done = run_cli("get", *common, "--etcd-timeout", value, "train.lr")
        line = one_line(done.stderr)
        assert done.returncode == 2, (value, done.stderr)
        assert "--etcd-timeout" in line and "above 0" in line, line
    done = run_daemon_to_exit(tmp_path, "--etcd-endpoints", etcd.endpoint, "--etcd-timeout", "nan")
    line = one_line(done.stderr)  # refused as it is parsed, as any malformed option
    assert done.returncode == 2 and "--etcd-timeout" in line, done.stderr
    with pytest.raises(Exception, match="--etcd-timeout"):
        EtcdOptions(endpoints=(etcd.endpoint,), timeout=float("inf"))
    done = run_cli("get", *common, "--etcd-timeout", "0.5", "train.lr")
    assert done.returncode == 0 and done.stdout.strip() == "0.2", done.stderr


# --- TLS files that cannot load ----------------------------------------------------------------


@pytest.mark.timeout(90)
def test_tls_files_that_cannot_load_are_named_in_one_line(
    tls_etcd: TlsEtcdServer, pki: Pki, tmp_path: Path
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    encrypted = tmp_path / "encrypted.key"
    openssl = ["openssl", "ec", "-in", str(pki.client_key), "-aes128", "-passout", "pass:pw"]
    subprocess.run([*openssl, "-out", str(encrypted)], check=True, capture_output=True)
    ca, cert, key = str(pki.ca), str(pki.client_cert), str(pki.client_key)
    cases = {
        "does not match": (ca, cert, str(pki.server_key), str(pki.server_key)),
        "garbage CA": (str(garbage), cert, key, str(garbage)),
        "garbage cert": (ca, str(garbage), key, str(garbage)),
        "garbage key": (ca, cert, str(garbage), str(garbage)),
        "encrypted key": (ca, cert, str(encrypted), str(encrypted)),
    }
    url = tls_etcd.client_url
    for case, (ca_file, cert_file, key_file, named) in cases.items():
        tls = ["--etcd-ca", ca_file, "--etcd-cert", cert_file, "--etcd-key", key_file]
        done = run_cli("get", "--app", APP, "--etcd-endpoints", url, *tls, "train.lr")
        line = one_line(done.stderr)  # no line of gRPC's before it
        assert done.returncode == 2, (case, done.stderr)
        assert named in line and "cannot reach" not in line, (case, line)

    tls = ["--etcd-ca", ca, "--etcd-cert", cert, "--etcd-key", str(pki.server_key)]
    done = run_daemon_to_exit(tmp_path, "--etcd-endpoints", url, *tls)
    event, line = start_failed(done.stderr)
    assert done.returncode == 2 and event["exit_code"] == 2, done.stderr
    assert str(pki.server_key) in event["error"] and "does not match" in event["error"], event


@pytest.mark.timeout(60)
def test_tls_files_broken_under_a_running_daemon_are_named_in_its_log_alone(
    tls_etcd: TlsEtcdServer, pki: Pki, tmp_path: Path
) -> None:
    """A key replaced by one that does not match (a renewal half done) while etcd is
    away: the daemon names the file in its log, keeps serving, and has no line of
    gRPC's in its log; once the key matches again, it takes etcd's changes."""
    key = tmp_path / "client.key"
    shutil.copy(pki.client_key, key)
    tls = ["--etcd-ca", str(pki.ca), "--etcd-cert", str(pki.client_cert), "--etcd-key", str(key)]
    tls_etcd.etcdctl("put", P + "train/lr", "0.05")
    daemon = DaemonProcess(tmp_path / "d", app=APP, endpoints=tls_etcd.client_url, extra=tls)
    with daemon, RawClient(daemon.socket_path) as client:
        assert client.snapshot["values"]["train"]["lr"] == 0.05
        shutil.copy(pki.server_key, key)
        tls_etcd.kill()
        tls_etcd.launch()
        tls_etcd.wait_healthy()
        deadline = time.monotonic() + 10
        while not [e for e in daemon.events("etcd_tls_files_refused") if str(key) in e["detail"]]:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        time.sleep(1.0)  # a few retries on the bad key
        shutil.copy(pki.client_key, key)
        tls_etcd.etcdctl("put", P + "train/lr", "0.06")
        assert client.next_update()["values"]["train"]["lr"] == 0.06
        log = daemon.log()
    not_json = [line for line in log.splitlines() if not line.startswith("{")]
    assert not not_json, not_json[:5]


# --- etcd wiped and written again, another cluster ----------------------------------------------


@pytest.fixture
def relay(etcd: EtcdServer) -> Iterator[Relay]:
    r = Relay(etcd.client_port)
    yield r
    r.close()


def seed(endpoint: str, lr: str, temperature: str) -> tuple[dict[str, bytes], int]:
    """The same two puts, as a bootstrap script makes them; returns the prefix read."""
    store = EtcdStore(EtcdOptions(endpoints=(endpoint,), timeout=5.0))
    try:
        store.put(WATCHED + "train/lr", lr)
        store.put(WATCHED + "sampling/temperature", temperature)
        return store.read_prefix(WATCHED)
    finally:
        store.close()


def wipe(etcd: EtcdServer) -> None:
    etcd.kill()
    shutil.rmtree(etcd.data_dir / "data")


@pytest.mark.timeout(60)
def test_etcd_wiped_and_written_again_to_the_same_revisions_is_read_again(
    etcd: EtcdServer, relay: Relay
) -> None:
    rec = Recorder()
    with capture_logs() as logs, watch(rec, EtcdOptions(endpoints=(relay.endpoint,))) as w:
        assert w.wait_ready(10)
        _, revision = seed(etcd.endpoint, "0.1", "0.7")
        rec.wait(lambda: w.last_revision == revision)
        cut_off_and_wait(relay, rec)
        wipe(etcd)
        etcd.launch()
        etcd.wait_healthy()
        expected = seed(etcd.endpoint, "0.5", "1.0")
        assert expected[1] == revision  # the same keys at the same revisions
        relay.restore()
        rec.wait(lambda: len(rec.snapshots) == 2, timeout=10)
        assert rec.snapshots[1] == expected
    assert any(e["event"] == "etcd_history_changed" for e in logs), logs


@pytest.mark.timeout(60)
def test_another_cluster_is_read_again_even_with_the_same_values(
    etcd: EtcdServer, relay: Relay
) -> None:
    """A cluster made with another token (so another cluster id), written to the same
    values at the same revisions: the prefix is read again, and the change is logged."""
    rec = Recorder()
    with capture_logs() as logs, watch(rec, EtcdOptions(endpoints=(relay.endpoint,))) as w:
        assert w.wait_ready(10)
        expected = seed(etcd.endpoint, "0.1", "0.7")
        rec.wait(lambda: w.last_revision == expected[1])
        cut_off_and_wait(relay, rec)
        wipe(etcd)
        token = ["--initial-cluster-token", "another-cluster"]
        with EtcdServer(
            client_port=etcd.client_port, peer_port=etcd.peer_port, extra_args=token
        ) as other:
            assert seed(other.endpoint, "0.1", "0.7") == expected
            relay.restore()
            rec.wait(lambda: len(rec.snapshots) == 2, timeout=10)
            assert rec.snapshots[1] == expected
            w.stop()
    changed = [e for e in logs if e["event"] == "etcd_cluster_changed"]
    assert changed and changed[0]["cluster_id"] != changed[0]["was"], logs


# --- messages -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_no_credentials_against_an_etcd_with_auth_says_auth_is_required(
    etcd: EtcdServer,
) -> None:
    enable_auth(etcd)
    done = run_cli("get", "--app", APP, "--etcd-endpoints", etcd.endpoint, "train.lr")
    line = one_line(done.stderr)
    assert done.returncode == 1, done.stderr
    assert "requires authentication" in line and "--etcd-user" in line, line


@pytest.mark.timeout(60)
def test_unset_of_a_section_over_etcds_operation_limit_names_the_way_under_it() -> None:
    with EtcdServer(extra_args=["--max-txn-ops", "3"]) as etcd:
        for key, value in (("lr", "0.1"), ("momentum", "0.5"), ("weight_decay", "0.01")):
            etcd.etcdctl("put", P + f"train/{key}", value)
        env = {"HOTKNOB_ETCD_ENDPOINTS": etcd.endpoint}
        done = run_cli("unset", "--app", APP, "train", env=env)
        line = one_line(done.stderr)
        assert done.returncode == 1, done.stderr
        assert "--max-txn-ops" in line and "unset its keys a few at a time" in line, line
        assert run_cli("unset", "--app", APP, "train.lr", env=env).returncode == 0
