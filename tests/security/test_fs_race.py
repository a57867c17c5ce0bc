"""The symlink swap race: sandboxed code swaps a workspace directory for a symlink to the outside.

A forked process (as the workspace's owner, when the tests run as root) keeps
exchanging ``d`` (a real directory of the workspace) with ``spare`` (a symlink
to a directory outside) through ``renameat2(RENAME_EXCHANGE)``, so ``d`` is
one or the other at every instant, flipping both ways. Meanwhile fs_read,
fs_write, fs_list and fs_search go through ``d`` thousands of times. None may
see or touch the outside, and every refusal must be a documented domain
error, never a crash.
"""
from __future__ import annotations

import asyncio
import ctypes
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.tools.core.executor import ExecutorLimits, ToolExecutor
from services.tools.core.model import ToolOutcome, ToolStatus
from tests.tools.conftest import CTX, call, make_executor, workspace_of

ATTEMPTS = 3000
SECRET = "OUTSIDE-SECRET"
MARKER = "outside-marker.txt"
# Refusals a caller may get while the tree changes under it; anything else is a bug.
EXPECTED_ERRORS = {"SYMLINK_NOT_FOLLOWED", "PATH_OUTSIDE_WORKSPACE", "FILE_NOT_FOUND", "NOT_A_DIRECTORY"}

RENAME_EXCHANGE = 2
AT_FDCWD = -100


def swap_forever(root: str, stop: Any, num_swaps: Any) -> None:
    """In a forked child: as the workspace's owner, exchange ``d`` and ``spare`` until told to stop."""
    libc = ctypes.CDLL(None, use_errno=True)
    if os.geteuid() == 0:
        owner = os.stat(root)
        os.setgroups([])
        os.setgid(owner.st_gid)
        os.setuid(owner.st_uid)
    os.chdir(root)
    while not stop.is_set():
        for _ in range(64):
            if libc.renameat2(AT_FDCWD, b"d", AT_FDCWD, b"spare", RENAME_EXCHANGE) != 0:
                raise OSError(ctypes.get_errno(), "renameat2(RENAME_EXCHANGE)")
        num_swaps.value += 64


@dataclass
class RaceReport:
    num_attempts: int = 0
    num_swaps: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    leaks: list[str] = field(default_factory=list)  # outside content seen by a caller
    unexpected: list[str] = field(default_factory=list)  # crashes, internal errors, unknown reasons
    outside_changes: list[str] = field(default_factory=list)


def build_tree(base: Path) -> tuple[Path, Path]:
    """The workspace (with ``d`` and ``spare``) and the outside directory ``spare`` points to."""
    root, outside = workspace_of(base), base / "outside"
    for top, text in [(root / "d", "inside"), (outside, SECRET)]:
        (top / "sub").mkdir(parents=True)
        (top / "secret.txt").write_text(text)
        (top / "sub" / "secret.txt").write_text(text)
    (outside / MARKER).write_text(SECRET)
    os.symlink(outside, root / "spare")
    if os.geteuid() == 0:  # the session's sandbox user owns what is in its workspace, and nothing outside
        owner = root.stat()
        for path in root.rglob("*"):
            os.chown(path, owner.st_uid, owner.st_gid, follow_symlinks=False)
    return root, outside


def snapshot(top: Path) -> dict[str, str]:
    return {str(p.relative_to(top)): (p.read_text() if p.is_file() else "<dir>") for p in sorted(top.rglob("*"))}


class Swapper:
    """A process of its own (the sandboxed code's side), flipping ``d`` both ways as fast as it can."""

    def __init__(self, root: Path) -> None:
        mp = multiprocessing.get_context("fork")
        self.stop = mp.Event()
        self.num_swaps = mp.Value("q", 0, lock=False)
        self.process = mp.Process(target=swap_forever, args=(str(root), self.stop, self.num_swaps),
                                  daemon=True)
        self.process.start()

    def close(self) -> int:
        self.stop.set()
        self.process.join(10)
        assert self.process.exitcode == 0, f"the swapper failed (exit code {self.process.exitcode})"
        return int(self.num_swaps.value)


