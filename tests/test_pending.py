"""``PendingStates``: which processes hold a state they have not applied (the ``pending``
field of their status entries), from what each was sent and what it acknowledged."""

from __future__ import annotations

from hotknob.daemon.pending import PendingStates, Sent


def test_a_process_behind_at_two_looks_in_a_row_is_pending_until_it_acknowledges() -> None:
    pending = PendingStates()
    acked = {"fast": 3, "slow": 3, "new": 1}
    sent = [Sent("fast", 4, 40), Sent("slow", 4, 40), Sent("new", 1, 10)]
    # The first look only notes who is behind: a process about to apply writes nothing.
    assert pending.look(sent, acked, now=100.0) == set()
    assert pending.field("fast") is None and pending.field("slow") is None
    acked["fast"] = 4  # applied in between
    assert pending.look(sent, acked, now=101.0) == {"slow"}
    assert pending.field("slow") == {"revision": 40, "since": 100.0}
    assert pending.field("fast") is None and pending.field("new") is None
    # Nothing new: nothing to publish again. A newer state sent: the revision moves, and
    # the time it has held one unapplied stays.
    assert pending.look(sent, acked, now=102.0) == set()
    sent[1] = Sent("slow", 5, 50)
    assert pending.look(sent, acked, now=103.0) == {"slow"}
    assert pending.field("slow") == {"revision": 50, "since": 100.0}
    # Its acknowledgement clears it; what it holds after that is looked at afresh.
    acked["slow"] = 4
    pending.forget("slow")
    assert pending.field("slow") is None
    assert pending.look(sent, acked, now=104.0) == set()
    assert pending.look(sent, acked, now=105.0) == {"slow"}
    assert pending.field("slow") == {"revision": 50, "since": 104.0}


def test_a_process_caught_up_or_gone_is_no_longer_pending() -> None:
    pending = PendingStates()
    sent = [Sent("a", 2, 20), Sent("b", 2, 20)]
    acked = {"a": 1, "b": 1}
    pending.look(sent, acked, now=0.0)
    assert pending.look(sent, acked, now=1.0) == {"a", "b"}
    # a's acknowledgement was lost to the look (it reconnected, say): it caught up anyway.
    acked["a"] = 2
    assert pending.look(sent, acked, now=2.0) == {"a"}
    assert pending.field("a") is None and pending.field("b") is not None
    # b left: its field goes (its entry is deleted by the disconnect).
    assert pending.look(sent[:1], acked, now=3.0) == {"b"}
    assert pending.field("b") is None


def test_a_process_that_acknowledged_nothing_since_it_connected_is_pending() -> None:
    """A process that reconnected to its restarted daemon holds a snapshot it does not run
    until its next ``apply``: it has acknowledged nothing, and is behind what it was sent.
    One that acknowledges its snapshot at once is not."""
    pending = PendingStates()
    sent = [Sent("slow", 7, 70), Sent("fast", 7, 70)]
    acked: dict[str, int] = {}
    assert pending.look(sent, acked, now=0.0) == set()
    acked["fast"] = 7  # acknowledged its snapshot between the looks
    pending.forget("fast")
    assert pending.look(sent, acked, now=1.0) == {"slow"}
    assert pending.field("slow") == {"revision": 70, "since": 0.0}
    assert pending.field("fast") is None
    assert pending.look(sent, acked, now=2.0) == set()
