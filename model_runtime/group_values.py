"""Reading and writing the settings of an optimizer's param groups, any of which torch lets
be a tensor (capturable or compiled optimizers).

Apart from the binding and the schedule rewriting that both use it because it holds one
rule of its own: a tensor setting is written in place with ``fill_`` and never replaced,
so graphs that captured it see the change.
"""

from __future__ import annotations

from collections.abc import MutableMapping, MutableSequence
from typing import Any

import torch


def num(x: Any) -> float:
    """A setting of a param group or a scheduler as a float, a tensor's included."""
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def put(container: MutableMapping[str, Any] | MutableSequence[Any], key: Any, v: float) -> None:
    """Store ``v`` at ``container[key]``; a tensor there is filled in place, never replaced."""
    old = container[key]
    if isinstance(old, torch.Tensor):
        old.fill_(v)
    else:
        container[key] = v
