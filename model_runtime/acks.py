"""What an ``applied`` acknowledgement can carry: a step the protocol takes, and errors
cut to fit one line.

The client acknowledges each state it applies (``LiveConfig._after_apply``), and again
at a reconnect or an agreement of the ranks. The step an ack carries must be a plain
``int`` within the protocol's bound (``ackable``); a step given to ``apply`` as a numpy
or torch integer is converted, and one that is no integer at all is logged and not sent
(``step_for_ack``). The errors of the bindings and callbacks that raised travel in the
ack, at most ``ACK_ERRORS_MAX`` of them, each cut to ``ACK_ERROR_CHARS_MAX`` characters
(``ack_errors``).

Apart from ``client.LiveConfig`` because these are the message's limits, not the
client's state: the client decides when to acknowledge, this module what fits.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from . import protocol
from .reporting import step_number

log = logging.getLogger("hotknob.model_runtime")


def ackable(step: Any) -> bool:
    """Whether an ack can carry ``step`` as it is (a plain ``int`` the protocol takes)."""
    return type(step) is int and -protocol.MAX_INT <= step <= protocol.MAX_INT


def step_for_ack(step: Any, version: int) -> int | None:
    """``step`` converted for the ack of ``version``, or None, logged, if it is no integer
    at all."""
    try:
        return step_number(step)
    except (TypeError, ValueError) as exc:
        log.error(
            "live_apply_step_unusable version=%d step=%.80r error=%s: applied, but the "
            "daemon is not told; pass apply() an integer step",
            version,
            step,
            exc,
        )
        return None


ACK_ERRORS_MAX = 20
ACK_ERROR_CHARS_MAX = 2000
"""An ack carries at most this many error entries, each text cut to this many characters:
an exception's text can be of any size, and an ack over the protocol's line limit could not
be sent at all (the log has each error whole)."""


def ack_errors(errors: list[dict[str, str]]) -> list[dict[str, str]]:
    """The ``errors`` of an ack: at most ``ACK_ERRORS_MAX`` (and a last entry saying how many
    more), each cut and with text that is not valid UTF-8 (an exception quoting a path of
    undecodable bytes) escaped: else the whole ack could not be sent."""
    kept = [_text_only(e) for e in errors[:ACK_ERRORS_MAX]]
    if len(errors) > ACK_ERRORS_MAX:
        kept.append({"error": f"and {len(errors) - ACK_ERRORS_MAX} more (in the process's log)"})
    return kept


def _text_only(error: Mapping[str, str]) -> dict[str, str]:
    return {
        k: _cut(v.encode("utf-8", "backslashreplace").decode("utf-8")) for k, v in error.items()
    }


def _cut(text: str) -> str:
    if len(text) <= ACK_ERROR_CHARS_MAX:
        return text
    return f"{text[:ACK_ERROR_CHARS_MAX]}... ({len(text) - ACK_ERROR_CHARS_MAX} more characters)"
