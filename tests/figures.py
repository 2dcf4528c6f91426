"""Where the reliability tests record the figures that ``docs/reliability.md`` quotes.

Each test that measures something calls ``record(name, ...)`` only after its
assertions passed, so a figure on disk is one a failing test could not have
written. Files land in ``$HOTKNOB_FIGURES_DIR`` (default ``build/figures``) as
``<name>.json``; the same line is printed for ``pytest -s`` and for CI logs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent


def figures_dir() -> Path:
    return Path(os.environ.get("HOTKNOB_FIGURES_DIR") or _ROOT / "build" / "figures")


def record(name: str, **figures: Any) -> dict[str, Any]:
    """Write ``figures`` (JSON-able) under ``name`` and print them on one line."""
    entry = {"name": name, "recorded_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **figures}
    folder = figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n")
    print(f"\nFIGURES {name}: {json.dumps(figures, sort_keys=True)}")
    return entry
