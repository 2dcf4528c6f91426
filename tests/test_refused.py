"""``RefusedKeys``: the etcd values a daemon refused and still runs without, which its
processes' status entries carry as ``rejected`` until those keys are edited again, and
those it refused and cleared since, which they carry as ``rejected_before``."""

from __future__ import annotations

from typing import Any

from hotknob.daemon.refused import CLEARED_REASON_CHARS, KEEP_CLEARED, REASON_CHARS, RefusedKeys

PATH = "/hotknob/app/config/"


def test_a_refusal_lasts_until_a_later_revision_taken_edits_its_keys() -> None:
    refused = RefusedKeys("app")
    assert not refused and refused.newest is None
    assert refused.refused(10, "too hot", ["sampling.temperature"])
    assert refused.newest == {"revision": 10, "reason": "too hot", "keys": ["sampling.temperature"]}
    # Later revisions of other keys, taken: the refusal stays (etcd still holds 1.5).
    assert not refused.taken(11, [PATH + "train/lr"])
    assert not refused.taken(12, [PATH + "sampling/top_p", "/elsewhere/sampling/temperature"])
    assert refused.newest is not None and refused.newest["revision"] == 10
    # A later refusal: the newest is shown, and every key still refused is listed.
    assert refused.refused(13, "too many", ["sampling.top_k", "train.lr"])
    assert refused.newest == {
        "revision": 13,
        "reason": "too many",
        "keys": ["sampling.temperature", "sampling.top_k", "train.lr"],
    }
    # Revision 13 itself taken is no clearing of its own refusal (a group commit reports
    # every revision it had).
    assert not refused.taken(13, [PATH + "sampling/top_k"])
    # Taken edits of the keys clear them, a delete as well as a put; the newest left shows.
    assert refused.taken(14, [PATH + "sampling/top_k", PATH + "train/lr"])
    assert refused.newest == {"revision": 10, "reason": "too hot", "keys": ["sampling.temperature"]}
    assert refused.taken(15, [PATH + "sampling/temperature"])
    assert refused.newest is None
    assert set(refused.cleared) == {"sampling.temperature", "sampling.top_k", "train.lr"}


def test_a_full_read_says_again_what_it_refuses() -> None:
    refused = RefusedKeys("app")
    refused.refused(10, "too hot", ["sampling.temperature"])
    assert refused.clear() and refused.newest is None
    assert not refused.clear()
    refused.refused(20, "too hot", ["sampling.temperature"])
    assert refused.newest is not None and refused.newest["revision"] == 20


def test_a_long_reason_is_cut() -> None:
    refused = RefusedKeys("app")
    refused.refused(3, "x" * 2000, ["train.lr"])
    assert refused.newest is not None
    reason = refused.newest["reason"]
    assert len(reason) == REASON_CHARS and reason.endswith("...")


TEMPERATURE = PATH + "sampling/temperature"


def test_a_cleared_refusal_is_kept_with_the_first_and_newest_revision_refused() -> None:
    """Refused at 10, again at 11, cleared at 12: a wait on 10 must still say refused."""
    refused = RefusedKeys("app")
    assert refused.cleared == {}
    refused.refused(10, "too hot", ["sampling.temperature"])
    assert refused.refused(11, "still too hot", ["sampling.temperature"])
    assert refused.cleared == {}  # in force: ``newest`` says it
    assert not refused.taken(12, [PATH + "train/lr"])  # another key: nothing cleared
    assert refused.taken(12, [TEMPERATURE])
    assert refused.newest is None and refused  # something is held: what was cleared
    run = {"since": 10, "revision": 11, "reason": "still too hot"}
    assert refused.cleared == {"sampling.temperature": run}
    # Taken revisions after that change nothing.
    before = refused.cleared
    assert not refused.taken(13, [TEMPERATURE, PATH + "train/lr"])
    assert refused.cleared is before
    # Refused anew: a new run, and the cleared one stays until that one is cleared too.
    assert refused.refused(20, "too cold", ["sampling.temperature"])
    assert refused.cleared == {"sampling.temperature": run}
    assert refused.taken(21, [TEMPERATURE])
    assert refused.cleared == {
        "sampling.temperature": {"since": 20, "revision": 20, "reason": "too cold"}
    }


