"""What the daemon keeps of its clients' reports: means, and the series it exports."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from typing import Any

from structlog.testing import capture_logs

from hotknob.daemon.feedback import ClientFeedback
from hotknob.daemon.metrics import Metrics
from hotknob.daemon.published import ClientInfo
from hotknob.daemon.reports import (
    MAX_METRICS,
    MAX_NAME_CHARS,
    STATUS_METRICS_BYTES,
    ClientReports,
    decode_report,
)
from hotknob.model_runtime import reporting


def _report(step: int, **window: list[float]) -> dict[str, object]:
    latest = {name: values[-1] for name, values in window.items()}
    return {"type": "metrics", "step": step, "latest": latest, "window": window}


def test_means_of_huge_finite_values_do_not_overflow() -> None:
    reports = ClientReports()
    reports.add("c", decode_report(_report(1, loss=[1e308, 1e308], acc=[0.5, 1.0])))
    assert reports.means("c") == {"loss": 1e308, "acc": 0.75}
    assert decode_report(_report(2, loss=[1.7e308, 1.7e308])).value("loss") == 1.7e308


def test_a_mean_over_non_finite_values_is_the_worst_of_them() -> None:
    reports = ClientReports()
    reports.add("c", decode_report(_report(1, loss=[math.inf, -math.inf, 1.0])))
    assert reports.means("c") == {"loss": math.inf}  # inf and -inf: no ValueError
    reports.add("c", decode_report(_report(2, loss=[math.nan])))
    assert math.isnan(reports.means("c")["loss"])


def test_a_disconnected_client_takes_its_metric_series_with_it() -> None:
    metrics = Metrics()
    feedback = ClientFeedback(app="a", node="n", metrics=metrics, revision_of=lambda v: None)
    gone = ClientInfo(id=1, name="gone", pid=1, uid=0, connected_at=time.time())
    stays = ClientInfo(id=2, name="stays", pid=2, uid=0, connected_at=time.time())
    feedback.on_metrics(gone, _report(1, loss=[1.0], tokens=[5.0]))
    feedback.on_metrics(stays, _report(1, loss=[2.0]))
    text = metrics.exposition().decode()
    assert 'client="gone",metric="loss"' in text and 'client="gone",metric="tokens"' in text
    feedback.on_disconnect(gone)
    text = metrics.exposition().decode()
    assert 'client="gone"' not in text
    assert 'hotknob_client_metric{client="stays",metric="loss"} 2.0' in text
    feedback.on_disconnect(gone)  # twice: nothing left to remove, and no error


def test_a_huge_integer_value_is_an_infinity_not_a_lost_report() -> None:
    metrics = Metrics()
    feedback = ClientFeedback(app="a", node="n", metrics=metrics, revision_of=lambda v: None)
    client = ClientInfo(id=1, name="c", pid=1, uid=0, connected_at=time.time())
    feedback.on_metrics(client, {"type": "metrics", "step": 1, "latest": {"loss": 10**400, "x": 1}})
    assert feedback.reports.means("c") == {"loss": math.inf, "x": 1.0}


def test_a_client_keeps_at_most_max_metrics_names_with_one_warning() -> None:
    metrics = Metrics()
    feedback = ClientFeedback(app="a", node="n", metrics=metrics, revision_of=lambda v: None)
    wide = ClientInfo(id=1, name="wide", pid=1, uid=0, connected_at=time.time())
    with capture_logs() as logs:
        for part in range(3):  # 450 names, and a long one in each message
            names = [f"p{part}.{i}" for i in range(150)] + ["z" * (MAX_NAME_CHARS + 1)]
            feedback.on_metrics(wide, _report(part, **{n: [1.0] for n in names}))
    kept = feedback.reports.metric_names("wide")
    assert len(kept) == MAX_METRICS and "z" * (MAX_NAME_CHARS + 1) not in kept
    assert {f"p0.{i}" for i in range(150)} <= set(kept)  # the first ones stay
    text = metrics.exposition().decode()
    assert text.count('hotknob_client_metric{client="wide"') == MAX_METRICS
    warned = [e for e in logs if e["event"] == "client_metrics_dropped"]
    assert len(warned) == 1 and warned[0]["client"] == "wide", warned
    # Known names still update; the cap is on names, not on reports.
    feedback.on_metrics(wide, _report(9, **{"p0.0": [5.0]}))
    assert feedback.reports.means("wide")["p0.0"] == 3.0
    feedback.on_disconnect(wide)
    assert 'client="wide"' not in metrics.exposition().decode()


def test_the_metrics_part_of_a_status_entry_is_bounded() -> None:
    reports = ClientReports()
    # The most a client may keep: 256 names of 200 characters, each written by
    # ``json.dumps`` as 12 bytes (an escaped surrogate pair): about 1.2 MB unbounded.
    wide = {f"{i:03d}" + "\U0001f600" * (MAX_NAME_CHARS - 3): [1.5] for i in range(MAX_METRICS)}
    reports.add("wide", decode_report(_report(1, **wide)))
    fields = reports.status_fields("wide")["metrics"]
    assert len(json.dumps(fields)) <= STATUS_METRICS_BYTES
    kept = list(fields["latest"])
    assert kept == sorted(wide)[: len(kept)] and list(fields["mean"]) == kept
    assert fields["omitted"] == MAX_METRICS - len(kept) > 0
    reports.add("small", decode_report(_report(1, loss=[1.0])))
    assert "omitted" not in reports.status_fields("small")["metrics"]


def test_the_daemon_keeps_the_runtimes_limits() -> None:
    assert (MAX_METRICS, MAX_NAME_CHARS) == (reporting.MAX_METRICS, reporting.MAX_NAME_CHARS)


class _Published:
    """Records what the feedback hands the status publisher, with when."""

    def __init__(self) -> None:
        self.entries: list[tuple[float, str, dict[str, Any]]] = []
        self.removed: list[str] = []

    def publish(self, client: str, entry: dict[str, Any]) -> None:
        self.entries.append((time.monotonic(), client, entry))

    def remove(self, client: str) -> None:
        self.removed.append(client)

    def of(self, client: str) -> list[dict[str, Any]]:
        """The entries published for ``client``, in order."""
        return [entry for _, name, entry in self.entries if name == client]

    def steps(self) -> list[int]:
        return [entry["metrics"]["step"] for _, _, entry in self.entries]


class _Windows:
    """The guards' part the feedback asks for: each client's windows, set by the test."""

    def __init__(self) -> None:
        self.windows: dict[str, dict[str, dict[str, Any]]] = {}

    def windows_of(self, client: str) -> dict[str, dict[str, Any]]:
        return self.windows.get(client, {})

    def on_report(self, client: str, report: object) -> None:
        pass

    def on_applied(
        self, client: str, revision: int | None, step: int, version: int | None = None
    ) -> None:
        pass

    def on_disconnect(self, client: str) -> None:
        pass


def test_reports_alone_rewrite_a_status_entry_at_most_every_report_every() -> None:
    """Reports every 20 ms for 0.5 s, ``report_every`` 0.2 s: the first report's entry at
    once, then one entry per 0.2 s with the newest metrics, and the last report's entry
    after the reports stop; a change of what the entry says of guards, or of the names it
    reports, goes at once, and so does an ack, with the newest metrics."""
    published = _Published()
    windows = _Windows()

    async def scenario() -> None:
        feedback = ClientFeedback(
            app="a", node="n", metrics=Metrics(), revision_of=lambda v: 7, report_every=0.2
        )
        feedback.status = published  # type: ignore[assignment]
        feedback.guards = windows  # type: ignore[assignment]
        client = ClientInfo(id=1, name="c", pid=1, uid=0, connected_at=time.time())
        for step in range(1, 26):
            feedback.on_metrics(client, _report(step, loss=[float(step)]))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.25)
        steady = list(published.entries)
        # A guard now watches the process: the next report's entry goes at once.
        windows.windows["c"] = {"g1": {"from": 30, "reported": False, "done": False}}
        feedback.on_metrics(client, _report(30, loss=[1.0]))
        assert published.steps()[-1] == 30
        feedback.on_metrics(client, _report(31, loss=[1.0]))  # the same windows: held
        assert published.steps()[-1] == 30
        # An ack goes at once (its throttle is idle), with the newest metrics (31's, held
        # back until then); the report right after it is held back again (33).
        feedback.on_applied(client, {"type": "applied", "version": 3, "step": 32})
        feedback.on_metrics(client, _report(33, loss=[1.0]))
        # Another ack within STATUS_EVERY_S is due, not sent; a report then goes with it,
        # and the one held back (33) is dropped: the ack's entry is newer.
        feedback.on_applied(client, {"type": "applied", "version": 4, "step": 34})
        feedback.on_metrics(client, _report(35, loss=[1.0]))
        await asyncio.sleep(0.3)
        # A metric the process starts reporting goes at once (a guarded set looks for it).
        feedback.on_metrics(client, _report(36, loss=[1.0], grad_norm=[2.0]))
        feedback.on_metrics(client, _report(37, loss=[1.0], grad_norm=[2.0]))  # held
        feedback.cancel()
        times = [t for t, _, _ in steady]
        assert steady[0][2]["metrics"]["step"] == 1
        assert steady[-1][2]["metrics"]["step"] == 25  # the last report, published late
        assert 3 <= len(steady) <= 5, [e["metrics"]["step"] for _, _, e in steady]
        assert all(b - a >= 0.19 for a, b in itertools.pairwise(times)), times
        after = published.entries[len(steady) :]
        assert [e["metrics"]["step"] for _, _, e in after] == [30, 31, 35, 36]
        assert after[1][2]["version"] == 3 and after[1][2]["step"] == 32
        assert after[2][2]["version"] == 4 and after[2][2]["step"] == 34
        assert after[2][0] - after[1][0] >= 0.19

    asyncio.run(scenario())


def test_a_process_holding_a_state_unapplied_says_so_in_its_entry_until_its_ack() -> None:
    """The looks (``look_for_pending``, every second in a daemon) put ``pending`` into the
    entry of a process that holds a later version than it acknowledged; a report's entry
    keeps it, and the process's next acknowledgement drops it."""
    from hotknob.daemon.pending import Sent

    published = _Published()

    async def scenario() -> None:
        feedback = ClientFeedback(
            app="a", node="n", metrics=Metrics(), revision_of=lambda v: 10 * v, report_every=0
        )
        feedback.status = published  # type: ignore[assignment]
        client = ClientInfo(id=1, name="c", pid=1, uid=0, connected_at=time.time())
        feedback.on_applied(client, {"type": "applied", "version": 1, "step": 0})
        await asyncio.sleep(0.25)
        sent = [Sent("c", 2, 20)]
        feedback.look_for_pending(sent)
        feedback.look_for_pending(sent)
        await asyncio.sleep(0.25)
        held = published.entries[-1][2]
        assert held["pending"]["revision"] == 20 and held["revision"] == 10, held
        assert held["step"] == 0 and held["version"] == 1
        feedback.on_metrics(client, _report(5, loss=[1.0]))
        assert published.entries[-1][2]["pending"]["revision"] == 20
        feedback.on_applied(client, {"type": "applied", "version": 2, "step": 6})
        await asyncio.sleep(0.25)
        feedback.cancel()
        done = published.entries[-1][2]
        assert "pending" not in done and done["revision"] == 20 and done["step"] == 6, done

    asyncio.run(scenario())


