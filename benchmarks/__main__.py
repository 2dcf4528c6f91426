"""``python -m benchmarks [--quick] [--only NAME[,NAME]] [--output FILE]``.

Runs each figure family (``benchmarks.bench_<name>``) in turn, prints one table and
writes every figure, its goal and whether it was met, with a description of the
machine, as JSON (default ``benchmarks/results.json``). A family that fails is
recorded with its error and the others still run; the exit code is 1 if any failed,
else 0: a missed goal is a result, not a failure of the run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import math
import pkgutil
import sys
import time
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.machine import describe_machine, wait_until_quiet

# The families, in table order; "distributed" is run when its module is present.
FAMILIES = (
    "etcd_latency",
    "file_latency",
    "apply_overhead",
    "fanout",
    "burst",
    "footprint",
    "distributed",
)
HERE = Path(__file__).resolve().parent
DEFAULT_OUTPUT = HERE / "results.json"


def families() -> list[str]:
    """``FAMILIES``, then any other ``bench_<name>`` module in this package, by name."""
    found = sorted(
        m.name.removeprefix("bench_")
        for m in pkgutil.iter_modules([str(HERE)])
        if m.name.startswith("bench_")
    )
    return [*FAMILIES, *(name for name in found if name not in FAMILIES)]


def _normalize_figure(raw: Any, name: str = "") -> dict[str, Any]:
    """A figure as ``{name, value, unit, goal, ok}``, from a dict or a bare number."""
    if not isinstance(raw, dict):
        raw = {"name": name, "value": raw}
    ok = raw.get("ok", raw.get("pass"))
    value = raw.get("value")
    if isinstance(value, bool):
        value = float(value)
    if isinstance(value, float) and math.isnan(value):
        value = None
    return {
        "name": str(raw.get("name", name)),
        "value": value,
        "unit": str(raw.get("unit", "")),
        "goal": str(raw.get("goal", "")),
        "ok": None if ok is None else bool(ok),
    }


def normalize(result: dict[str, Any]) -> dict[str, Any]:
    """A family's result with a ``figures`` list in the common shape.

    A family that returns a plain mapping of names to numbers (no ``figures``) has
    each entry taken as a figure without a goal.
    """
    if "figures" in result:
        figures = [_normalize_figure(f) for f in result["figures"]]
        rest = {k: v for k, v in result.items() if k != "figures"}
    else:
        figures = [
            _normalize_figure(v, k) for k, v in result.items() if isinstance(v, int | float | dict)
        ]
        rest = {"raw": result}
    return {"figures": figures, **rest}


def run_family(name: str, quick: bool) -> dict[str, Any]:
    module_name = f"benchmarks.bench_{name}"
    if importlib.util.find_spec(module_name) is None:
        return {"status": "absent", "figures": []}
    started = time.monotonic()
    try:
        module = importlib.import_module(module_name)
        result = normalize(module.run(quick))
        status = "ok"
    except Exception as exc:
        traceback.print_exc()
        result = {"figures": [], "error": f"{type(exc).__name__}: {exc}"}
        status = "error"
    return {"status": status, "seconds": round(time.monotonic() - started, 2), **result}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-2):
            return f"{value:.3g}"
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render_table(results: dict[str, dict[str, Any]]) -> str:
    rows = [("benchmark", "figure", "value", "unit", "goal", "result")]
    for family, result in results.items():
        if result["status"] != "ok":
            detail = result.get("error", "not present: skipped")
            rows.append((family, detail[:60], "", "", "", result["status"].upper()))
            continue
        for fig in result["figures"]:
            verdict = {True: "pass", False: "MISS", None: ""}[fig["ok"]]
            rows.append(
                (family, fig["name"], _fmt(fig["value"]), fig["unit"], fig["goal"], verdict)
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for n, row in enumerate(rows):
        cells = [
            cell.rjust(widths[i]) if i == 2 else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summarize(results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    goals = [
        (family, fig)
        for family, result in results.items()
        for fig in result["figures"]
        if fig["ok"] is not None
    ]
    return {
        "goals": len(goals),
        "passed": sum(1 for _, fig in goals if fig["ok"]),
        "missed": [f"{family}: {fig['name']}" for family, fig in goals if not fig["ok"]],
        "errors": [family for family, result in results.items() if result["status"] == "error"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer samples: under a minute")
    known = families()
    parser.add_argument("--only", default="", help="comma-separated families: " + ",".join(known))
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON results file")
    args = parser.parse_args(argv)
    chosen = [n.strip() for n in args.only.split(",") if n.strip()] or known
    unknown = [n for n in chosen if n not in known]
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)} (known: {', '.join(known)})")

    started = time.monotonic()
    report: dict[str, Any] = {
        "format": 1,
        "quick": args.quick,
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": describe_machine(),
    }
    results: dict[str, dict[str, Any]] = {}
    for name in chosen:
        # Quick: one quiet window (0.25 s) instead of two, at most 2 s.
        waited, idle = (
            wait_until_quiet(windows=1, max_s=2.0) if args.quick else wait_until_quiet(max_s=10.0)
        )
        print(
            f"benchmarks: {name} ... (after {waited:.1f} s for the CPUs to be quiet)",
            file=sys.stderr,
            flush=True,
        )
        results[name] = {**run_family(name, args.quick), "quiet_wait_s": waited, "idle": idle}
    report["duration_s"] = round(time.monotonic() - started, 2)
    report["benchmarks"] = results
    report["summary"] = summarize(results)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    summary = report["summary"]
    print(render_table(results))
    print(
        f"\n{summary['passed']} of {summary['goals']} goals met in {report['duration_s']:.0f} s"
        f" ({'quick' if args.quick else 'full'} run); results in {args.output}"
    )
    return 1 if summary["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