def test_a_change_that_comes_alone_and_is_refused_again_goes_on_with_the_run() -> None:
    """A change that comes alone clears its keys before the engine judges it (``taken``,
    then ``refused`` at the same revision, if the engine rejects it): that is no take."""
    refused = RefusedKeys("app")
    refused.refused(10, "too hot", ["sampling.temperature"])
    refused.taken(11, [TEMPERATURE])
    refused.refused(15, "too hot", ["sampling.temperature"])
    refused.taken(16, [TEMPERATURE])  # the daemon's own order for a lone change 16...
    refused.refused(16, "much too hot", ["sampling.temperature"])  # ...that it rejects
    assert refused.newest is not None and refused.newest["revision"] == 16
    # The run before stays as it was, not replaced by the one that went on.
    assert refused.cleared == {
        "sampling.temperature": {"since": 10, "revision": 10, "reason": "too hot"}
    }
    refused.taken(17, [TEMPERATURE])
    assert refused.newest is None
    assert refused.cleared == {
        "sampling.temperature": {"since": 15, "revision": 16, "reason": "much too hot"}
    }


def test_a_group_s_refusals_come_before_its_takes() -> None:
    """In a group commit every refusal is reported first, then each revision taken: 10
    refused, 11 taken, in one group, clears the refusal of 10."""
    refused = RefusedKeys("app")
    refused.refused(10, "too hot", ["sampling.temperature"])
    assert not refused.taken(10, [TEMPERATURE])
    assert refused.taken(11, [TEMPERATURE])
    assert refused.cleared["sampling.temperature"]["since"] == 10
    assert refused.newest is None


def test_only_the_keys_cleared_most_recently_are_kept() -> None:
    refused = RefusedKeys("app")
    count = KEEP_CLEARED + 4
    for i in range(count):
        refused.refused(100 + 2 * i, "no", [f"train.k{i}"])
        assert refused.taken(101 + 2 * i, [PATH + f"train/k{i}"])
        assert len(refused.cleared) == min(i + 1, KEEP_CLEARED)
    assert set(refused.cleared) == {f"train.k{i}" for i in range(4, count)}
    # A key cleared again is the most recent: it stays, the oldest goes.
    refused.refused(200, "no", ["train.k4"])
    refused.taken(201, [PATH + "train/k4"])
    refused.refused(202, "no", ["train.k0"])
    refused.taken(203, [PATH + "train/k0"])
    assert "train.k4" in refused.cleared and "train.k5" not in refused.cleared
    assert refused.cleared["train.k4"]["since"] == 200 and "train.k0" in refused.cleared


def test_a_full_read_keeps_what_was_cleared_and_clears_what_it_takes() -> None:
    refused = RefusedKeys("app")
    refused.refused(10, "too hot", ["sampling.temperature"])
    refused.taken(11, [TEMPERATURE])
    refused.refused(12, "too many", ["sampling.top_k"])
    refused.refused(13, "too big", ["train.lr"])
    old = refused.cleared["sampling.temperature"]
    # The read at 30: top_k still refused (the run goes on), train.lr taken (cleared).
    assert refused.clear()
    refused.refused(30, "too many", ["sampling.top_k"])
    assert refused.newest == {"revision": 30, "reason": "too many", "keys": ["sampling.top_k"]}
    assert refused.cleared == {
        "sampling.temperature": old,
        "train.lr": {"since": 13, "revision": 13, "reason": "too big"},
    }
    refused.taken(31, [PATH + "sampling/top_k"])
    assert refused.cleared["sampling.top_k"] == {
        "since": 12,
        "revision": 30,
        "reason": "too many",
    }
    # A read that refuses nothing clears every refusal, and keeps them.
    refused.refused(40, "too big", ["train.lr"])
    refused.clear()
    assert refused.newest is None
    assert refused.cleared["train.lr"] == {"since": 40, "revision": 40, "reason": "too big"}
    # A change taken after it: the read is over, and a later refusal is a new run.
    refused.taken(41, [PATH + "train/batch_size"])
    refused.refused(42, "too big", ["train.lr"])
    refused.taken(43, [PATH + "train/lr"])
    assert refused.cleared["train.lr"]["since"] == 42


