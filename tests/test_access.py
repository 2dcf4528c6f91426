"""Who may talk to the daemon and to etcd, and what is never shown.

- the socket folder is 0700 and the socket 0600; a process of another user
  (``nobody``) cannot reach it, and when the file modes are opened up on
  purpose, the peer-uid check still refuses it and logs the refusal;
- etcd with authentication (a user whose role covers only ``/hotknob/<app>/``)
  and with TLS (certificates made here): the daemon works with the right
  options, and with wrong ones says so in one line, never with the password;
- values the schema marks secret (``SecretStr``) appear in no log line, no
  ``explain`` output, no ``status`` output and no ``watch`` event.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hotknob.model_runtime import protocol
from tests.certs import Pki, make_pki
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(90)

NOBODY = 65534
APP = "t"
P = f"/hotknob/{APP}/config/"
ROOT_PW = "root-pw-Zq81"
APP_PW = "app-pw-Xk42-do-not-log"


def connect_as(uid: int, path: Path) -> dict[str, object]:
    """Connect to ``path`` from a forked child running as ``uid``; report what happened."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no Python-level cleanup, only system calls and _exit
        result: dict[str, object] = {}
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(5)
            try:
                sock.connect(str(path))
            except OSError as exc:
                result = {"connected": False, "errno": exc.errno}
            else:
                data = b""
                try:  # the refusal comes at once, before any hello: read it first
                    while chunk := sock.recv(65536):
                        data += chunk
                except TimeoutError:
                    sock.sendall(protocol.encode(protocol.hello("intruder")))
                    data += sock.recv(65536)
                result = {"connected": True, "reply": data.decode("utf-8", "replace")}
        except Exception as exc:
            result = {"error": repr(exc)}
        os.write(write_end, json.dumps(result).encode())
        os._exit(0)
    os.close(write_end)
    try:
        data = b""
        while chunk := os.read(read_end, 65536):
            data += chunk
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return dict(json.loads(data))


@pytest.fixture
def open_workdir() -> Iterator[Path]:
    """A work dir under /tmp that another user may traverse (pytest's tmp dirs are 0700)."""
    folder = Path(tempfile.mkdtemp(prefix="hotknob-access-"))
    os.chmod(folder, 0o755)
    try:
        yield folder
    finally:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_socket_modes_and_another_user_is_refused_and_logged(open_workdir: Path) -> None:
    with DaemonProcess(open_workdir, app=APP) as daemon:
        folder_mode = stat.S_IMODE(os.stat(daemon.socket_path.parent).st_mode)
        socket_mode = stat.S_IMODE(os.lstat(daemon.socket_path).st_mode)
        assert (folder_mode, socket_mode) == (0o700, 0o600)

        outside = connect_as(NOBODY, daemon.socket_path)
        assert outside == {"connected": False, "errno": 13}, outside  # EACCES: the folder

        # Open the modes on purpose: the peer-uid check is the second, independent lock.
        os.chmod(daemon.socket_path.parent, 0o755)
        os.chmod(daemon.socket_path, 0o666)
        inside = connect_as(NOBODY, daemon.socket_path)
        assert inside["connected"] is True, inside
        reply = [json.loads(line) for line in str(inside["reply"]).splitlines()]
        assert reply == [{"type": "error", "error": f"uid {NOBODY} may not use this socket"}]
        deadline = time.monotonic() + 5
        while not daemon.events("client_refused"):
            assert time.monotonic() < deadline, "refusal not logged"
            time.sleep(0.02)
        refused = daemon.events("client_refused")
        assert refused[0]["uid"] == NOBODY and refused[0]["reason"] == "uid not allowed"
        with RawClient(daemon.socket_path) as own:  # the owner still gets in
            assert own.snapshot["type"] == "snapshot"
        assert daemon.proc is not None and daemon.proc.poll() is None


# --- etcd authentication -------------------------------------------------------------------------


def enable_auth(etcd: EtcdServer) -> None:
    """root (all rights) and ``app`` whose role reads and writes ``/hotknob/t/`` only."""
    etcd.etcdctl("user", "add", "root", "--new-user-password", ROOT_PW)
    etcd.etcdctl("user", "grant-role", "root", "root")
    etcd.etcdctl("role", "add", "hotknob-t")
    etcd.etcdctl(
        "role", "grant-permission", "hotknob-t", "--prefix=true", "readwrite", "/hotknob/t/"
    )
    etcd.etcdctl("user", "add", "app", "--new-user-password", APP_PW)
    etcd.etcdctl("user", "grant-role", "app", "hotknob-t")
    etcd.etcdctl("auth", "enable")


