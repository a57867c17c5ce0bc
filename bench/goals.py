"""Goals of a benchmark and the JSON it writes: one shape for every bench that has goals.

``GOALS`` maps a result key to ``(op, target)`` with op ``==``, ``<=`` or ``>=``.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

Goals = dict[str, tuple[str, float]]


def met(value: float, op: str, goal: float) -> bool:
    if op == "==":
        return value == goal
    return value <= goal if op == "<=" else value >= goal


def write_result(out: Path, result: dict[str, Any], goals: Goals, started: float) -> None:
    """Add ``goals_met``, the machine and the run time; write ``out``; print the headline keys."""
    result["goals_met"] = {key: met(result[key], *goals[key]) for key in goals}
    result.update({"machine": platform.platform(), "cpus": os.cpu_count(),
                   "seconds": round(time.monotonic() - started, 1)})
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({key: result[key] for key in (*goals, "goals_met")}, indent=2))