def test_a_revision_below_a_cleared_run_forgets_it() -> None:
    """Etcd restored from a backup counts on from below: its revisions will name other
    changes, and a cleared run over them would call a taken one refused."""
    refused = RefusedKeys("app")
    refused.refused(20, "too big", ["train.lr"])
    refused.taken(21, [PATH + "train/lr"])
    refused.refused(50, "too hot", ["sampling.temperature"])
    refused.refused(60, "too many", ["sampling.top_k"])
    refused.taken(61, [TEMPERATURE, PATH + "sampling/top_k"])
    assert set(refused.cleared) == {"sampling.temperature", "train.lr", "sampling.top_k"}
    # Restored to revision 40: a read there, then a change at 45 of another key.
    refused.clear()
    assert refused.taken(45, [PATH + "model/width"])  # the entries say it again
    assert set(refused.cleared) == {"train.lr"}
    # The read's refusals, below what was refused before, start anew too.
    refused.refused(70, "too hot", ["sampling.temperature"])
    refused.clear()
    refused.refused(65, "too hot", ["sampling.temperature"])
    assert refused.newest is not None and refused.newest["revision"] == 65
    refused.taken(66, [TEMPERATURE])
    assert refused.cleared["sampling.temperature"]["since"] == 65


def test_a_cleared_refusal_keeps_a_short_reason() -> None:
    refused = RefusedKeys("app")
    refused.refused(3, "x" * 2000, ["train.lr"])
    refused.taken(4, [PATH + "train/lr"])
    reason = refused.cleared["train.lr"]["reason"]
    assert len(reason) == CLEARED_REASON_CHARS and reason.endswith("...")


def test_a_full_read_ends_the_runs_it_does_not_say_again() -> None:
    """A read at 20 that takes the key (etcd holds a value this daemon accepts) clears its
    refusal; a refusal of the key at 22 that comes next, before any revision is taken (a
    group's), is a new run: the read ran what etcd held, so 20 and what it took were not
    refused."""
    refused = RefusedKeys("app")
    refused.refused(10, "too hot", ["sampling.temperature"])
    assert refused.clear(20)
    assert refused.newest is None
    refused.refused(22, "much too hot", ["sampling.temperature"])
    assert refused.cleared == {
        "sampling.temperature": {"since": 10, "revision": 10, "reason": "too hot"}
    }
    refused.taken(23, [TEMPERATURE])
    assert refused.cleared == {
        "sampling.temperature": {"since": 22, "revision": 22, "reason": "much too hot"}
    }
    # The read's own refusals, at its revision, go on with the run in force.
    refused.refused(30, "too big", ["train.lr"])
    refused.clear(40)
    refused.refused(40, "too big", ["train.lr"])
    assert refused.newest is not None and refused.newest["revision"] == 40
    refused.taken(41, [PATH + "train/lr"])
    assert refused.cleared["train.lr"] == {"since": 30, "revision": 40, "reason": "too big"}


def test_a_full_read_below_a_cleared_run_forgets_it_at_once() -> None:
    """Etcd restored from a backup: the read of it is below the runs cleared since, which it
    forgets then, not at the next change. The entries written for what the read changes
    must not carry them to a ``set --wait`` of that next change, whose revision may be
    among them."""
    refused = RefusedKeys("app")
    refused.refused(20, "too big", ["train.lr"])
    refused.taken(21, [PATH + "train/lr"])
    refused.refused(50, "too hot", ["sampling.temperature"])
    refused.refused(60, "too hot", ["sampling.temperature"])
    refused.taken(61, [TEMPERATURE])
    refused.refused(62, "too many", ["sampling.top_k"])  # in force
    assert refused.clear(40)
    assert set(refused.cleared) == {"train.lr"} and refused.newest is None
    assert not refused.taken(45, [PATH + "model/width"])  # nothing more to forget
    # A read above them keeps them.
    assert not refused.clear(70)
    assert set(refused.cleared) == {"train.lr"}


def test_taken_does_no_work_per_cleared_run_while_nothing_is_in_force() -> None:
    """The daemon calls ``taken`` for every change that comes alone once a refusal was
    cleared (``if self.refused:``, on the watch thread before the push): with nothing in
    force, it must not go through the cleared runs each time (16 of them, say)."""
    import sys

    refused = RefusedKeys("app")
    revision = 10
    for i in range(KEEP_CLEARED):
        refused.refused(revision, "no", [f"train.k{i}"])
        refused.taken(revision + 1, [PATH + f"train/k{i}"])
        revision += 2
    assert refused and refused.newest is None and len(refused.cleared) == KEEP_CLEARED
    refused.taken(revision, [PATH + "train/lr"])  # the event that cleared the last is over
    calls: list[str] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            calls.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        changed = refused.taken(revision + 1, [PATH + "train/lr"])
    finally:
        sys.setprofile(None)
    assert not changed
    assert calls == ["taken"], calls  # no helper, no generator over the runs
    assert len(refused.cleared) == KEEP_CLEARED
