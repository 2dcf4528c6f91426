"""A lone change's work after its push, held as the engine's tail (``hold_tail``).

The daemon's watch thread pushes a lone change and runs the rest of its work (the etcd
layer and the snapshot built, the state saved, ``change_accepted``) a little later,
once the clients had it (``Engine.finish``). Held or not, the change must end the same:
the same pushes at once, and after ``finish`` (or whatever call comes next, which runs
the tail first) the same snapshot, layers, events and saved state.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from hotknob.daemon.published import Published
from tests.test_engine_short_path import (
    Changes,
    P,
    as_events,
    change,
    make,
    saved,
    seen,
    side_by_side,
)


@settings(
    max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    changes=st.lists(change, min_size=1, max_size=10),
    finish_now=st.lists(st.booleans(), min_size=10, max_size=10),
)
def test_a_held_tail_ends_as_if_it_ran_at_once(
    tmp_path_factory: pytest.TempPathFactory, changes: Changes, finish_now: list[bool]
) -> None:
    """Each change held; the tail run at once or left for the next change to run first."""
    (held, held_out), (plain, plain_out) = side_by_side(tmp_path_factory.mktemp("e"))
    for (revision, puts, gone), now in zip(as_events(changes), finish_now, strict=False):
        held.on_etcd_change(revision, puts, gone, hold_tail=True)
        plain.on_etcd_change(revision, puts, gone)
        assert held_out == plain_out  # the push is never held
        assert held.current == plain.current and held.version == plain.version
        if now:
            held.finish()
            assert not held.holds_tail
            assert seen(held, held_out) == seen(plain, plain_out)
    held.finish()
    assert seen(held, held_out) == seen(plain, plain_out)
    assert saved(held) == saved(plain)


def test_what_a_held_lone_put_leaves_for_later(tmp_path: Path) -> None:
    published: list[Published] = []
    engine = make(tmp_path, {}, published)
    engine.start({}, 1)
    assert engine.snapshot is not None
    before = engine.snapshot
    with capture_logs() as logs:
        engine.on_etcd_change(2, {P + "steps": b"7"}, [], hold_tail=True)
        assert published[-1].version == 2 and published[-1].flat["steps"] == 7  # pushed
        assert engine.holds_tail
        assert engine.snapshot is before and "steps" not in engine.layers["etcd"].values
        assert not [e for e in logs if e["event"] == "change_accepted"]
        assert not engine.events  # type: ignore[attr-defined]
        engine.finish()
    assert not engine.holds_tail
    assert engine.snapshot is not before and engine.snapshot.flat["steps"] == 7
    assert engine.layers["etcd"].values["steps"] == 7
    [accepted] = [e for e in logs if e["event"] == "change_accepted"]
    assert accepted["version"] == 2 and accepted["new"] == {"steps": 7}
    assert [e["event"] for e in engine.events] == ["change_accepted"]  # type: ignore[attr-defined]
    assert saved(engine)[:3] == (2, 2, {**published[-1].values})


def test_a_change_that_takes_the_general_path_holds_nothing(tmp_path: Path) -> None:
    published: list[Published] = []
    engine = make(tmp_path, {}, published)
    engine.start({}, 1)
    engine.on_etcd_change(2, {P + "steps": b"0"}, [], hold_tail=True)  # invalid: rejected
    assert not engine.holds_tail and [p.version for p in published] == [1]
    engine.on_etcd_change(3, {P + "steps": b"4"}, [], hold_tail=True)
    engine.on_etcd_change(4, {}, [P + "steps"], hold_tail=True)  # a delete: the general path
    assert not engine.holds_tail
    assert engine.snapshot is not None and engine.snapshot.flat["steps"] == 1


@pytest.mark.parametrize("then", ["close", "files", "group", "full read"])
def test_every_other_call_runs_the_held_tail_first(tmp_path: Path, then: str) -> None:
    published: list[Published] = []
    engine = make(tmp_path, {}, published)
    engine.start({}, 1)
    engine.on_etcd_change(2, {P + "steps": b"7"}, [], hold_tail=True)
    assert engine.holds_tail
    if then == "close":
        engine.close()
    elif then == "files":
        engine.on_files([])
    elif then == "group":
        engine.on_etcd_changes([(3, {P + "opts/mode": b'"slow"'}, frozenset())])
    else:
        engine.on_etcd_snapshot({P + "steps": b"7"}, 3)
    assert not engine.holds_tail
    assert engine.layers["etcd"].values["steps"] == 7
    events = engine.events  # type: ignore[attr-defined]
    assert events[0]["event"] == "change_accepted" and events[0]["version"] == 2
    if then == "close":
        assert engine.store is not None
        state = engine.store.load()
        assert state is not None and state.version == 2 and state.clean


def test_a_push_that_raises_holds_nothing(tmp_path: Path) -> None:
    """As without holding: the layer and the snapshot are built even if the push raised."""

    def broken(published: Published) -> None:
        raise RuntimeError("socket gone")

    engine = make(tmp_path, {}, [])
    engine.start({}, 1)
    engine._publish = broken  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="socket gone"):
        engine.on_etcd_change(2, {P + "steps": b"7"}, [], hold_tail=True)
    assert not engine.holds_tail
    assert engine.snapshot is not None and engine.snapshot.flat["steps"] == 7
    assert engine.version == 2


def test_the_tail_is_held_from_the_push_until_its_last_step_has_run(tmp_path: Path) -> None:
    """The loop reads ``holds_tail`` without the lock to know whether a client's answer
    must wait: it is already true as the change is pushed (a client may answer before
    the engine returns), and stays true while ``finish`` runs, until its last step."""
    during_push: list[bool] = []
    engine = make(tmp_path, {}, [])
    engine.start({}, 1)
    engine._publish = lambda published: during_push.append(engine.holds_tail)  # type: ignore[method-assign]
    engine.on_etcd_change(2, {P + "steps": b"7"}, [], hold_tail=True)
    assert during_push == [True]
    during_tail: list[bool] = []
    engine._announce._broadcast = lambda event: during_tail.append(engine.holds_tail)
    engine.finish()
    assert during_tail == [True] and not engine.holds_tail  # change_accepted's event, last
    engine.on_etcd_change(3, {P + "steps": b"8"}, [], hold_tail=False)
    assert during_push == [True, False] and during_tail == [True, False]