def test_an_entry_says_when_its_state_is_older_than_the_revision_it_runs() -> None:
    """A revision that changed no value in force moves the entries' ``revision`` past the
    one their state was ``built`` at; so does an ack of that state afterwards. Guards on
    other nodes read the two (``status.unchanged_by``)."""
    published = _Published()
    now = {"revision": 10}  # version 1, built at revision 10, in force

    async def scenario() -> None:
        feedback = ClientFeedback(
            app="a",
            node="n",
            metrics=Metrics(),
            revision_of=lambda v: now["revision"],
            built_at=lambda v: 10,
            report_every=0,
        )
        feedback.status = published  # type: ignore[assignment]
        first = ClientInfo(id=1, name="c", pid=1, uid=0, connected_at=time.time())
        feedback.on_applied(first, {"type": "applied", "version": 1, "step": 0})
        await asyncio.sleep(0.25)
        assert published.entries[-1][2]["revision"] == 10
        assert "built" not in published.entries[-1][2]

        now["revision"] = 12  # etcd's revision 12 altered nothing here
        feedback.on_revision_unchanged()
        await asyncio.sleep(0.25)
        entry = published.entries[-1][2]
        assert (entry["revision"], entry["built"]) == (12, 10), entry

        later = ClientInfo(id=2, name="d", pid=2, uid=0, connected_at=time.time())
        feedback.on_applied(later, {"type": "applied", "version": 1, "step": 3})
        await asyncio.sleep(0.25)
        feedback.cancel()
        entry = [e for _, name, e in published.entries if name == "d"][-1]
        assert (entry["revision"], entry["built"]) == (12, 10), entry

    asyncio.run(scenario())


