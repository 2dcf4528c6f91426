"""hotknob's error tree, shared by the config layer, the daemon and the CLI.

::

    HotknobError                  base; ``exit_code`` tells the CLI what to return
    +-- InvalidInput (1)          bad input from a user: a value, a key, a file
    |   +-- InvalidChange (1)     a candidate configuration failed validation
    |   +-- LayerError (1)        one layer could not be read (unparsable file, bad env value)
    |   +-- SchemaLoadError (1)   ``--schema module:Class`` is not importable or not a model
    +-- UsageError (2)            the command line itself is wrong
    +-- Unavailable (3)           etcd or the daemon cannot be reached (retryable)

Only the CLI turns these into an exit code and one line of text; library code
raises them with ``raise ... from exc`` at the boundary where a third-party
error is caught.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


class HotknobError(Exception):
    exit_code = 1


class InvalidInput(HotknobError):
    exit_code = 1


@dataclass(frozen=True)
class Problem:
    """One reason a configuration is invalid: which key, from which layer, and why;
    ``origin``: where in that layer, when a layer has several places (the config file of
    the files layer that gave the key)."""

    key: str
    layer: str
    reason: str
    value: object = None
    origin: str = ""

    def __str__(self) -> str:
        source = f"{self.layer}: {self.origin}" if self.origin else self.layer
        where = f"{self.key} (from {source})" if self.layer else self.key
        return f"{where}: {self.reason}"


class InvalidChange(InvalidInput):
    """A candidate configuration failed validation; ``problems`` says where and why."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = tuple(problems)
        super().__init__("; ".join(str(p) for p in self.problems) or "invalid configuration")

    def __reduce__(self) -> tuple[type[InvalidChange], tuple[tuple[Problem, ...]]]:
        # Made again from its problems, not its message: a pickled error (a config checked
        # in a process pool) comes back whole.
        return (type(self), (self.problems,))


class LayerError(InvalidInput):
    """A layer could not be read at all (an unparsable file, a malformed value)."""

    def __init__(self, layer: str, message: str, key: str = ""):
        self.layer = layer
        self.key = key
        super().__init__(message)

    def __reduce__(self) -> tuple[type[LayerError], tuple[str, str, str]]:
        return (type(self), (self.layer, str(self), self.key))


class SchemaLoadError(InvalidInput):
    pass


class UsageError(HotknobError):
    exit_code = 2


class Unavailable(HotknobError):
    """etcd or the daemon cannot be reached; the operation may succeed later."""

    exit_code = 3
