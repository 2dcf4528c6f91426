"""The fault harness's plumbing: one etcd, one daemon, a config file and a live client.

``HarnessCore`` starts and stops them, makes the edits (etcd puts and transactions,
file rewrites, deliberately invalid values, each write remembered as a ``Write``),
and holds the checks run after every episode: the client's state against a merge
computed here, rising versions, every strict write logged as accepted or rejected,
no ``event_failed`` and the saved state at the client's version. The episodes
themselves (``tests/fault_episodes.py``) are apart so that each fault reads on its own.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from hotknob.config import MLParams, defaults_layer, etcd_layer, files_layer, merge_layers
from hotknob.config.errors import HotknobError
from hotknob.config.files import read_config_file
from hotknob.config.keys import flatten
from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.model_runtime import LiveConfig
from hotknob.model_runtime.received import thaw
from tests.daemon_proc import DaemonProcess
from tests.etcd_server import EtcdServer
from tests.live_trainer import Trainer, wait_for

APP = "faults"
CONFIG_PREFIX = f"/hotknob/{APP}/config/"
STATUS_PREFIX = f"/hotknob/{APP}/status/"
STATUS_TTL = 2


def _saved_version(state_file: Path) -> int | None:
    try:
        return int(json.loads(state_file.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class Write:
    revision: int
    valid: bool
    strict: bool  # the daemon watched continuously: this revision must be in its log


@dataclass
class Tally:
    episodes: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    writes: int = 0
    invalid_writes: int = 0
    file_edits: int = 0
    strict_checked: int = 0
    lost: int = 0
    invalid_delivered: int = 0
    daemon_crashes: int = 0
    restarts: int = 0
    seconds: float = 0.0


class HarnessCore:
    """The etcd, daemon, config file and live client a ``FaultHarness`` runs its episodes
    against: starting and stopping them, the edits, and the checks after each episode."""

    def __init__(self, workdir: Path, seed: int):
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.seed = seed
        self.etcd = EtcdServer("faults")
        self.config = workdir / "conf" / "params.yaml"
        self.daemon: DaemonProcess | None = None
        self.live: LiveConfig | None = None
        self.trainer: Trainer | None = None
        self.store: EtcdStore | None = None
        self.counter = 0
        self.top_k = 0
        self.writes: list[Write] = []
        self.tally = Tally()
        self._incarnation = 0
        self._log_offsets: dict[Path, int] = {}
        self._accepted: set[int] = set()
        self._rejected: set[int] = set()
        self._event_failed = 0

    # --- setup and teardown ---------------------------------------------------------------------

    def start(self) -> Self:
        self.etcd.start()
        self.store = EtcdStore(EtcdOptions(endpoints=(self.etcd.endpoint,), timeout=2.0))
        self.config.parent.mkdir(parents=True)
        self._write_file(self.top_k)
        self.daemon = DaemonProcess(
            self.workdir,
            app=APP,
            endpoints=self.etcd.endpoint,
            configs=[self.config],
            extra=[
                "--etcd-timeout", "1",
                "--status-ttl", str(STATUS_TTL),
                "--node", "n1",
                "--etcd-start-timeout", "5",
            ],
        )  # fmt: skip
        self._start_daemon()
        self.live = LiveConfig.connect(socket=self.daemon.socket_path, timeout=15, client="trainer")
        self.trainer = Trainer(self.live).start()
        return self

    def close(self) -> None:
        if self.trainer is not None:
            self.trainer.stop()
        if self.live is not None:
            self.live.close()
        if self.daemon is not None:
            if self.daemon.proc is not None and self.daemon.proc.poll() is None:
                os.kill(self.daemon.proc.pid, signal.SIGCONT)
            self.daemon.stop()
        if self.store is not None:
            self.store.close()
        self.etcd.resume()
        self.etcd.close()

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start_daemon(self) -> None:
        assert self.daemon is not None
        self._incarnation += 1
        # A fresh log per incarnation: ``start`` waits for *this* run's daemon_ready.
        self.daemon.log_path = self.workdir / f"daemon-{self._incarnation}.log"
        self.daemon.start(timeout=30)

    # --- edits ----------------------------------------------------------------------------------

    def _write_file(self, top_k: int) -> None:
        tmp = self.config.with_name(".params.yaml.tmp")
        tmp.write_text(f"sampling:\n  top_k: {top_k}\n  min_p: 0.0{top_k % 10}\n")
        os.replace(tmp, self.config)

    def edit_file(self) -> None:
        self.top_k += 1
        if self.rng.random() < 0.3:
            self.config.write_text("sampling:\n  top_k: [")  # half-written: changes nothing
            time.sleep(self.rng.uniform(0.0, 0.1))
        self._write_file(self.top_k)
        self.tally.file_edits += 1

    def _commit(self, puts: dict[str, str], deletes: tuple[str, ...] = ()) -> int:
        assert self.store is not None
        deadline = time.monotonic() + 15
        while True:
            try:
                return self.store.commit(puts, deletes)
            except HotknobError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def put_valid(self, strict: bool) -> None:
        """One transaction that always moves ``train.warmup_steps``, so it is always a change."""
        self.counter += 1
        puts = {CONFIG_PREFIX + "train/warmup_steps": str(self.counter)}
        if self.rng.random() < 0.5:
            puts[CONFIG_PREFIX + "train/lr"] = repr(round(self.rng.uniform(1e-5, 0.1), 6))
        if self.rng.random() < 0.3:
            puts[CONFIG_PREFIX + "sampling/temperature"] = repr(round(self.rng.uniform(0, 2), 3))
        deletes: tuple[str, ...] = ()
        if self.rng.random() < 0.15:
            deletes = (CONFIG_PREFIX + "sampling/temperature",)
            puts.pop(CONFIG_PREFIX + "sampling/temperature", None)
        self.writes.append(Write(self._commit(puts, deletes), True, strict))
        self.tally.writes += 1

    def put_invalid(self, strict: bool) -> None:
        """A rejected write, immediately followed by the fix (etcd ends valid)."""
        key, raw = self.rng.choice(
            [
                ("train/lr", "-1"),
                ("train/lr", "NaN"),
                ("train/momentum", "1.5"),
                ("sampling/top_p", "0"),
                ("train/warmup_steps", '"many"'),
                ("train/nonsense", "1"),
            ]
        )
        self.writes.append(Write(self._commit({CONFIG_PREFIX + key: raw}), False, strict))
        self.tally.invalid_writes += 1
        if key == "train/nonsense":
            self._commit({}, (CONFIG_PREFIX + key,))
        self.put_valid(strict)
        if key != "train/warmup_steps":
            fix = {"train/lr": "0.001", "train/momentum": "0.9", "sampling/top_p": "1.0"}
            if key in fix:
                self.counter += 1
                puts = {
                    CONFIG_PREFIX + key: fix[key],
                    CONFIG_PREFIX + "train/warmup_steps": str(self.counter),
                }
                self.writes.append(Write(self._commit(puts), True, strict))
                self.tally.writes += 1

    def edits(self, strict: bool, *, etcd: bool = True) -> None:
        for _ in range(self.rng.randint(1, 4)):
            roll = self.rng.random()
            if not etcd or roll < 0.25:
                self.edit_file()
            elif roll < 0.4:
                self.put_invalid(strict)
            else:
                self.put_valid(strict)

    # --- checks ---------------------------------------------------------------------------------

    def expected(self) -> dict[str, Any]:
        assert self.store is not None
        kvs, _ = self.store.read_prefix(CONFIG_PREFIX)
        layers = [
            defaults_layer(MLParams),
            files_layer(MLParams, [(self.config, read_config_file(self.config))]),
            etcd_layer(APP, kvs),
        ]
        return dict(merge_layers(MLParams, layers).flat)

    def applied_flat(self) -> dict[str, Any]:
        assert self.live is not None
        return flatten(thaw(self.live.values))

    def _converge(self) -> None:
        expected = self.expected()
        try:
            wait_for("the client to reach etcd + files", lambda: self.applied_flat() == expected)
        except AssertionError:
            diff = {
                k: (v, expected.get(k))
                for k, v in self.applied_flat().items()
                if expected.get(k) != v
            }
            raise AssertionError(f"client state differs (client, expected): {diff}") from None

    def check(self, writes: list[Write]) -> None:
        assert self.daemon is not None and self.daemon.proc is not None
        assert self.trainer is not None and self.live is not None
        self._converge()
        if self.daemon.proc.poll() is not None:
            self.tally.daemon_crashes += 1
            raise AssertionError(f"daemon exited with {self.daemon.proc.returncode}")
        versions = self.trainer.versions()
        bad = [(a, b) for a, b in itertools.pairwise(versions) if b <= a]
        assert not bad, f"versions not strictly increasing: {bad}"
        self.tally.invalid_delivered = len(self.trainer.invalid)
        assert not self.trainer.invalid, self.trainer.invalid
        assert not self.trainer.errors, self.trainer.errors
        self._await_reports(writes)
        missing = [w.revision for w in writes if w.strict and w.valid]
        missing = [r for r in missing if r not in self._accepted]
        unrejected = [w.revision for w in writes if w.strict and not w.valid]
        unrejected = [r for r in unrejected if r not in self._rejected]
        self.tally.lost += len(missing)
        self.tally.strict_checked += sum(1 for w in writes if w.strict)
        assert not missing, f"accepted writes at revisions {missing} never logged as accepted"
        assert not unrejected, f"invalid writes at revisions {unrejected} not logged as rejected"
        assert self._event_failed == 0, "the daemon logged event_failed"
        # The snapshot is saved in the background, shortly after the push (the version is
        # reserved on disk before it): wait for it rather than expect it already there.
        state_file = self.daemon.state_dir / f"{APP}.state.json"
        try:
            wait_for(
                "the saved state to reach the client's version",
                lambda: _saved_version(state_file) == self.live.version,
                timeout=5.0,
            )
        except AssertionError:
            raise AssertionError((_saved_version(state_file), self.live.version)) from None

    def _daemon_log(self) -> str:
        return self.daemon.log() if self.daemon is not None else ""

    def _events(self, name: str) -> list[dict[str, Any]]:
        return self.daemon.events(name) if self.daemon is not None else []

    def _reported(self, writes: list[Write]) -> bool:
        self._scan_logs()
        return all(
            w.revision in (self._accepted if w.valid else self._rejected)
            for w in writes
            if w.strict
        )

    def _await_reports(self, writes: list[Write], timeout: float = 5.0) -> None:
        """Wait, at most ``timeout``, for the daemon's log lines of the strict ``writes``.

        A change is pushed first and logged just after (``docs/performance-history.md``,
        twenty-first round): a client
        can have applied it a moment before its line is written. What is still missing
        after the wait, ``check`` reports."""
        with contextlib.suppress(AssertionError):
            wait_for("the daemon's log lines", lambda: self._reported(writes), timeout)

    def _scan_logs(self) -> None:
        """Read new lines of every daemon log: accepted/rejected revisions, handler failures."""
        for path in sorted(self.workdir.glob("daemon-*.log")):
            offset = self._log_offsets.get(path, 0)
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
            end = data.rfind(b"\n") + 1
            self._log_offsets[path] = offset + end
            for line in data[:end].splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                name = event.get("event")
                if name == "change_accepted" and event.get("layer") == "etcd":
                    self._accepted.add(int(event["revision"]))
                elif name == "change_rejected" and event.get("layer") == "etcd":
                    self._rejected.add(int(event["revision"]))
                elif name == "event_failed":
                    self._event_failed += 1