def test_a_guard_armed_after_a_process_applied_the_change_shows_its_window_at_once() -> None:
    """The change and its guard record land in one etcd transaction, but a daemon hears of
    them on two watches: a process may apply the change before its daemon arms the guard.
    Its entry must then show the window at once (other daemons wait on it to pass the
    guard), not at its next report, which a silent process never sends."""
    from hotknob.daemon.etcd_store import EtcdOptions
    from hotknob.daemon.guards import GuardManager
    from tests.test_wait_verdict import guard_record

    published = _Published()

    async def scenario() -> None:
        feedback = ClientFeedback(app="a", node="n", metrics=Metrics(), revision_of=lambda v: v)
        guards = GuardManager(
            app="a",
            node="n",
            options=EtcdOptions(),  # never started: no etcd is reached
            post=lambda fn, *args: fn(*args),
            broadcast=lambda event: None,
            watching=feedback.guard_watching,
        )
        feedback.status = published  # type: ignore[assignment]
        feedback.guards = guards
        client = ClientInfo(id=1, name="c", pid=1, uid=0, connected_at=time.time())
        # Versions stand for revisions here: 5 before the change, 10 the change.
        feedback.on_applied(client, {"type": "applied", "version": 5, "step": 0})
        feedback.on_applied(client, {"type": "applied", "version": 10, "step": 7})
        await asyncio.sleep(0.25)
        assert "guards" not in published.entries[-1][2]
        guards._arm(guard_record(20), 10)  # the record's watch, late
        await asyncio.sleep(0.25)
        feedback.cancel()
        entry = published.entries[-1][2]
        assert entry["guards"] == {"g1": {"from": 7, "reported": False, "done": False}}
        assert entry["revision"] == 10 and entry["step"] == 7

    asyncio.run(scenario())


