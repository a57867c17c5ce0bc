#!/usr/bin/env python3
"""Run ``make test`` several times in a row and tally the outcomes.

    python3 scripts/suite_loop.py                      # 5 runs
    python3 scripts/suite_loop.py --runs 5 --busy 2,3  # runs 2 and 3 with other cores kept busy
    PYTEST_ARGS="tests/inference/client -q" python3 scripts/suite_loop.py --runs 2   # a selection (make passes it on)

Each run's full output goes to ``<log-dir>/run-<n>.log``; the terminal gets
one tally line per run (pytest's own count line, the exit code, the failing
test ids) and a summary at the end. "Busy" runs keep ``--busy-cpus`` CPUs
(default 1: the other core of a 2-core machine) spinning for the whole run,
with ``stress-ng --cpu`` where it is installed, else with Python busy loops.
Exit status: 0 when every run passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

ROOT = Path(__file__).resolve().parents[1]
# pytest's final count line, e.g. "1 failed, 1204 passed, 3 skipped in 812.31s (0:13:32)".
COUNTS = re.compile(r"^=*\s*((?:\d+ \w+(?:, )?)+) in [\d.]+s")
# Failures and errors from the short test summary (-ra is in the pytest addopts).
FAILED = re.compile(r"^(FAILED|ERROR) (\S+)")


@dataclass
class RunResult:
    number: int
    busy: bool
    exit_code: int
    seconds: float
    counts: str
    failing: list[str] = field(default_factory=list)
    log_path: Path = Path()

    @property
    def passed(self) -> bool:
        return self.exit_code == 0 and not self.failing


def parse_output(lines: list[str]) -> tuple[str, list[str]]:
    """pytest's count line and the ids of failed or erroring tests, from ``make test`` output."""
    counts = ""
    failing: list[str] = []
    for line in lines:
        match = COUNTS.match(line.strip())
        if match:
            counts = match.group(1)
        failed = FAILED.match(line)
        if failed and failed.group(2) not in failing:
            failing.append(failed.group(2))
    return counts, failing


class BusyCpus:
    """Keeps ``num_cpus`` CPUs spinning until stopped; owns only the processes it started."""

    def __init__(self, num_cpus: int) -> None:
        self.num_cpus = num_cpus
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Self:
        stress = shutil.which("stress-ng")
        if stress:
            commands = [[stress, "--cpu", str(self.num_cpus), "--quiet"]]
        else:
            commands = [[sys.executable, "-c", "while True: pass"] for _ in range(self.num_cpus)]
        for command in commands:
            # A session of its own, so stopping it reaches stress-ng's workers too.
            self.processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                                   start_new_session=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def run_once(number: int, busy: bool, busy_cpus: int, make_args: list[str], log_dir: Path) -> RunResult:
    log_path = log_dir / f"run-{number}.log"
    started = time.monotonic()
    with log_path.open("w", encoding="utf-8") as log:
        if busy:
            with BusyCpus(busy_cpus):
                code = subprocess.call(["make", *make_args, "test"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        else:
            code = subprocess.call(["make", *make_args, "test"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    counts, failing = parse_output(log_path.read_text(encoding="utf-8", errors="replace").splitlines())
    return RunResult(number, busy, code, time.monotonic() - started, counts, failing, log_path)


def tally_line(result: RunResult, num_runs: int) -> str:
    verdict = "PASSED" if result.passed else "FAILED"
    load = "other cores busy" if result.busy else "idle"
    counts = result.counts or "no pytest count line"
    return (f"run {result.number}/{num_runs} ({load}): {verdict}  {counts}; exit {result.exit_code}; "
            f"{result.seconds:.0f}s; log {result.log_path}")


def summary_lines(results: list[RunResult]) -> list[str]:
    num_passed = sum(r.passed for r in results)
    lines = [f"summary: {num_passed} of {len(results)} runs passed"
             + ("" if num_passed == len(results) else f", {len(results) - num_passed} failed")]
    for result in results:
        lines.append(f"  run {result.number}: {'passed' if result.passed else 'FAILED'}"
                     + (" (busy)" if result.busy else ""))
    by_test: dict[str, list[int]] = {}
    for result in results:
        for test_id in result.failing:
            by_test.setdefault(test_id, []).append(result.number)
    for test_id, runs in sorted(by_test.items()):
        lines.append(f"  failing: {test_id} (run{'s' if len(runs) > 1 else ''} {', '.join(map(str, runs))})")
    return lines


def parse_runs(text: str) -> set[int]:
    return {int(part) for part in text.split(",") if part.strip()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", "-n", type=int, default=5, help="how many times to run make test (default 5)")
    parser.add_argument("--busy", type=parse_runs, default=set(), metavar="N[,N...]",
                        help="1-based numbers of the runs during which other cores are kept busy")
    parser.add_argument("--busy-cpus", type=int, default=1, help="CPUs kept busy in those runs (default 1)")
    parser.add_argument("--log-dir", type=Path, default=None, help="where run-<n>.log go (default: a new temp dir)")
    parser.add_argument("make_args", nargs="*", help="extra arguments for make, e.g. VENV=/path/to/venv")
    args = parser.parse_args(argv)
    if bad := sorted(n for n in args.busy if not 1 <= n <= args.runs):
        parser.error(f"--busy names runs outside 1..{args.runs}: {bad}")
    log_dir = args.log_dir or Path(tempfile.mkdtemp(prefix="llmesh-suite-loop-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    selection = os.environ.get("PYTEST_ARGS", "")
    print(f"make test x{args.runs} in {ROOT}; busy runs: {sorted(args.busy) or 'none'}"
          + (f"; PYTEST_ARGS={selection!r}" if selection else ""), flush=True)
    results = []
    for number in range(1, args.runs + 1):
        result = run_once(number, number in args.busy, args.busy_cpus, args.make_args, log_dir)
        results.append(result)
        print(tally_line(result, args.runs), flush=True)
        for test_id in result.failing:
            print(f"    {test_id}", flush=True)
    print("\n".join(summary_lines(results)), flush=True)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
