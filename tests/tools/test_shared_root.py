"""Tools replicas sharing one workspace root: what one makes, the other finds and honours.

Each "replica" is an executor of its own (registry, workspace roots, uid
pool) on the same root, as two tools processes mounting one volume are; the
creation race runs in separate processes, since flock is what excludes them.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import services.tools.adapters.fs_tools as fs_tools_module
from services.tools.adapters.uid_pool import COUNTER_FILE, SessionUidPool
from services.tools.core.locks import THREAD_LOCKS, FileLock
from services.tools.core.model import ToolStatus
from services.tools.core.workspace import WorkspaceRoots
from tests.tools.conftest import CTX, SANDBOX_UID, TEST_UID_BASE, call, make_executor, wait_until, workspace_of

SPAWN = multiprocessing.get_context("spawn")  # no fork of a process that may hold gRPC threads
PROCESS_TIMEOUT_S = 60.0
needs_root = pytest.mark.skipif(SANDBOX_UID is None, reason="only root hands workspaces to per-session uids")


def roots_of(base: Path) -> WorkspaceRoots:
    """A replica's view of the root, built the way the service builds it."""
    pool = SessionUidPool(base, TEST_UID_BASE, 10_000) if SANDBOX_UID is not None else None
    return WorkspaceRoots(base, SANDBOX_UID, SANDBOX_UID, allocate_owner=pool.allocate if pool else None)


async def uid_of_commands(executor: Any, session_id: str) -> int:
    outcome = await executor.execute(replace(CTX, session_id=session_id), call("shell_exec", argv=["id", "-u"]))
    assert outcome.status is ToolStatus.OK, outcome.error_message
    return int(outcome.stdout.text)


async def test_a_session_gets_the_same_workspace_on_every_replica(workspace_base: Path) -> None:
    first, second = make_executor(workspace_base), make_executor(workspace_base)
    assert await first.workspace(CTX) == await second.workspace(CTX)
    wrote = await first.execute(CTX, call("fs_write", path="notes/plan.txt", content="from the first"))
    assert wrote.status is ToolStatus.OK
    read = await second.execute(CTX, call("fs_read", path="notes/plan.txt"))
    assert read.status is ToolStatus.OK and read.content.text == "from the first"


@needs_root
async def test_a_session_runs_as_one_uid_on_every_replica(workspace_base: Path) -> None:
    first, second = make_executor(workspace_base), make_executor(workspace_base)
    uids = {await uid_of_commands(replica, CTX.session_id) for replica in (first, second, first)}
    owner = workspace_of(workspace_base).stat().st_uid
    assert uids == {owner} and TEST_UID_BASE <= owner < TEST_UID_BASE + 10_000
    made = await second.execute(CTX, call("fs_write", path="f.txt", content="x"))
    assert made.status is ToolStatus.OK
    assert (workspace_of(workspace_base) / "f.txt").stat().st_uid == owner, "files belong to the session's uid"


@needs_root
async def test_different_sessions_get_different_uids_whichever_replica_makes_them(workspace_base: Path) -> None:
    replicas = [make_executor(workspace_base), make_executor(workspace_base)]
    sessions = [f"s{i}" for i in range(8)]
    made = {s: await uid_of_commands(replicas[i % 2], s) for i, s in enumerate(sessions)}
    assert len(set(made.values())) == len(sessions), made
    # Each session keeps its uid on the replica that did not make it.
    seen = {s: await uid_of_commands(replicas[(i + 1) % 2], s) for i, s in enumerate(sessions)}
    assert seen == made
    assert (workspace_base / COUNTER_FILE).read_text() == str(len(sessions)), "one uid per session, none wasted"