def test_a_connected_process_that_has_not_acked_gets_an_entry_that_says_so() -> None:
    """A process that reconnected to its restarted daemon while a value changed holds a
    snapshot it does not run, and acks it only at its next ``apply`` (a minute later in a
    long step): it neither acks nor reports until then. Its entry, from the looks, says it
    runs no revision and holds the one sent (``status`` lists it, ``set --wait`` waits
    for it); a process that acks its snapshot at once writes its ack's entry alone."""
    from hotknob.daemon.pending import Sent
    from hotknob.daemon.wait_applied import Applied, classify

    published = _Published()

    async def scenario() -> None:
        feedback = ClientFeedback(
            app="a", node="n", metrics=Metrics(), revision_of=lambda v: 10 * v, report_every=0
        )
        feedback.status = published  # type: ignore[assignment]
        now = time.time()
        slow = ClientInfo(id=1, name="slow", pid=11, uid=0, connected_at=now, extra={"rank": 1})
        fast = ClientInfo(id=2, name="fast", pid=12, uid=0, connected_at=now)
        sent = [Sent("slow", 2, 20), Sent("fast", 2, 20)]
        feedback.look_for_pending(sent)  # both just connected: nothing to say yet
        feedback.on_applied(fast, {"type": "applied", "version": 2, "step": 5})
        feedback.look_for_pending(sent)
        feedback.look_for_pending(sent)  # nothing new: nothing written again
        await asyncio.sleep(0.25)
        (fast_entry,) = published.of("fast")
        assert fast_entry["version"] == 2 and fast_entry["revision"] == 20, fast_entry
        assert fast_entry["pid"] == 12 and "pending" not in fast_entry, fast_entry
        (slow_entry,) = published.of("slow")
        assert slow_entry["client"] == "slow" and slow_entry["node"] == "n", slow_entry
        assert "version" not in slow_entry and "revision" not in slow_entry, slow_entry
        assert slow_entry["pending"]["revision"] == 20, slow_entry
        # ``set --wait`` counts it behind, holding the change unapplied.
        applied = Applied(20)
        classify({"n/slow": slow_entry, "n/fast": fast_entry}, 20, applied)
        assert applied.applied == {"n/fast": 5} and applied.behind == {"n/slow": "-"}
        assert list(applied.holding) == ["n/slow"]
        # A newer state sent: its entry says that one is held.
        sent = [Sent("slow", 3, 30), Sent("fast", 3, 30)]
        feedback.on_applied(fast, {"type": "applied", "version": 3, "step": 6})
        feedback.look_for_pending(sent)
        await asyncio.sleep(0.25)
        assert published.of("slow")[-1]["pending"]["revision"] == 30
        assert len(published.of("slow")) == 2 and len(published.of("fast")) == 2
        # Its first report says who it is; the entry still says what it holds.
        feedback.on_metrics(slow, _report(1, loss=[1.0]))
        reported = published.of("slow")[-1]
        assert reported["pid"] == 11 and reported["rank"] == 1, reported
        assert reported["pending"]["revision"] == 30 and "revision" not in reported
        # Its ack: an entry as any other's.
        feedback.on_applied(slow, {"type": "applied", "version": 3, "step": 1})
        await asyncio.sleep(0.25)
        feedback.look_for_pending(sent)
        feedback.look_for_pending(sent)
        feedback.cancel()
        acked = published.of("slow")[-1]
        assert acked["version"] == 3 and acked["revision"] == 30 and acked["pid"] == 11, acked
        assert "pending" not in acked, acked
        assert len(published.of("fast")) == 2

    asyncio.run(scenario())


