"""One session's commands cannot starve, signal or look into another's; each call is capped as a whole."""
from __future__ import annotations

import asyncio
import os
from pathlib import Path

import psutil
import pytest

from services.tools.adapters.cgroups import CgroupLimits
from services.tools.adapters.sandbox import SandboxLimits, detect_mode
from services.tools.core.model import CallContext, ToolStatus
from tests.tools.conftest import call, make_executor

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sessions get uids of their own only when run as root")

A = CallContext(request_id="ra", tenant_id="acme", session_id="alice", role="developer")
B = CallContext(request_id="rb", tenant_id="other", session_id="bob", role="developer")
MODE = detect_mode("auto")
# Starts processes until the kernel says no, then holds them.
HOG = """
import subprocess, time
held = []
try:
    while len(held) < 200:
        held.append(subprocess.Popen(["sleep", "30"]))
except OSError as exc:
    print("limit reached at", len(held), exc, flush=True)
time.sleep(30)
"""




async def _processes_of(workspace: Path, *, at_least: int, hog: asyncio.Task) -> list[psutil.Process]:
    """The processes of the workspace's uid, once there are ``at_least`` (or the hog ended, or 10 s passed)."""
    held: list[psutil.Process] = []
    for _ in range(200):
        held = _uid_processes(workspace)
        if len(held) >= at_least or hog.done():
            break
        await asyncio.sleep(0.05)
    return held


def _uid_processes(workspace: Path) -> list[psutil.Process]:
    if not workspace.exists():
        return []
    uid = workspace.stat().st_uid
    return [p for p in psutil.process_iter(["uids"]) if p.info["uids"] and p.info["uids"].real == uid]


async def test_a_session_holding_every_process_does_not_starve_another(base: Path) -> None:
    executor = make_executor(base, sandbox_mode=MODE, sandbox_limits=SandboxLimits(cpu_seconds=10, processes=16))
    # Alice fills her process limit and holds it.
    hog = asyncio.create_task(executor.execute(A, call("shell_exec", timeout_ms=12_000, argv=["python3", "-c", HOG])))
    held_processes = await _processes_of(base / "acme" / "alice", at_least=14, hog=hog)
    assert len(held_processes) >= 14, "alice should hold (nearly) her whole process limit"
    # Bob still forks freely.
    outcome = await executor.execute(B, call("shell_exec", command="for i in 1 2 3 4 5 6 7 8; do true & done; "
                                                                   "wait; echo forked"))
    assert outcome.status is ToolStatus.OK and outcome.stdout.text == "forked\n", outcome
    held = await hog
    assert held.status is ToolStatus.TIMEOUT


async def test_sessions_run_as_distinct_unprivileged_uids_and_cannot_read_each_other(base: Path) -> None:
    executor = make_executor(base, sandbox_mode="none")
    first = await executor.execute(A, call("shell_exec", command="id -u; echo secret > mine"))
    second = await executor.execute(B, call("shell_exec", command="id -u"))
    uid_a, uid_b = int(first.stdout.text.split()[0]), int(second.stdout.text.split()[0])
    assert uid_a != uid_b and 0 not in (uid_a, uid_b)
    alice_file = base / "acme" / "alice" / "mine"
    peek = await executor.execute(B, call("shell_exec", argv=["cat", str(alice_file)]))
    assert peek.status is ToolStatus.ERROR and "secret" not in peek.stdout.text
    # A session's uid survives a restart of the service: it is the workspace's owner.
    again = await make_executor(base, sandbox_mode="none").execute(A, call("shell_exec", command="id -u"))
    assert int(again.stdout.text) == uid_a


@pytest.mark.skipif(MODE != "bwrap", reason="only bubblewrap hides the host's paths")
async def test_no_host_path_inside_and_a_private_writable_tmp(base: Path) -> None:
    executor = make_executor(base, sandbox_mode="bwrap")
    outcome = await executor.execute(A, call("shell_exec", command=(
        "pwd; echo $HOME; cat /proc/self/mountinfo 2>/dev/null; ls / ; echo x > /tmp/t && cat /tmp/t")))
    assert outcome.status is ToolStatus.OK, outcome
    assert str(base) not in outcome.stdout.text and "/workspace" in outcome.stdout.text
    assert outcome.stdout.text.endswith("x\n")
    # /tmp is the call's own, capped in size.
    big = await executor.execute(A, call("shell_exec", command="head -c 100000000 /dev/zero > /tmp/big"))
    assert big.status is ToolStatus.ERROR and "No space left" in big.stderr.text


async def test_workspace_quota_stops_growth_but_not_reading(base: Path) -> None:
    executor = make_executor(base, sandbox_mode=MODE, workspace_quota_bytes=1024 * 1024)
    fill = await executor.execute(A, call("shell_exec", command="head -c 3000000 /dev/zero > fill"))
    assert fill.status is ToolStatus.ERROR
    assert await asyncio.to_thread(os.path.getsize, base / "acme" / "alice" / "fill") <= 1024 * 1024
    more = await executor.execute(A, call("shell_exec", command="echo more >> fill"))
    assert more.status is ToolStatus.ERROR
    listing = await executor.execute(A, call("shell_exec", command="wc -c < fill && rm fill && echo freed"))
    assert listing.status is ToolStatus.OK and listing.stdout.text.endswith("freed\n")


async def test_fs_write_counts_against_the_workspace_quota(base: Path) -> None:
    executor = make_executor(base, sandbox_mode="none", workspace_quota_bytes=64 * 1024)
    small = await executor.execute(A, call("fs_write", path="a.txt", content="x" * 1000))
    big = await executor.execute(A, call("fs_write", path="b.txt", content="y" * 100_000))
    assert small.status is ToolStatus.OK
    assert big.status is ToolStatus.ERROR and big.error_reason == "WORKSPACE_QUOTA_EXCEEDED"
    assert not (base / "acme" / "alice" / "b.txt").exists()


@pytest.mark.skipif(CgroupLimits.detect() is None, reason="this machine offers no cgroup to make")
async def test_a_call_is_capped_as_a_whole_by_its_cgroup(base: Path) -> None:
    from services.tools.adapters.sandbox import Sandbox
    cgroups = CgroupLimits.detect()
    assert cgroups is not None
    try:
        workspace = base / "ws"
        workspace.mkdir(mode=0o700)
        os.chown(workspace, 300_900, 300_900)
        # Each process stays under its own 300 MB address-space limit; four of them
        # together pass the call's 300 MB memory cap, so not all of them can finish.
        limits = SandboxLimits(cpu_seconds=20, address_space_bytes=300 * 1024**2, processes=16)
        hog = "python3 -c \"import time; b = bytearray(200 * 1024 * 1024); time.sleep(2); print('ok')\""
        command = f"for i in 1 2 3 4; do {hog} & done; wait"
        capped = await Sandbox("none", limits, cgroups=cgroups).run(
            ["/bin/sh", "-c", command], workspace, workspace, env={}, stdin=None, output_cap_bytes=4096,
            owner=(300_900, 300_900))
        alone = await Sandbox("none", limits).run(
            ["/bin/sh", "-c", command], workspace, workspace, env={}, stdin=None, output_cap_bytes=4096,
            owner=(300_900, 300_900))
        assert alone.stdout.text.count("ok") == 4, alone
        assert capped.stdout.text.count("ok") < 4, capped
        # Nothing is left behind: every call's group is gone afterwards.
        for hierarchy in cgroups.hierarchies:
            assert [p.name for p in hierarchy.parent.iterdir() if p.name.startswith("call-")] == []
    finally:
        cgroups.close()
