"""``status`` as the operator of a large job reads it: entries published to a real etcd,
read by the real CLI."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping
from typing import Any

import pytest

from tests.daemon_proc import run_cli
from tests.etcd_server import EtcdServer

pytestmark = pytest.mark.timeout(90)

APP = "rs"
STATUS = f"/hotknob/{APP}/status/"


def put_entries(etcd: EtcdServer, entries: Mapping[str, Mapping[str, Any]]) -> None:
    """Write status entries (``<node>/<client>``: entry) as a daemon would, in one
    connection: a hundred ``etcdctl`` runs would take seconds."""
    from hotknob.daemon.etcd_store import EtcdOptions, EtcdStore

    store = EtcdStore(EtcdOptions(endpoints=(etcd.endpoint,), timeout=5))
    try:
        for name, entry in entries.items():
            store.put(STATUS + name, json.dumps(entry))
    finally:
        store.close()


def status(etcd: EtcdServer, *args: str) -> subprocess.CompletedProcess[str]:
    done = run_cli("status", *args, "--app", APP, "--etcd-endpoints", etcd.endpoint)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-500:]
    return done


def entry(node: str, client: str, revision: int = 9, **more: Any) -> dict[str, Any]:
    return {"client": client, "node": node, "version": 2, "revision": revision, **more}


def test_one_long_client_name_does_not_widen_every_row(etcd: EtcdServer) -> None:
    # A client may name itself with up to 256 characters: its row's PROCESS was that wide,
    # and so, aligned on it, were the other 99 rows (over 300 characters each).
    entries = {f"n{i % 3}/trainer-{i}": entry(f"n{i % 3}", f"trainer-{i}") for i in range(99)}
    long_name = "job-" + "x" * 240 + "-rank-7"
    entries[f"n1/{long_name}"] = entry("n1", long_name)
    put_entries(etcd, entries)
    lines = status(etcd).stdout.splitlines()
    assert len(lines) == 101, lines[:3]
    assert max(len(line) for line in lines) < 150, max(lines, key=len)
    # Cut in the middle: the node and the end of the name (a rank, say) still tell it apart.
    (row,) = [line for line in lines if "rank-7" in line]
    assert row.startswith("n1/job-xxx") and "..." in row, row
    done = status(etcd, "--json")  # whole there
    assert f"n1/{long_name}" in [p["key"] for p in json.loads(done.stdout)["processes"]]


def test_a_summary_of_a_hundred_distinct_errors_stays_short(etcd: EtcdServer) -> None:
    # Errors that quote a rank or a step are distinct in every process: the summary gave a
    # line to each, as many lines as the table it stands in for.
    entries = {
        f"n{i % 4}/trainer-{i}": entry(
            f"n{i % 4}", f"trainer-{i}", errors=[{"error": f"ValueError: rank {i} diverged"}]
        )
        for i in range(100)
    }
    entries["n0/other"] = entry("n0", "other", errors=[{"error": "ValueError: same"}])
    entries["n1/other"] = entry("n1", "other", errors=[{"error": "ValueError: same"}])
    put_entries(etcd, entries)
    lines = status(etcd, "--summary").stdout.splitlines()
    assert len(lines) <= 15, "\n".join(lines)
    errors = [line for line in lines if line.startswith("error of ")]
    # The most common first; the rest counted, with where to read them whole.
    assert errors[0] == "error of 2 processes (n0/other, n1/other): ValueError: same", errors
    assert "and 91 more distinct errors" in lines[-2] and "status --json" in lines[-2], lines


def test_a_summary_shows_a_multiline_error_on_one_line(etcd: EtcdServer) -> None:
    # An on_change callback's traceback, or a terminal escape in what a client sent: the
    # table escapes them; the summary printed them raw, breaking its lines (and the
    # terminal's colours).
    text = "Traceback (most recent call last):\n  File 'x.py'\nValueError: \x1b[31mred"
    reporter = "b\x1b[2Jc"  # and the name of whose report is oldest, and a metric's
    metrics = {"step": 5, "time": time.time() - 5, "latest": {"lo\nss": 0.5}}
    put_entries(etcd, {"n1/a": entry("n1", "a", errors=[{"error": text}])})
    put_entries(etcd, {f"n1/{reporter}": entry("n1", reporter, metrics=metrics)})
    lines = status(etcd, "--summary").stdout.splitlines()
    assert "\x1b" not in "".join(lines) and len(lines) == 4, lines
    assert "report lo\\nss; the oldest: n1/b\\x1b[2Jc's" in lines[-1], lines
    (line,) = [line for line in lines if line.startswith("error of ")]
    assert line.endswith("last):\\n  File 'x.py'\\nValueError: \\x1b[31mred"), line