def test_a_process_that_leaves_before_its_first_ack_takes_its_entry_with_it() -> None:
    from hotknob.daemon.pending import Sent

    published = _Published()

    async def scenario() -> None:
        feedback = ClientFeedback(
            app="a", node="n", metrics=Metrics(), revision_of=lambda v: 10 * v, report_every=0
        )
        feedback.status = published  # type: ignore[assignment]
        client = ClientInfo(id=1, name="c", pid=11, uid=0, connected_at=time.time())
        sent = [Sent("c", 2, 20)]
        feedback.look_for_pending(sent)
        feedback.look_for_pending(sent)
        await asyncio.sleep(0.25)
        assert published.of("c")[-1]["pending"]["revision"] == 20
        feedback.on_disconnect(client)
        assert published.removed == ["c"]
        count = len(published.entries)
        feedback.look_for_pending([])  # gone: nothing written for it again
        feedback.look_for_pending([])
        await asyncio.sleep(0.25)
        assert len(published.entries) == count
        # Back under its name: a new connection, looked at afresh.
        again = ClientInfo(id=2, name="c", pid=13, uid=0, connected_at=time.time())
        feedback.look_for_pending(sent)
        await asyncio.sleep(0.25)
        assert len(published.entries) == count
        feedback.look_for_pending(sent)
        await asyncio.sleep(0.25)
        assert published.of("c")[-1]["pending"]["revision"] == 20
        feedback.on_metrics(again, _report(1, loss=[1.0]))
        assert published.of("c")[-1]["pid"] == 13
        feedback.cancel()

    asyncio.run(scenario())


