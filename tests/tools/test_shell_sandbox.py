"""shell_exec in the sandbox, in every sandbox mode this machine supports."""
from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import psutil
import pytest

from services.tools.adapters.sandbox import SandboxLimits, detect_mode
from services.tools.core.executor import ExecutorLimits
from services.tools.core.model import ToolStatus
from tests.support.waiting import wait_until
from tests.tools.conftest import CTX, call, make_executor, owner_uid_of, workspace_of


def _available_modes() -> list[str]:
    modes = ["none"]
    for mode in ("unshare", "bwrap"):
        try:
            detect_mode(mode)
            modes.append(mode)
        except RuntimeError:
            pass
    return modes


MODES = _available_modes()


def test_bubblewrap_is_used_when_installed() -> None:
    if shutil.which("bwrap") is None:
        pytest.skip("bubblewrap is not installed (apt-get install bubblewrap); unshare/none were tested")
    assert detect_mode("auto") == "bwrap"


@pytest.mark.parametrize("mode", MODES)
async def test_output_exit_code_env_and_cwd(workspace_base: Path, mode: str) -> None:
    os.environ["LLMESH_TEST_SECRET"] = "hunter2"
    try:
        executor = make_executor(workspace_base, sandbox_mode=mode)
        await executor.execute(CTX, call("fs_write", path="sub/hello.txt", content="hi there"))
        outcome = await executor.execute(CTX, call(
            "shell_exec", cwd="sub", env={"GREETING": "hello"},
            command="cat hello.txt; echo; echo $GREETING; env | grep -c LLMESH_TEST_SECRET; echo oops >&2; exit 3"))
    finally:
        del os.environ["LLMESH_TEST_SECRET"]
    assert outcome.status is ToolStatus.ERROR and outcome.exit_code == 3 and outcome.error_reason == "NONZERO_EXIT"
    assert outcome.stdout.text == "hi there\nhello\n0\n"
    assert outcome.stderr.text == "oops\n"


@pytest.mark.parametrize("mode", [m for m in MODES if m != "none"])
async def test_no_network(workspace_base: Path, mode: str) -> None:
    executor = make_executor(workspace_base, sandbox_mode=mode)
    outcome = await executor.execute(CTX, call("shell_exec", argv=[
        "python3", "-c", "import socket; print(len(socket.if_nameindex()))"
                         "; socket.create_connection(('127.0.0.1', 22), timeout=1)"]))
    assert outcome.status is ToolStatus.ERROR
    assert "Network is unreachable" in outcome.stderr.text or "Connection refused" in outcome.stderr.text
    # Only the loopback interface exists in the sandbox's network namespace.
    assert outcome.stdout.text.strip() == "1"


@pytest.mark.parametrize("mode", MODES)
async def test_timeout_kills_grandchildren(workspace_base: Path, mode: str) -> None:
    executor = make_executor(workspace_base, sandbox_mode=mode)
    # A grandchild in the group, and (where a pid namespace can catch it) one that
    # detaches into its own session; both keep writing a heartbeat.
    command = "(while true; do date +%s%N > beat2; sleep 0.05; done) & sleep 30"
    if mode != "none":
        command = "(setsid sh -c 'while true; do date +%s%N > beat; sleep 0.05; done' &) ; " + command
    start = time.perf_counter()
    outcome = await executor.execute(CTX, call("shell_exec", command=command, timeout_ms=2_000))
    # Generous on purpose: the 2 s timeout fired, long before the 30 s sleep would have ended.
    assert outcome.status is ToolStatus.TIMEOUT and time.perf_counter() - start < 20
    root = workspace_of(workspace_base)
    assert await wait_until(lambda: (root / "beat2").exists())
    # What was killed has stopped by now (SIGKILL leaves at most a write already under way) ...
    await asyncio.sleep(0.3)
    before = (root / "beat2").read_text()
    # ... so only a heartbeat still alive (one write per 50 ms) changes the file over this span.
    await asyncio.sleep(0.4)
    assert (root / "beat2").read_text() == before, "the process group outlived the timeout"
    if mode != "none":  # a pid namespace takes the setsid'd one down too; a process group alone cannot
        before = (root / "beat").read_text()
        await asyncio.sleep(0.4)
        assert (root / "beat").read_text() == before, "a detached grandchild outlived the timeout"


@pytest.mark.parametrize("mode", MODES)
async def test_fork_bomb_is_contained(workspace_base: Path, mode: str) -> None:
    executor = make_executor(workspace_base, sandbox_mode=mode,
                             sandbox_limits=SandboxLimits(cpu_seconds=5, processes=24))
    started = time.time()
    outcome = await executor.execute(CTX, call("shell_exec", command="bomb() { bomb | bomb & }; bomb; sleep 2",
                                               timeout_ms=1500))
    assert outcome.status in (ToolStatus.TIMEOUT, ToolStatus.ERROR, ToolStatus.OK)
    uid = owner_uid_of(workspace_base)
    if uid is not None:
        def leftovers() -> list[psutil.Process]:
            return [p for p in psutil.process_iter(["uids", "create_time"])
                    if p.info["uids"] and p.info["uids"].real == uid and p.info["create_time"] >= started - 1]
        assert await wait_until(lambda: not leftovers(), timeout_s=5), "fork bomb processes survived"
    # The machine is still usable: the next command runs normally.
    after = await executor.execute(CTX, call("shell_exec", command="echo alive"))
    assert after.status is ToolStatus.OK and after.stdout.text == "alive\n"


@pytest.mark.parametrize("mode", MODES)
async def test_output_is_capped_with_head_and_tail(workspace_base: Path, mode: str) -> None:
    executor = make_executor(workspace_base, sandbox_mode=mode, limits=ExecutorLimits(output_cap_bytes=1000))
    outcome = await executor.execute(CTX, call(
        "shell_exec", command="echo START; head -c 200000 /dev/zero | tr '\\0' x; echo; echo END"))
    assert outcome.status is ToolStatus.OK
    assert outcome.stdout.truncated and outcome.stdout.original_bytes == 6 + 200_000 + 1 + 4
    assert outcome.stdout.text.startswith("START\n") and outcome.stdout.text.endswith("END\n")
    assert len(outcome.stdout.text) < 1100


async def test_resource_limits_apply(workspace_base: Path) -> None:
    executor = make_executor(workspace_base, sandbox_mode="none",
                             sandbox_limits=SandboxLimits(file_size_bytes=4096, open_files=32))
    outcome = await executor.execute(CTX, call("shell_exec", command="ulimit -n; head -c 100000 /dev/zero > big; "
                                                                      "echo rc=$?; wc -c < big"))
    lines = outcome.stdout.text.split()
    assert lines[0] == "32" and lines[1] != "rc=0" and lines[2] == "4096"


async def test_shell_arguments_are_validated(workspace_base: Path) -> None:
    executor = make_executor(workspace_base)
    both = await executor.execute(CTX, call("shell_exec", command="true", argv=["true"]))
    bad_env = await executor.execute(CTX, call("shell_exec", command="true", env={"BAD-NAME": "x"}))
    assert both.status is ToolStatus.INVALID and bad_env.status is ToolStatus.INVALID