def root_ctl(etcd: EtcdServer, *args: str) -> str:
    return etcd.etcdctl("--user", f"root:{ROOT_PW}", *args).stdout


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_etcd_auth_right_and_wrong_credentials(etcd: EtcdServer, tmp_path: Path) -> None:
    enable_auth(etcd)
    root_ctl(etcd, "put", P + "train/lr", "0.03")
    auth = ["--etcd-user", "app", "--node", "n1", "--status-ttl", "2"]
    env = {"HOTKNOB_ETCD_PASSWORD": APP_PW}
    with (
        DaemonProcess(
            tmp_path / "ok", app=APP, endpoints=etcd.endpoint, extra=auth, env=env
        ) as daemon,
        RawClient(daemon.socket_path, name="p1") as client,
    ):
        assert client.snapshot["values"]["train"]["lr"] == 0.03
        root_ctl(etcd, "put", P + "train/lr", "0.04")
        update = client.next_update()
        assert update["values"]["train"]["lr"] == 0.04
        client.send(protocol.applied(update["version"], 5))
        deadline = time.monotonic() + 10  # the status entry lands inside the role's prefix
        while "/hotknob/t/status/n1/p1" not in root_ctl(etcd, "get", "--prefix", "/hotknob/t/"):
            assert time.monotonic() < deadline, "status entry not written with the app's role"
            time.sleep(0.1)
        log = daemon.log()
    assert APP_PW not in log

    common = ["--app", APP, "--etcd-endpoints", etcd.endpoint, "--etcd-user", "app"]
    done = run_cli("get", "train.lr", *common, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "0.04", done.stderr

    wrong = run_cli("get", "train.lr", *common, "--etcd-password", "not-the-password-77")
    line = one_line(wrong.stderr)
    assert wrong.returncode == 1 and "authentication failed" in line, line
    assert "not-the-password-77" not in wrong.stderr + wrong.stdout

    outside = run_cli("get", *common[2:], "--app", "other", env=env)  # the role stops at /t/
    line = one_line(outside.stderr)
    assert outside.returncode == 1 and "permission denied" in line, line
    assert APP_PW not in outside.stderr

    bad = DaemonProcess(
        tmp_path / "bad",
        app=APP,
        endpoints=etcd.endpoint,
        extra=["--etcd-user", "app", "--etcd-password", "wrong-pw-Hh55"],
    )
    with bad, RawClient(bad.socket_path) as client:
        assert client.snapshot["values"]["train"]["lr"] == 1e-3  # nothing known: defaults
        deadline = time.monotonic() + 10
        while not bad.events("etcd_disconnected"):
            assert time.monotonic() < deadline, bad.log()
            time.sleep(0.05)
        detail = bad.events("etcd_disconnected")[0]["detail"]
        assert "authentication failed" in detail and "app" in detail, detail
        assert "wrong-pw-Hh55" not in bad.log()


# --- etcd over TLS -------------------------------------------------------------------------------


class TlsEtcdServer(EtcdServer):
    """One etcd member serving clients over TLS only, requiring a client certificate."""

    def __init__(self, pki: Pki) -> None:
        super().__init__(
            "tls",
            extra_args=[
                "--cert-file", str(pki.server_cert),
                "--key-file", str(pki.server_key),
                "--trusted-ca-file", str(pki.ca),
                "--client-cert-auth",
            ],
        )  # fmt: skip
        self.pki = pki

    @property
    def client_url(self) -> str:
        return f"https://{self.endpoint}"

    def etcdctl(self, *args: str, **kwargs: object) -> object:  # type: ignore[override]
        tls = ["--cacert", str(self.pki.ca), "--cert", str(self.pki.client_cert)]
        tls += ["--key", str(self.pki.client_key)]
        kwargs.setdefault("endpoints", self.client_url)
        return super().etcdctl(*tls, *args, **kwargs)  # type: ignore[arg-type]


def test_etcd_tls_right_and_wrong_options(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    with TlsEtcdServer(pki) as etcd:
        etcd.etcdctl("put", P + "train/lr", "0.05")
        url = etcd.client_url
        tls = ["--etcd-ca", str(pki.ca), "--etcd-cert", str(pki.client_cert)]
        tls += ["--etcd-key", str(pki.client_key)]
        with (
            DaemonProcess(tmp_path / "ok", app=APP, endpoints=url, extra=tls) as daemon,
            RawClient(daemon.socket_path) as client,
        ):
            assert client.snapshot["values"]["train"]["lr"] == 0.05
            etcd.etcdctl("put", P + "train/lr", "0.06")
            assert client.next_update()["values"]["train"]["lr"] == 0.06

        common = ["--app", APP, "--etcd-endpoints", url, "--etcd-timeout", "2"]
        done = run_cli("get", "train.lr", *common, *tls)
        assert done.returncode == 0 and done.stdout.strip() == "0.06", done.stderr

        wrong_ca = [*tls]
        wrong_ca[1] = str(pki.other_ca)
        for options in (wrong_ca, tls[:2], []):  # wrong CA; no client cert; no TLS at all
            done = run_cli("get", "train.lr", *common, *options)
            line = one_line(done.stderr)
            assert done.returncode == 3 and "cannot reach etcd" in line, (options, line)

        bad = DaemonProcess(tmp_path / "bad", app=APP, endpoints=url, extra=wrong_ca)
        with bad, RawClient(bad.socket_path) as client:
            assert client.snapshot["values"]["train"]["lr"] == 1e-3
            deadline = time.monotonic() + 10
            while not bad.events("etcd_unavailable_at_start"):
                assert time.monotonic() < deadline, bad.log()
                time.sleep(0.05)


# --- secrets -------------------------------------------------------------------------------------

SECRETS = (
    "etcd-secret-AAAA1111",
    "shrtB9",
    "cli-secret-CCCC2222",
    "etcd-shadow-DDDD3333",
    "etcd-secret-EEEE5555",
)


def test_secret_values_appear_in_no_log_explain_status_or_event(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    schema = ["--schema", "tests.secret_schema:Params"]
    pinned = ["--set", f"service.backup_key={SECRETS[2]}"]
    common = ["--app", APP, "--etcd-endpoints", etcd.endpoint, *schema, *pinned]
    with (
        DaemonProcess(
            tmp_path, app=APP, endpoints=etcd.endpoint, extra=[*schema, *pinned, "--node", "n1"]
        ) as daemon,
        RawClient(daemon.socket_path, name="w", watch=True) as watcher,
    ):
        etcd.etcdctl("put", P + "service/api_key", SECRETS[0])
        etcd.etcdctl("put", P + "service/api_key", SECRETS[1])  # too short: rejected
        etcd.etcdctl("put", P + "service/api_key", SECRETS[4])
        etcd.etcdctl("put", P + "service/backup_key", SECRETS[3])  # shadowed by --set
        etcd.etcdctl("put", P + "train/lr", "0.02")
        messages: list[dict[str, Any]] = []
        while not messages or messages[-1].get("values", {}).get("train", {}).get("lr") != 0.02:
            messages.append(watcher.next())
        kinds = [m.get("event") for m in messages if m["type"] == "event"]
        assert "change_rejected" in kinds, messages
        # The process itself gets the real value (over its owner-only socket); events,
        # which `hotknob watch` prints for people, are masked like everything else.
        assert messages[-1]["values"]["service"]["api_key"] == SECRETS[4]
        assert messages[-1]["values"]["service"]["backup_key"] == SECRETS[2]
        events = [m for m in messages if m["type"] == "event"]
        watcher.send(protocol.applied(messages[-1]["version"], 1))
        explain = run_cli("explain", *common)
        explain_json = run_cli("explain", "--json", *common)
        get = run_cli("get", "--json", *common)
        # status takes no layer options (it reads only etcd): not the --set of ``common``
        status = run_cli(
            "status", "--json", "--app", APP, "--etcd-endpoints", etcd.endpoint, *schema
        )
        for done in (explain, explain_json, get, status):
            assert done.returncode == 0, done.stderr
        layers = json.loads(explain_json.stdout)["keys"]
        api = next(row for row in layers if row["key"] == "service.api_key")
        assert api["from"] == "etcd" and set(api["layers"].values()) == {"**********"}
        assert daemon.events("change_rejected") and daemon.events("update_shadowed")
        log = daemon.log()
    shown = "\n".join(
        [
            log,
            json.dumps(events),
            *(d.stdout + d.stderr for d in (explain, explain_json, get, status)),
        ]
    )
    for secret in SECRETS:
        assert secret not in shown, f"secret {secret!r} was shown"


def _lock_as(uid: int, path: Path) -> str:
    """``lock_socket_path(path)`` in a forked child running as ``uid``: what it got."""
    from hotknob.daemon.socket_path import lock_socket_path

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: system calls and _exit only
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            fd = lock_socket_path(path)
            result = "unlocked" if fd is None else "locked"
        except Exception as exc:
            result = f"{type(exc).__name__}: {exc}"
        os.write(write_end, result.encode())
        os._exit(0)
    os.close(write_end)
    try:
        os.waitpid(pid, 0)
        return os.read(read_end, 4096).decode()
    finally:
        os.close(read_end)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user needs root")
def test_a_lock_file_in_a_shared_folder_does_not_lock_out_another_user(
    open_workdir: Path,
) -> None:
    shared = open_workdir / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # sticky and open to all, like /tmp
    path = shared / "app.sock"
    assert _lock_as(NOBODY, path) == "locked"  # its daemon ran and stopped: the file stays
    assert stat.S_IMODE(os.stat(shared / "app.sock.lock").st_mode) == 0o644
    assert _lock_as(1, path) == "locked"  # another user's daemon takes the same path later
    # A lock file it cannot even read (made by hand, 0600): served unlocked, not refused.
    os.chmod(shared / "app.sock.lock", 0o600)
    assert _lock_as(1, path) == "unlocked"