def test_a_rank_that_runs_another_rank_s_values_says_so_and_is_counted_as_applied() -> None:
    """The nodes' local layers differ: the ranks agree on rank 0's values, and rank 1's
    daemon holds others at the same revision, which rank 1 never applies. It was shown
    holding them (``pending``), without its rank, and ``set --wait`` called it hung,
    though it runs the change. Its ack with ``agreed`` says what it runs instead."""
    from hotknob.daemon.pending import Sent
    from hotknob.daemon.status_view import summary_lines, table_rows
    from hotknob.daemon.wait_applied import Applied, classify

    published = _Published()

    async def scenario() -> None:
        feedback = ClientFeedback(
            app="a", node="n", metrics=Metrics(), revision_of=lambda v: 10 * v, report_every=0
        )
        feedback.status = published  # type: ignore[assignment]
        now = time.time()
        rank1 = ClientInfo(id=1, name="r1", pid=11, uid=0, connected_at=now, extra={"rank": 1})
        sent = [Sent("r1", 2, 20)]
        feedback.look_for_pending(sent)
        agreed = {"rank": 0, "revision": 20}
        feedback.on_applied(rank1, {"type": "applied", "version": 2, "step": 4, "agreed": agreed})
        feedback.look_for_pending(sent)
        feedback.look_for_pending(sent)
        await asyncio.sleep(0.25)
        entry = published.of("r1")[-1]
        assert entry["agreed"] == agreed and entry["rank"] == 1, entry
        assert entry["revision"] == 20 and entry["step"] == 4 and "pending" not in entry
        row = table_rows([{**entry, "key": "n/r1"}], time.time())[0]
        assert row[0] == "n/r1 (rank 1)"
        assert "runs the values agreed with rank 0 (its daemon's differ" in row[6], row
        assert any(
            "agreed with rank 0" in line
            for line in summary_lines([{**entry, "key": "n/r1"}], 20, now)
        )
        # ``set --wait`` of revision 20: applied, and says how.
        applied = Applied(20)
        classify({"n/r1": entry}, 20, applied)
        assert applied.ok and applied.applied == {"n/r1": 4} and applied.agreed == {"n/r1": 0}
        assert "n/r1 runs the values agreed with rank 0" in applied.summary()
        # A later revision its daemon sends and the ranks do not take (rank 0's daemon
        # sent nothing for it): behind, held, but not hung: what it runs instead.
        feedback.look_for_pending([Sent("r1", 3, 30)])
        feedback.look_for_pending([Sent("r1", 3, 30)])
        await asyncio.sleep(0.25)
        behind = published.of("r1")[-1]
        assert behind["pending"]["revision"] == 30 and behind["agreed"] == agreed
        classify({"n/r1": behind}, 30, applied)
        assert applied.behind == {"n/r1": 20} and not applied.holding
        failure = applied.failure(10)
        assert "n/r1 (at revision 20; runs the values agreed with rank 0" in failure, failure
        assert "hung" not in failure
        # Its daemon sends the agreed values: a plain ack, and the note goes.
        feedback.on_applied(rank1, {"type": "applied", "version": 3, "step": 4})
        await asyncio.sleep(0.25)
        feedback.cancel()
        assert "agreed" not in published.of("r1")[-1]

    asyncio.run(scenario())


