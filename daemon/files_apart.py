"""Config files that the schema refuses together, taken apart file by file.

Each config file is edited on its own, often by someone else (a team's base file, a
run's own overrides, both kept in git): a value the schema refuses in one must not hold
back the edits of the others. When the files as they are now make the configuration
invalid, each file's edit is tried on its own, in the files' order, on top of the
contents in force: an edit that keeps the configuration valid is taken, any other is
refused with its own reason and that file keeps its contents in force.

The order decides between two edits that are each valid alone and invalid together
(one file raises a minimum, another lowers the maximum): the earlier file's is taken.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hotknob.config import InvalidChange

from .file_watcher import fingerprint

Files = tuple[tuple[Path, Mapping[str, Any]], ...]
"""Each config file with its parsed contents, in order: a later file wins key by key."""


@dataclass(frozen=True)
class Refused:
    paths: tuple[Path, ...]
    """The files whose edits were refused together."""
    error: InvalidChange
    tried: Files
    """The files as the edits were tried: those in force then, with these files' edits."""


@dataclass(frozen=True)
class Apart:
    files: Files
    """The files to run: each taken file's new contents, each refused one's in force."""
    taken: tuple[Path, ...]
    refused: tuple[Refused, ...]


def edited_files(in_force: Files, now: Files) -> list[Path]:
    """The files of ``now`` whose contents are not those in force (one new to the list
    counts as edited from nothing)."""
    before = {path: fingerprint(contents) for path, contents in in_force}
    return [path for path, contents in now if before.get(path) != fingerprint(contents)]


def take_apart(
    in_force: Files, now: Files, check: Callable[[Files], InvalidChange | None]
) -> Apart:
    """Try each edited file of ``now`` alone on ``in_force`` (``check``: None if the files
    make a valid configuration, else why not), in ``now``'s order."""
    old, new = dict(in_force), dict(now)
    running: dict[Path, Mapping[str, Any]] = {path: old.get(path, {}) for path, _ in now}
    taken: list[Path] = []
    refused: list[Refused] = []
    for path in edited_files(in_force, now):
        trial = dict(running)
        trial[path] = new[path]
        files = tuple(trial.items())  # ``now``'s order, as ``running`` was built
        error = check(files)
        if error is None:
            running = trial
            taken.append(path)
        else:
            refused.append(Refused((path,), error, files))
    return Apart(tuple(running.items()), tuple(taken), tuple(refused))
