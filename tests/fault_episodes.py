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
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.fault_harness import CONFIG_PREFIX, STATUS_PREFIX, STATUS_TTL, HarnessCore, Write
from tests.live_trainer import wait_for

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


class FaultHarness(HarnessCore):
    """A ``HarnessCore`` that runs episodes: edits, one fault, more edits, the checks."""

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
