"""The CLI's plain-text tables: aligned columns, one line per row whatever the cells hold."""

from __future__ import annotations

from hotknob.daemon.table import render


def test_control_characters_in_a_cell_are_escaped_and_keep_the_row_on_one_line() -> None:
    # A client may name itself anything; a value in etcd may hold anything.
    rows = [["n1/name\nx", "t\tz\r"], ["ok", "\x1b[31mred\x7f"]]
    lines = render(["CLIENT", "VALUE"], rows).splitlines()
    assert lines == [
        "CLIENT      VALUE",
        "n1/name\\nx  t\\tz\\r",
        "ok          \\x1b[31mred\\x7f",
    ]


def test_other_text_is_shown_as_it_is() -> None:
    assert render(["K", "V"], [["train.lr", "é ✓ 0.1"]]).splitlines()[1] == "train.lr  é ✓ 0.1"
