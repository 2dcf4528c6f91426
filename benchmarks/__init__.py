"""hotknob's measured figures, each against a goal and, where it has one, a same-run baseline.

``python -m benchmarks [--quick] [--only NAME]`` (``make bench``) runs every family,
prints one table and writes ``benchmarks/results.json``; ``docs/performance.md`` says
how to read it. One module per family, ``bench_<name>.py``, each exposing
``run(quick: bool) -> dict`` that returns::

    {"figures": [{"name": str, "value": float | None, "unit": str,
                  "goal": str, "ok": bool | None}, ...],   # ok None: no goal
     "params": {...}}                                      # what was run

The families start real processes (etcd, ``hotknob run``, client workers) and stop
all of them before returning, even on an error.
"""
