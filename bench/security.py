"""`make bench-security`: the figures that say whether a hostile caller can hurt the mesh.

| key | goal | measured by |
| --- | --- | --- |
| `escapes` | 0 | bench/security_sandbox.py: planted launchers and loader hooks, symlink swaps, cross-session reads |
| `redteam_commands_allowed_wrongly` | 0 | bench/security_policy.py: the red-team table through the default policy |
| `policy_evaluate_p99_ms_64k` | <= 50 | bench/security_policy.py: Evaluate on 64 KiB hostile commands |
| `rest_5xx_under_fuzz` | 0 | bench/security_rest.py: schemathesis (coverage, fuzzing, stateful) and a hostile corpus |

    python bench/security.py --out bench/results/security.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.goals import Goals, write_result
from bench.security_rest import measure_rest_fuzz
from bench.security_sandbox import measure_sandbox

ROOT = Path(__file__).resolve().parents[1]
GOALS: Goals = {"escapes": ("==", 0), "redteam_commands_allowed_wrongly": ("==", 0),
         "policy_evaluate_p99_ms_64k": ("<=", 50.0), "rest_5xx_under_fuzz": ("==", 0)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--race-attempts", type=int, default=3000)
    parser.add_argument("--policy-samples", type=int, default=200)
    parser.add_argument("--fuzz-seconds", type=int, default=150)
    args = parser.parse_args(argv)
    started = time.monotonic()
    # The latency part first and in a process of its own, so nothing the
    # other parts start shares the cores with what it times.
    policy = json.loads(subprocess.run(
        [sys.executable, "-m", "bench.security_policy", "-n", str(args.policy_samples)], cwd=ROOT, check=True,
        capture_output=True, text=True).stdout.strip().splitlines()[-1])
    sandbox = asyncio.run(measure_sandbox(args.race_attempts))
    rest = measure_rest_fuzz(max_time_s=args.fuzz_seconds)
    result: dict[str, Any] = {
        "escapes": sandbox["escapes"],
        "redteam_commands_allowed_wrongly": policy["redteam_commands_allowed_wrongly"],
        "policy_evaluate_p99_ms_64k": policy["policy_evaluate_p99_ms_64k"],
        "rest_5xx_under_fuzz": rest["rest_5xx_under_fuzz"],
    }
    result.update({"sandbox": sandbox, "policy": policy, "rest": rest})
    write_result(args.out, result, GOALS, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