def make_workspaces(base: str, sessions: list[str], start: Any, results: Any) -> None:
    """In a spawned process (a replica): two threads make every session's workspace at once."""
    roots = roots_of(Path(base))
    made: dict[str, list[tuple[str, int]]] = {}
    errors: list[str] = []

    def run(order: list[str]) -> None:
        for session in order:
            try:
                workspace = roots.for_session("acme", session)
                made.setdefault(session, []).append((str(workspace.root), workspace.root.stat().st_uid))
            except Exception as exc:  # reported to the test, which fails on it
                errors.append(f"{session}: {type(exc).__name__}: {exc}")

    start.wait(PROCESS_TIMEOUT_S)
    threads = [threading.Thread(target=run, args=(order,)) for order in (sessions, sessions[::-1])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.put((made, errors))


async def test_replicas_making_the_same_workspaces_at_once_never_collide(workspace_base: Path) -> None:
    sessions = [f"s{i}" for i in range(16)]
    num_replicas = 4
    start, results = SPAWN.Barrier(num_replicas), SPAWN.Queue()
    processes = [SPAWN.Process(target=make_workspaces, args=(str(workspace_base), sessions[i:] + sessions[:i],
                                                              start, results))
                 for i in range(0, 4 * num_replicas, 4)]
    for process in processes:
        process.start()
    try:
        answers = [await asyncio.to_thread(results.get, timeout=PROCESS_TIMEOUT_S) for _ in processes]
    finally:
        for process in processes:
            process.join(PROCESS_TIMEOUT_S)
    assert all(process.exitcode == 0 for process in processes)
    assert not [error for _made, errors in answers for error in errors]
    views: dict[str, set[tuple[str, int]]] = {}
    for made, _errors in answers:
        for session, seen in made.items():
            views.setdefault(session, set()).update(seen)
    assert sorted(views) == sorted(sessions)
    assert all(len(seen) == 1 for seen in views.values()), "every replica saw one workspace and one owner"
    tenant = workspace_base / "acme"
    assert sorted(p.name for p in tenant.iterdir()) == sorted(sessions), "no half-made leftovers"
    if SANDBOX_UID is not None:
        uids = [uid for seen in views.values() for _root, uid in seen]
        assert len(set(uids)) == len(sessions) and all(TEST_UID_BASE <= uid < TEST_UID_BASE + 10_000 for uid in uids)
        assert (workspace_base / COUNTER_FILE).read_text() == str(len(sessions)), "each made once, by one replica"
        assert all((tenant / s).stat().st_mode & 0o777 == 0o700 for s in sessions)


def hold_lock(lock_file: str, held: Any, release: Any) -> None:
    """In a spawned process (another replica): hold a session's lock until told to let go."""
    with FileLock(Path(lock_file)).hold():
        held.set()
        release.wait(PROCESS_TIMEOUT_S)


class HeldElsewhere:
    """A session's lock held by another process for the duration of a ``with`` block."""

    def __init__(self, lock_file: Path) -> None:
        self.held, self.release = SPAWN.Event(), SPAWN.Event()
        self.process = SPAWN.Process(target=hold_lock, args=(str(lock_file), self.held, self.release))

    async def __aenter__(self) -> HeldElsewhere:
        self.process.start()
        assert await asyncio.to_thread(self.held.wait, PROCESS_TIMEOUT_S), "the other replica took the lock"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release.set()
        await asyncio.to_thread(self.process.join, PROCESS_TIMEOUT_S)
        assert self.process.exitcode == 0


async def test_a_write_waits_for_the_session_lock_another_replica_holds(workspace_base: Path) -> None:
    executor = make_executor(workspace_base)
    workspace = await executor.workspace(CTX)
    assert workspace.lock_file is not None
    async with HeldElsewhere(workspace.lock_file):
        write = asyncio.create_task(executor.execute(CTX, call("fs_write", path="a.txt", content="after")))
        await asyncio.sleep(0.5)
        assert not write.done() and not (workspace.root / "a.txt").exists(), "the write waited for the lock"
    outcome = await asyncio.wait_for(write, PROCESS_TIMEOUT_S)
    assert outcome.status is ToolStatus.OK and (workspace.root / "a.txt").read_text() == "after"


async def test_a_write_that_timed_out_waiting_for_the_lock_writes_nothing(workspace_base: Path) -> None:
    executor = make_executor(workspace_base)
    workspace = await executor.workspace(CTX)
    assert workspace.lock_file is not None
    async with HeldElsewhere(workspace.lock_file):
        outcome = await executor.execute(CTX, call("fs_write", path="late.txt", content="x", timeout_ms=300))
        assert outcome.status is ToolStatus.TIMEOUT
    # The abandoned thread gets the lock now; it must give up rather than write.
    assert await wait_until(lambda: len(THREAD_LOCKS) == 0, timeout_s=10)
    assert not (workspace.root / "late.txt").exists()


async def test_making_a_workspace_waits_for_the_replica_making_it(workspace_base: Path) -> None:
    executor = make_executor(workspace_base)
    ctx = replace(CTX, session_id="fresh")
    lock_file = executor.roots.lock_file(ctx.tenant_id, ctx.session_id)
    async with HeldElsewhere(lock_file):
        made = asyncio.create_task(executor.workspace(ctx))
        await asyncio.sleep(0.3)
        assert not made.done() and not workspace_of(workspace_base, "fresh").exists()
    workspace = await asyncio.wait_for(made, PROCESS_TIMEOUT_S)
    assert workspace.root == workspace_of(workspace_base, "fresh").resolve() and workspace.root.is_dir()


async def test_the_quota_check_and_the_write_are_one_step_across_replicas(workspace_base: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    quota = 1024 * 1024
    first = make_executor(workspace_base, workspace_quota_bytes=quota)
    second = make_executor(workspace_base, workspace_quota_bytes=quota)
    await first.workspace(CTX)
    measured = fs_tools_module.disk_usage

    def slow_disk_usage(root: Path) -> int:
        used = measured(root)
        time.sleep(0.3)  # widen the gap between measuring and writing: unlocked, both writes would pass
        return used

    monkeypatch.setattr(fs_tools_module, "disk_usage", slow_disk_usage)
    content = "x" * (quota * 6 // 10)
    outcomes = await asyncio.gather(first.execute(CTX, call("fs_write", path="a.txt", content=content)),
                                    second.execute(CTX, call("fs_write", path="b.txt", content=content)))
    assert sorted(o.status.name for o in outcomes) == ["ERROR", "OK"]
    (refused,) = [o for o in outcomes if o.status is ToolStatus.ERROR]
    assert refused.error_reason == "WORKSPACE_QUOTA_EXCEEDED"
    assert measured(workspace_of(workspace_base)) <= quota


def test_a_workspace_whose_maker_died_half_way_is_finished_by_the_next_call(workspace_base: Path) -> None:
    if SANDBOX_UID is None:
        pytest.skip("only root hands workspaces over; unprivileged, a made folder is already finished")
    half_made = workspace_of(workspace_base, "crashed")
    half_made.mkdir(parents=True, mode=0o755)  # made, never handed over: still root's
    workspace = roots_of(workspace_base).for_session("acme", "crashed")
    info = workspace.root.stat()
    assert TEST_UID_BASE <= info.st_uid < TEST_UID_BASE + 10_000 and info.st_mode & 0o777 == 0o700
