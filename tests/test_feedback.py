"""What the daemon keeps of its clients' reports: means, and the series it exports."""

from __future__ import annotations

import math
import time

from hotknob.daemon.feedback import ClientFeedback
from hotknob.daemon.metrics import Metrics
from hotknob.daemon.published import ClientInfo
from hotknob.daemon.reports import ClientReports, decode_report


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
