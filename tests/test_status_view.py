"""``status --summary`` on entries given by hand: revisions, errors and reports, as an
operator of a hundred nodes reads them."""

from __future__ import annotations

from typing import Any

from hotknob.daemon.status_view import summary_lines, table_rows

NOW = 10_000.0


def entry(key: str, revision: Any, **fields: Any) -> dict[str, Any]:
    return {"key": key, "node": key.split("/")[0], "revision": revision, **fields}


def test_a_summary_names_who_is_not_like_the_others() -> None:
    loss = {"latest": {"loss": 0.4}, "step": 9, "time": NOW - 2}
    entries = [
        *[entry(f"n{i}/rank{j}", 212, metrics=loss) for i in range(3) for j in range(4)],
        entry("n3/rank0", 210, metrics={**loss, "time": NOW - 125}),
        entry("n3/rank1", 210, pending={"revision": 212, "since": NOW - 41}, metrics=loss),
        entry(
            "n4/rank0",
            211,
            rejected={"revision": 212, "reason": "train.lr (from etcd): too big"},
            metrics={"latest": {"loss": 0.5, "grad_norm": 2.0}, "time": NOW - 1},
        ),
        entry("n4/rank1", "soon", errors=[{"error": "callback failed"}]),  # by hand
    ]
    assert summary_lines(entries, 230, NOW) == [
        "16 processes on 5 nodes, etcd at revision 230",
        "revision 212: 12 processes",
        "revision 211: 1 process: n4/rank0",
        "revision 210: 2 processes: n3/rank0, n3/rank1 (1 was sent revision 212, not applied "
        "yet: the longest for 41.0s)",
        "no revision: 1 process: n4/rank1",
        "error of 1 process (n4/rank0): its daemon rejected revision 212: train.lr (from etcd): "
        "too big",
        "error of 1 process (n4/rank1): callback failed",
        "reports: 15 of 16 processes report grad_norm, loss; the oldest: n3/rank0's, 2m05s ago",
    ]


def test_a_summary_of_processes_all_alike() -> None:
    entries = [entry("a/p1", 7), entry("a/p2", 7)]
    assert summary_lines(entries, 7, NOW) == [
        "2 processes on 1 node, etcd at revision 7",
        "revision 7: 2 processes",
        "reports: none",
    ]
    # The table has them as before, a row each.
    assert [row[0] for row in table_rows(entries, NOW)] == ["a/p1", "a/p2"]


def test_a_row_s_errors_fit_or_are_cut_with_a_count() -> None:
    from hotknob.daemon.status_view import ERRORS_CHARS, errors_cell

    short = entry("a/p1", 7, errors=[{"error": "boom"}, {"error": "bad"}])
    assert errors_cell(short) == "boom; bad"
    unreadable = "/etc/hotknob/config.yaml: not valid YAML: " + "x" * 300
    long = entry("a/p2", 7, config_files={"unreadable": unreadable}, errors=["boom"])
    cell = errors_cell(long)
    first, more = cell.split(" (+")
    assert first.startswith("its daemon cannot read a config file: /etc/hotknob/config.yaml")
    assert len(first) == ERRORS_CHARS and first.endswith("...")
    assert more == "1 more: status --summary)"
    # The summary has each whole, on its own line.
    lines = summary_lines([long], 7, NOW)
    assert f"error of 1 process (a/p2): its daemon cannot read a config file: {unreadable}" in (
        lines
    )
    assert "error of 1 process (a/p2): boom" in lines


def test_keys_waiting_for_a_restart_are_said_once_whoever_holds_them() -> None:
    from hotknob.daemon.status_view import error_parts

    both = entry("a/p1", 7, restart_pending=["train.batch_size"], held=["train.batch_size"])
    assert error_parts(both) == [
        "runs train.batch_size as it started: the new value waits for a restart"
    ]
    process = entry("a/p2", 7, held=["model.width", "train.batch_size"])
    assert error_parts(process) == [
        "runs model.width, train.batch_size as it started: the new value waits for a restart"
    ]
    assert error_parts(entry("a/p3", 7, restart_pending="not a list")) == []


def test_processes_that_applied_nothing_yet_are_named_with_what_they_hold() -> None:
    """Processes connected to a restarted daemon that have not acked its snapshot yet: their
    entries have no revision, and say what they were sent (``pending``)."""
    holding = [
        {"key": f"n1/p{i}", "node": "n1", "pending": {"revision": 30, "since": NOW - 9 - i}}
        for i in range(2)
    ]
    assert summary_lines(holding, 30, NOW) == [
        "2 processes on 1 node, etcd at revision 30",
        "no revision: 2 processes: n1/p0, n1/p1 (2 were sent revision 30, not applied yet: "
        "the longest for 10.0s)",
        "reports: none",
    ]
    row = table_rows(holding[:1], NOW)[0]
    assert row[:3] == ["n1/p0", "-", "- (30 pending 9.0s)"], row
