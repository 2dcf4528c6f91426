"""Randomised, seeded fault episodes against one real etcd, one real daemon and a live client.

A ``FaultHarness`` owns an etcd server, a ``hotknob run`` child, a config file and
a ``LiveConfig`` client whose training loop (a thread calling ``apply`` every
couple of milliseconds) records every state it applies. Each episode makes some
edits (etcd puts and transactions, file rewrites, deliberately invalid values),
injects one fault, makes more edits, heals the fault, and then checks:

- the client's applied state equals the merge of the schema defaults, the file
  and what etcd holds now (computed here, independently of the daemon);
- every version the client applied is strictly greater than the one before;
- every state the client applied validates against ``MLParams``;
- every valid etcd write the daemon could watch continuously appears in its
  log as ``change_accepted`` at that revision, and every invalid one as
  ``change_rejected`` (writes made while the daemon was down or frozen across
  a compaction are only required to be in the final state);
- the daemon process is alive and has logged no ``event_failed``;
- after the state dir is healthy again, the saved state has the client's version.

The etcd and daemon are reused across episodes; only the faults that kill one
restart it. Everything is bounded by deadlines, and ``close`` stops all of it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hotknob.config import MLParams, defaults_layer, etcd_layer, files_layer, merge_layers
from hotknob.config.errors import HotknobError
from hotknob.config.files import read_config_file
from hotknob.config.keys import flatten
from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore
from hotknob.model_runtime import LiveConfig
from hotknob.model_runtime.received import thaw
from tests.daemon_proc import DaemonProcess
from tests.etcd_server import EtcdServer

APP = "faults"
CONFIG_PREFIX = f"/hotknob/{APP}/config/"
STATUS_PREFIX = f"/hotknob/{APP}/status/"
STATUS_TTL = 2
CONVERGE_S = 20.0

KINDS = (
    "etcd_kill",
    "etcd_pause",
    "compaction_while_disconnected",
    "daemon_kill",
    "client_kill",
    "state_dir_broken",
)

_VICTIM = """
import sys, time
from hotknob.model_runtime import LiveConfig
live = LiveConfig.connect(socket=sys.argv[1], timeout=10, client=sys.argv[2])
print("ready", flush=True)
while True:
    live.apply(0)
    time.sleep(0.05)
"""


def schedule(seed: int, count: int) -> list[str]:
    """``count`` episode kinds: every kind once (shuffled) first, then a seeded random mix."""
    rng = random.Random(seed)
    first = list(KINDS)
    rng.shuffle(first)
    return (first + [rng.choice(KINDS) for _ in range(max(0, count - len(KINDS)))])[:count]


def wait_for(what: str, done: Callable[[], Any], timeout: float = CONVERGE_S) -> Any:
    """``done()``'s first true value, asked every 10 ms; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not (value := done()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.01)
    return value


def _block_with_a_file(state_dir: Path, aside: Path) -> None:
    """Move ``state_dir`` to ``aside`` and put a regular file at its path. A save the daemon
    had in flight may make the folder again between the two: what it wrote is newer, so it
    joins ``aside`` and the file is tried again."""
    state_dir.rename(aside)
    for _ in range(100):
        try:
            state_dir.write_text("a file in the way\n")
            return
        except IsADirectoryError:
            with contextlib.suppress(OSError):  # the save may still be writing: next turn
                for path in state_dir.iterdir():
                    os.replace(path, aside / path.name)
                state_dir.rmdir()
    raise AssertionError(f"{state_dir} keeps coming back as a folder")


def _saved_version(state_file: Path) -> int | None:
    try:
        return int(json.loads(state_file.read_text())["version"])
    except (OSError, ValueError, KeyError):
        return None


class Trainer:
    """A training loop in a thread: ``apply`` every 2 ms, recording what each apply brought."""

    def __init__(self, live: LiveConfig):
        self.live = live
        self.applied: list[tuple[int, dict[str, Any]]] = []
        self.invalid: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fault-trainer", daemon=True)
        self._lock = threading.Lock()

    def start(self) -> Trainer:
        self._thread.start()
        return self

    def _run(self) -> None:
        step = 0
        while not self._stop.is_set():
            step += 1
            try:
                if self.live.apply(step):
                    values = thaw(self.live.values)
                    try:
                        MLParams.model_validate(values)
                    except ValueError as exc:
                        self.invalid.append(f"version {self.live.version}: {exc}")
                    with self._lock:
                        self.applied.append((self.live.version, values))
            except Exception as exc:  # recorded and asserted on, never swallowed
                self.errors.append(repr(exc))
            self._stop.wait(0.002)

    def versions(self) -> list[int]:
        with self._lock:
            return [v for v, _ in self.applied]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


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


