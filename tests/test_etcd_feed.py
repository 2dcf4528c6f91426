"""The hand-over of etcd changes from the watch thread to the loop, on a real event loop.

A pure component (no etcd here; the daemon tests drive it from a real watch): order,
group commits, full reads as boundaries, nothing lost when a handler fails, one
wake-up of the loop per drain, drains spaced under a burst, and a lone change handled
on the watch thread itself when an inline handler takes it.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from hotknob.daemon.etcd_feed import EtcdFeed
from hotknob.daemon.etcd_types import EtcdChange


def change(revision: int) -> EtcdChange:
    return EtcdChange(revision, {"/hotknob/t/config/train/lr": str(revision).encode()}, ())


class Recorder:
    """The feed on a loop running in a thread of its own, with what it handed over."""

    def __init__(self, **options: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.events: list[tuple[str, Any, float]] = []
        self.posts = 0
        self.lock = threading.Lock()
        self.take: Callable[[Iterable[EtcdChange]], list[int]] = lambda run: [
            c.revision for c in run
        ]
        self.feed = EtcdFeed(self.post, self.on_changes, self.on_snapshot, **options)

    def post(self, fn: Callable[[], None]) -> None:
        with self.lock:
            self.posts += 1
        self.loop.call_soon_threadsafe(fn)

    def on_changes(self, changes: Iterable[EtcdChange]) -> None:
        started = time.monotonic()
        self.events.append(("changes", self.take(changes), started))

    def on_snapshot(self, kvs: Mapping[str, bytes], revision: int) -> None:
        self.events.append(("snapshot", revision, time.monotonic()))

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, self.events
            time.sleep(0.005)

    def delivered(self) -> list[int]:
        return [r for kind, revs, _ in self.events if kind == "changes" for r in revs]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def test_a_lone_change_is_handed_over_at_once_and_the_next_waits_for_the_spacing() -> None:
    rec = Recorder(drain_every=0.3)
    try:
        put_at = time.monotonic()
        rec.feed.put(change(1))
        rec.wait_for(lambda: len(rec.events) == 1)
        assert rec.events[0][1] == [1]
        assert rec.events[0][2] - put_at < 0.25  # not held back by the spacing
        rec.feed.put(change(2))
        rec.wait_for(lambda: len(rec.events) == 2)
        assert rec.events[1][1] == [2]
        assert rec.events[1][2] - rec.events[0][2] >= 0.3 * 0.95
    finally:
        rec.close()


def test_changes_queued_together_are_one_group_and_a_full_read_ends_it() -> None:
    rec = Recorder(group_commit=10.0)
    block = threading.Event()
    rec.loop.call_soon_threadsafe(block.wait)  # the loop is busy while the watch thread puts
    try:
        for revision in range(1, 51):
            rec.feed.put(change(revision))
        rec.feed.put(({"/hotknob/t/config/train/lr": b"9"}, 51))
        for revision in range(52, 101):
            rec.feed.put(change(revision))
        block.set()
        rec.wait_for(lambda: len(rec.delivered()) == 99)
        kinds = [(kind, revs if kind == "snapshot" else len(revs)) for kind, revs, _ in rec.events]
        assert kinds == [("changes", 50), ("snapshot", 51), ("changes", 49)]
        assert rec.delivered() == [*range(1, 51), *range(52, 101)]
        assert rec.posts == 1  # one wake-up of the loop for the whole burst
    finally:
        rec.close()


def test_changes_a_failing_handler_did_not_take_come_next_in_order() -> None:
    failures: list[str] = []

    def guard(fn: Callable[..., None], args: tuple[object, ...]) -> None:
        try:
            fn(*args)
        except RuntimeError as exc:
            failures.append(str(exc))

    rec = Recorder(group_commit=10.0, guard=guard)
    calls = [0]

    def take(run: Iterable[EtcdChange]) -> list[int]:
        calls[0] += 1
        taken = []
        for c in run:
            taken.append(c.revision)
            if calls[0] == 1 and len(taken) == 3:
                rec.events.append(("changes", taken, time.monotonic()))
                raise RuntimeError("engine failed at revision 3")
        return taken

    rec.take = take
    block = threading.Event()
    rec.loop.call_soon_threadsafe(block.wait)
    try:
        for revision in range(1, 11):
            rec.feed.put(change(revision))
        block.set()
        rec.wait_for(lambda: len(rec.delivered()) == 10)
        assert failures == ["engine failed at revision 3"]
        assert [revs for _, revs, _ in rec.events] == [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    finally:
        rec.close()


def test_a_burst_from_another_thread_arrives_whole_in_order_with_drains_spaced() -> None:
    rec = Recorder(drain_every=0.01)
    try:
        total = 3000

        def burst() -> None:
            for revision in range(1, total + 1):
                rec.feed.put(change(revision))
                if revision % 50 == 0:
                    time.sleep(0.001)

        writer = threading.Thread(target=burst)
        writer.start()
        writer.join()
        rec.wait_for(lambda: len(rec.delivered()) == total)
        assert rec.delivered() == list(range(1, total + 1))
        starts = [t for _, _, t in rec.events]
        gaps = [b - a for a, b in itertools.pairwise(starts)]
        assert all(gap >= 0.01 * 0.9 for gap in gaps), min(gaps)
        assert rec.posts <= len(rec.events)  # at most one wake-up per drain
        assert len(rec.events) < total / 5  # grouped, not one drain per revision
    finally:
        rec.close()


class Inline:
    """An inline handler that records the revisions it took and on which thread."""

    def __init__(self, accept: Callable[[EtcdChange], bool] = lambda c: True) -> None:
        self.accept = accept
        self.taken: list[tuple[int, int]] = []

    def __call__(self, c: EtcdChange) -> bool:
        if not self.accept(c):
            return False
        self.taken.append((c.revision, threading.get_ident()))
        return True


def test_a_lone_change_is_taken_on_the_watch_thread_without_waking_the_loop() -> None:
    inline = Inline()
    rec = Recorder(drain_every=0.05, inline=inline)
    try:
        rec.feed.put(change(1))
        assert inline.taken == [(1, threading.get_ident())]  # done before put returned
        time.sleep(0.06)
        rec.feed.put(change(2))
        assert [r for r, _ in inline.taken] == [1, 2]
        assert rec.posts == 0 and rec.events == []
    finally:
        rec.close()


def test_a_change_close_behind_another_goes_through_the_loop_in_order() -> None:
    inline = Inline()
    rec = Recorder(drain_every=0.5, inline=inline)
    try:
        for revision in range(1, 6):  # a burst: only the first comes alone
            rec.feed.put(change(revision))
        rec.wait_for(lambda: len(rec.delivered()) == 4)
        assert [r for r, _ in inline.taken] == [1]
        assert rec.delivered() == [2, 3, 4, 5]
        rec.wait_for(lambda: not rec.feed._posted)
        time.sleep(0.55)
        rec.feed.put(change(6))  # alone again
        assert [r for r, _ in inline.taken] == [1, 6]
    finally:
        rec.close()


def test_a_declined_change_is_queued_first_and_a_full_read_is_never_taken_inline() -> None:
    inline = Inline(accept=lambda c: c.revision != 1)
    rec = Recorder(drain_every=0.05, inline=inline)
    block = threading.Event()
    rec.loop.call_soon_threadsafe(block.wait)  # the loop is busy: nothing drains yet
    try:
        rec.feed.put(change(1))  # declined: queued
        rec.feed.put(change(2))  # a drain is due: queued behind it, not taken inline
        rec.feed.put(({"/hotknob/t/config/train/lr": b"9"}, 3))
        block.set()
        rec.wait_for(lambda: len(rec.events) == 2)
        assert inline.taken == []
        assert [(kind, revs) for kind, revs, _ in rec.events] == [
            ("changes", [1, 2]),
            ("snapshot", 3),
        ]
        assert rec.posts == 1
    finally:
        rec.close()


def test_a_change_whose_inline_handler_raises_is_not_handed_over_again() -> None:
    def fail(c: EtcdChange) -> bool:
        raise RuntimeError("engine failed")

    rec = Recorder(drain_every=0.01, inline=fail)
    try:
        try:
            rec.feed.put(change(1))
        except RuntimeError as exc:
            assert str(exc) == "engine failed"
        else:
            raise AssertionError("the handler's error reaches the watch thread's own guard")
        time.sleep(0.05)
        assert rec.events == [] and rec.posts == 0
        assert not rec.feed._posted  # the feed is free for the next change
    finally:
        rec.close()


def test_changes_queued_while_an_inline_handler_raises_are_still_drained() -> None:
    holder: dict[str, Recorder] = {}

    def fail_after_another_arrives(c: EtcdChange) -> bool:
        # Another change comes from another thread while this one is being handled.
        other = threading.Thread(target=holder["rec"].feed.put, args=(change(2),))
        other.start()
        other.join()
        raise RuntimeError("engine failed")

    rec = holder["rec"] = Recorder(drain_every=0.01, inline=fail_after_another_arrives)
    try:
        try:
            rec.feed.put(change(1))
        except RuntimeError:
            pass
        rec.wait_for(lambda: rec.delivered() == [2])
        assert rec.posts == 1
    finally:
        rec.close()