def test_a_refusal_cleared_before_its_entry_was_written_still_reaches_set_wait() -> None:
    """Status entries go at most every ``STATUS_EVERY_S``: a refusal (temperature 1.5 at
    revision 11) and the revision that clears it (0.5 at 12) within one such window
    leave no entry with ``rejected``. The entry written then must still tell ``set
    --wait`` of revision 11 that this process never ran it (``rejected_before``), without
    making it rejected for later revisions, nor an error in ``status``."""
    from hotknob.daemon.refused import RefusedKeys
    from hotknob.daemon.status_view import summary_lines, table_rows
    from hotknob.daemon.wait_applied import Applied, classify

    published = _Published()
    refused = RefusedKeys("a")
    revisions = {1: 10, 2: 12, 3: 13}  # version -> the etcd revision it was built at
    temperature = "/hotknob/a/config/sampling/temperature"
    reason = "sampling.temperature (from etcd): Input should be less than or equal to 1.2"

    async def scenario() -> None:
        feedback = ClientFeedback(
            app="a",
            node="n",
            metrics=Metrics(),
            revision_of=revisions.get,
            report_every=0,
            refused=lambda: refused.newest,
            refused_before=lambda: refused.cleared,
        )
        feedback.status = published  # type: ignore[assignment]
        client = ClientInfo(id=1, name="c", pid=1, uid=0, connected_at=time.time())
        feedback.on_applied(client, {"type": "applied", "version": 1, "step": 1})
        assert len(published.of("c")) == 1  # at once: the throttle's window opens
        # Within the window: 11 refused, then 12 (0.5) taken, pushed and acknowledged.
        if refused.refused(11, reason, ["sampling.temperature"]):
            feedback.refusals_changed()
        if refused.taken(12, [temperature]):
            feedback.refusals_changed()
        feedback.on_applied(client, {"type": "applied", "version": 2, "step": 2})
        assert len(published.of("c")) == 1  # nothing written yet
        await asyncio.sleep(0.3)
        assert len(published.of("c")) == 2  # the newest entry only
        entry = published.of("c")[-1]
        assert entry["revision"] == 12 and "rejected" not in entry, entry
        entries = {"n/c": entry}
        applied = Applied(11)
        classify(entries, 11, applied, keys=["sampling.temperature"])
        assert applied.rejected == {"n/c": reason} and not applied.applied, applied
        # Not for the revision that cleared it, nor for keys it does not name.
        classify(entries, 12, applied, keys=["sampling.temperature"])
        assert applied.ok and applied.applied == {"n/c": 2}, applied
        classify(entries, 11, applied, keys=["train.lr"])
        assert applied.ok and applied.applied == {"n/c": 2}, applied
        # A later revision that writes another key: applied, and its entry still says it.
        feedback.on_applied(client, {"type": "applied", "version": 3, "step": 3})
        await asyncio.sleep(0.3)
        feedback.cancel()
        entry = published.of("c")[-1]
        assert entry["revision"] == 13 and "sampling.temperature" in entry["rejected_before"]
        classify({"n/c": entry}, 13, applied, keys=["train.lr"])
        assert applied.ok and applied.applied == {"n/c": 3}, applied
        classify({"n/c": entry}, 11, applied, keys=["sampling.temperature"])
        assert applied.rejected == {"n/c": reason}, applied
        # ``status``: no error in force.
        row = table_rows([{**entry, "key": "n/c"}], time.time())[0]
        assert row[6] == "", row
        lines = summary_lines([{**entry, "key": "n/c"}], 13, time.time())
        assert not any("rejected" in line or "error" in line for line in lines), lines

    asyncio.run(scenario())