def attempt(i: int) -> tuple[str, dict[str, Any]]:
    """The i-th call of the mix: every tool, through ``d`` as the last and as an inner component."""
    kind = i % 8
    if kind == 0:
        return "fs_read", {"path": "d/secret.txt"}
    if kind == 1:
        return "fs_read", {"path": "d/sub/secret.txt"}
    if kind == 2:
        return "fs_write", {"path": f"d/w{i}.txt", "content": "written"}
    if kind == 3:
        return "fs_write", {"path": f"d/sub/new{i}/w.txt", "content": "written"}
    if kind == 4:
        return "fs_write", {"path": "d/sub/secret.txt", "content": "appended", "append": True}
    if kind == 5:
        return "fs_list", {"path": "d"}
    if kind == 6:
        return "fs_list", {"path": ".", "recursive": True, "max_entries": 200}
    return "fs_search", {"pattern": "secret", "path": "d", "ignore_case": True, "max_matches": 50}


def judge(report: RaceReport, name: str, outcome: ToolOutcome) -> None:
    label = f"{name}:{outcome.status.name}:{outcome.error_reason}"
    report.outcomes[label] += 1
    seen = outcome.content.text + outcome.error_message
    if SECRET in seen or MARKER in seen:
        report.leaks.append(f"{label}: {seen[:200]!r}")
    if outcome.status is ToolStatus.OK:
        return
    if outcome.status not in (ToolStatus.ERROR, ToolStatus.DENIED) or outcome.error_reason not in EXPECTED_ERRORS:
        report.unexpected.append(f"{label}: {outcome.error_message[:200]}")


async def run_race(executor: ToolExecutor, base: Path, attempts: int = ATTEMPTS, concurrency: int = 4,
                   on_outcome: Callable[[str, ToolOutcome], None] | None = None) -> RaceReport:
    """Drive ``attempts`` file tool calls through ``d`` while it is swapped; what came out."""
    await executor.execute(CTX, call("fs_list"))  # makes the workspace
    root, outside = build_tree(base)
    before = snapshot(outside)
    report = RaceReport()
    swapper = Swapper(root)
    try:
        for start in range(0, attempts, concurrency):
            batch = [attempt(i) for i in range(start, min(start + concurrency, attempts))]
            outcomes = await asyncio.gather(*(executor.execute(CTX, call(name, call_id=f"c{start + n}", **args))
                                              for n, (name, args) in enumerate(batch)))
            for (name, _args), outcome in zip(batch, outcomes, strict=True):
                report.num_attempts += 1
                judge(report, name, outcome)
                if on_outcome is not None:
                    on_outcome(name, outcome)
    finally:
        report.num_swaps = swapper.close()
    after = snapshot(outside)
    report.outside_changes = sorted(
        f"{path}: {before.get(path)!r} -> {after.get(path)!r}"
        for path in set(before) | set(after) if before.get(path) != after.get(path))
    return report


def race_executor(base: Path) -> ToolExecutor:
    # The breaker must not hide what a tool does by refusing to run it.
    return make_executor(base, cache_ttl_s=0, limits=ExecutorLimits(
        breaker_failure_threshold=10**9, retry_max_attempts=1, max_concurrent_calls_per_session=8))


async def test_swapping_a_directory_for_a_symlink_never_reaches_outside(base: Path) -> None:
    report = await run_race(race_executor(base), base)
    assert report.num_attempts == ATTEMPTS
    assert report.num_swaps > ATTEMPTS, "the swapper must keep flipping d while the tools run"
    assert report.leaks == [], report.leaks[:5]
    assert report.outside_changes == [], report.outside_changes[:5]
    assert report.unexpected == [], (report.unexpected[:5], report.outcomes)
    # Both sides of the race were hit: some calls went through the real directory, some met the symlink.
    assert any(label.endswith(":OK:") for label in report.outcomes), report.outcomes
    assert any("SYMLINK_NOT_FOLLOWED" in label for label in report.outcomes), report.outcomes
