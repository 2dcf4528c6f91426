"""``RefusedKeys``: the etcd values a daemon refused and still runs without, which its
processes' status entries carry as ``rejected`` until those keys are edited again."""

from __future__ import annotations

from hotknob.daemon.refused import REASON_CHARS, RefusedKeys

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
    assert not refused and refused.newest is None


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
