"""A seeded run of random operations against the whole system: a real etcd, one real
``hotknob run`` with two config files and an env layer, and a protocol client. Values
are put in etcd (valid, out of range, of the wrong type, a section, unknown keys) and
deleted, the files are saved valid, invalid and unparseable, and the daemon is killed
and stopped and started again on the same state dir. Throughout, every state the client
receives must pass the schema and its versions must never go back; the daemon must stay
up with ``/healthz`` answering; and once etcd and the files hold valid values again,
the client must run exactly what ``hotknob get`` computes.
"""

from __future__ import annotations

import json
import os
import random
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from hotknob.config.schema import MLParams
from tests.daemon_proc import DaemonProcess, RawClient, run_cli
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(60)

P = "/hotknob/t/config/"
ENV = {"HOTKNOB_PARAM_SAMPLING__TOP_P": "0.9"}
GOOD = [
    ("train/lr", "0.2"),
    ("train/lr", "0.05"),
    ("train/momentum", "0.5"),
    ("sampling/temperature", "0.7"),
    ("sampling/top_k", "40"),
    ("train/grad_clip", "null"),
]
BAD = [
    ("train/lr", "-1"),
    ("train/lr", "0"),
    ("train/momentum", "1.5"),
    ("sampling/top_k", '"abc"'),
    ("sampling/temperature", "true"),
    ("train/foo", "1"),
    ("train", '{"lr": 0.5}'),
]
FILES_OK = ["train:\n  lr: 0.01\n", "sampling:\n  top_k: 3\n", "train:\n  weight_decay: 0.1\n"]
FILES_BAD = ["train:\n  lr: -3\n", "sampling:\n  top_k: -1\n", "train: [\n", "train:\n  bogus: 1\n"]


class Watched:
    """The client side of the invariants: each state received is checked as it comes."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.client: RawClient | None = None
        self.values: dict[str, Any] = {}
        self.version = 0
        self.problems: list[str] = []

    def take(self, message: dict[str, Any], after: str) -> None:
        if message["type"] not in ("snapshot", "update"):
            return
        if message["version"] < self.version:
            self.problems.append(f"version {self.version} -> {message['version']} after {after}")
        self.version = max(self.version, message["version"])
        try:
            MLParams.model_validate(message["values"])
        except ValueError as exc:
            self.problems.append(f"an invalid state reached the client after {after}: {exc}")
        self.values = message["values"]
        assert self.client is not None
        self.client.send({"type": "applied", "version": message["version"], "step": 1})

    def connect(self, after: str) -> None:
        self.client = RawClient(self.daemon.socket_path)
        self.take(self.client.snapshot, after)

    def drain(self, after: str) -> None:
        """Take what the daemon sends until it has been quiet a moment."""
        assert self.client is not None
        while not self.client.no_message(0.3):
            self.take(self.client.next(), after)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None


def healthz(daemon: DaemonProcess) -> int:
    port = daemon.events("metrics_listening")[-1]["port"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def save(path: Path, text: str, by_rename: bool) -> None:
    if by_rename:
        spare = path.with_suffix(".new")
        spare.write_text(text)
        os.replace(spare, path)
    else:
        path.write_text(text)


def test_random_operations_never_put_an_invalid_or_stale_value_in_a_process(
    tmp_path: Path, etcd: EtcdServer
) -> None:
    rng = random.Random(20261202)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    a.write_text(FILES_OK[0])
    b.write_text("sampling:\n  temperature: 0.5\n")
    daemon = DaemonProcess(
        tmp_path,
        endpoints=etcd.endpoint,
        configs=[a, b],
        extra=["--metrics-addr", "127.0.0.1:0"],
        env=ENV,
    )
    watched = Watched(daemon)
    done: list[str] = []
    with daemon:
        watched.connect("the start")
        for _ in range(22):
            kind = rng.choice(["good", "good", "bad", "bad", "del", "file", "file", "kill", "term"])
            if kind == "good":
                key, value = rng.choice(GOOD)
                etcd.etcdctl("put", "--", P + key, value)
            elif kind == "bad":
                key, value = rng.choice(BAD)
                etcd.etcdctl("put", "--", P + key, value)
            elif kind == "del":
                key, value = rng.choice(GOOD + BAD)[0], ""
                etcd.etcdctl("del", P + key)
            elif kind == "file":
                key = rng.choice(["a", "b"])
                value = rng.choice(FILES_OK + FILES_BAD)
                save(tmp_path / f"{key}.yaml", value, rng.random() < 0.5)
            else:
                key = value = ""
                watched.close()
                if kind == "kill":
                    daemon.kill()
                else:
                    daemon.stop()
                daemon.start()
                watched.connect(f"{kind} after {done[-3:]}")
            done.append(f"{kind} {key}={value!r}")
            watched.drain(f"{done[-3:]}")
            assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log()[-2000:]
            assert healthz(daemon) == 200, daemon.log()[-2000:]
        assert not watched.problems, watched.problems

        # Everything valid again: what the client runs is what ``get`` computes.
        a.write_text(FILES_OK[0])
        b.write_text("sampling:\n  temperature: 0.5\n")
        for key, _ in BAD:
            etcd.etcdctl("del", P + key)
        etcd.etcdctl("put", P + "train/momentum", "0.25")
        args = ["--app", "t", "--etcd-endpoints", etcd.endpoint, "--config", str(a)]
        got = run_cli("get", "--json", *args, "--config", str(b), env=ENV)
        assert got.returncode == 0, got.stderr
        want = json.loads(got.stdout)
        assert want["train.momentum"] == 0.25 and want["sampling.top_p"] == 0.9
        deadline_checks = 0
        while True:
            watched.drain("the repair")
            flat = {
                f"{section}.{key}": value
                for section, keys in watched.values.items()
                for key, value in keys.items()
            }
            if flat == want or deadline_checks == 20:
                break
            deadline_checks += 1
        assert flat == want, (done, daemon.log()[-3000:])
        assert healthz(daemon) == 200, daemon.log()[-2000:]
        assert not watched.problems, watched.problems
    watched.close()