class FaultHarness:
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

    def start(self) -> FaultHarness:
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

    def __enter__(self) -> FaultHarness:
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

    # --- episodes -------------------------------------------------------------------------------

    def run(self, index: int, kind: str) -> None:
        started = time.monotonic()
        first_write = len(self.writes)
        try:
            self.edits(strict=True)
            self._converge()  # what came before the fault is in force before it strikes
            # ...and reported: the daemon logs a change just after pushing it, and a
            # SIGKILL in between would lose a line that this test then misses.
            self._await_reports(self.writes[first_write:])
            getattr(self, f"_episode_{kind}")()
            self._converge()  # recovered: a resync has folded in what the fault hid
            self.edits(strict=True)
            self.check(self.writes[first_write:])
        except AssertionError as exc:
            raise AssertionError(
                f"episode {index} ({kind}), seed {self.seed}: {exc}\n"
                f"--- daemon log tail ---\n{self._daemon_log()[-3000:]}"
            ) from exc
        self.tally.episodes += 1
        self.tally.by_kind[kind] = self.tally.by_kind.get(kind, 0) + 1
        self.tally.seconds += time.monotonic() - started

    def _episode_etcd_kill(self) -> None:
        self.etcd.kill()
        if self.rng.random() < 0.5:
            self.edits(strict=True, etcd=False)  # files stay live while etcd is gone
        time.sleep(self.rng.uniform(0.0, 1.0))
        self.etcd.restart()

    def _episode_etcd_pause(self) -> None:
        self.etcd.pause()
        try:
            if self.rng.random() < 0.5:
                self.edits(strict=True, etcd=False)
            # Past ~4 s the watcher's probe calls the server hung and reconnects.
            time.sleep(self.rng.choice([0.2, 1.0, 2.0, 4.5]))
        finally:
            self.etcd.resume()

    def _episode_compaction_while_disconnected(self) -> None:
        daemon = self.daemon
        assert daemon is not None
        daemon.signal(signal.SIGSTOP)  # it cannot see what happens next
        try:
            self.etcd.kill()  # its stream breaks: it will resume from its last revision + 1
            self.etcd.restart()
            self.put_valid(strict=False)
            self.edits(strict=False)
            if self.rng.random() < 0.5:
                self.writes.append(
                    Write(self._commit({}, (CONFIG_PREFIX + "train/lr",)), True, False)
                )
            assert self.store is not None
            self.store.compact(self.store.current_revision())  # ...now compacted away
        finally:
            daemon.signal(signal.SIGCONT)

    def _episode_daemon_kill(self) -> None:
        assert self.daemon is not None
        self.daemon.kill()
        self.tally.restarts += 1
        self.put_valid(strict=False)
        self.edits(strict=False)  # written while no daemon watches
        self._start_daemon()

    def _episode_client_kill(self) -> None:
        assert self.daemon is not None and self.store is not None
        name = f"victim-{self.tally.episodes}"
        victim = subprocess.Popen(
            [sys.executable, "-c", _VICTIM, str(self.daemon.socket_path), name],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            assert victim.stdout is not None
            first = victim.stdout.readline()
            assert first.strip() == b"ready", first + victim.stdout.read(4000)
            key = f"{STATUS_PREFIX}n1/{name}"
            store = self.store
            wait_for(f"status entry {key}", lambda: key in store.read_prefix(STATUS_PREFIX)[0])
            self.edits(strict=True)
            victim.send_signal(signal.SIGKILL)
            victim.wait(10)
            gone_by = 2 * STATUS_TTL + 2.0
            wait_for(
                f"{key} to vanish", lambda: key not in store.read_prefix(STATUS_PREFIX)[0], gone_by
            )
        finally:
            if victim.poll() is None:
                victim.kill()
            victim.wait(10)
            if victim.stdout is not None:
                victim.stdout.close()

    def _episode_state_dir_broken(self) -> None:
        """The state dir's path becomes a regular file (ENOTDIR/EEXIST even for root)."""
        assert self.daemon is not None
        state_dir = self.daemon.state_dir
        aside = state_dir.with_name("state.aside")
        failures_before = len(self._events("state_write_failed"))
        _block_with_a_file(state_dir, aside)
        try:
            self.put_valid(strict=True)
            self.edits(strict=True)
            wait_for(
                "state_write_failed",
                lambda: len(self._events("state_write_failed")) > failures_before,
            )
            self._converge()
        finally:
            state_dir.unlink()
            aside.rename(state_dir)
        self.put_valid(strict=True)  # the next accepted change is saved again

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
