"""Built-in file tools, confined to the session workspace."""
from __future__ import annotations

import asyncio
import os
import stat
import threading
from dataclasses import replace
from pathlib import Path

import pytest

from services.common.errors import ResourceExhausted
from services.tools.adapters.fs_tools import FileTools
from services.tools.core.executor import SessionThreads
from services.tools.core.model import ToolSpec, ToolStatus
from tests.tools.conftest import CTX, call, make_executor, wait_until, workspace_of


@pytest.fixture
def executor(workspace_base: Path):  # type: ignore[no-untyped-def]
    executor = make_executor(workspace_base, cache_ttl_s=0)
    root = workspace_of(workspace_base)
    root.mkdir(parents=True)
    (workspace_base / "outside.txt").write_text("top secret")
    os.symlink(workspace_base / "outside.txt", root / "escape_link")
    os.symlink("/proc/self", root / "proc_link")
    return executor


ESCAPES = {"../outside.txt": "PATH_OUTSIDE_WORKSPACE", "../../acme/../outside.txt": "PATH_OUTSIDE_WORKSPACE",
           str(Path("/etc/passwd")): "PATH_OUTSIDE_WORKSPACE", "/proc/self/environ": "PATH_OUTSIDE_WORKSPACE",
           "sub/../../outside.txt": "PATH_OUTSIDE_WORKSPACE",
           "escape_link": "SYMLINK_NOT_FOLLOWED", "proc_link/environ": "SYMLINK_NOT_FOLLOWED"}


@pytest.mark.parametrize("path", ESCAPES)
async def test_read_escapes_are_denied(executor, path: str) -> None:  # type: ignore[no-untyped-def]
    outcome = await executor.execute(CTX, call("fs_read", path=path))
    assert outcome.status is ToolStatus.DENIED and outcome.error_reason == ESCAPES[path]
    assert "top secret" not in outcome.content.text and outcome.content.text == ""
    assert outcome.request_error is not None and outcome.request_error.field == "arguments.path"


@pytest.mark.parametrize("path", ["../planted.txt", "/tmp/planted.txt", "escape_link"])
async def test_write_escapes_are_denied_and_write_nothing(executor, workspace_base: Path, path: str) -> None:  # type: ignore[no-untyped-def]
    outcome = await executor.execute(CTX, call("fs_write", path=path, content="pwned"))
    assert outcome.status is ToolStatus.DENIED
    assert (workspace_base / "outside.txt").read_text() == "top secret"
    assert not (workspace_base / "acme" / "planted.txt").exists()


@pytest.mark.parametrize("tool,args,reason", [
    ("fs_list", {"path": ".."}, "PATH_OUTSIDE_WORKSPACE"),
    ("fs_search", {"pattern": "secret", "path": "/"}, "PATH_OUTSIDE_WORKSPACE"),
    ("shell_exec", {"command": "pwd", "cwd": "../.."}, "PATH_OUTSIDE_WORKSPACE"),
    ("fs_list", {"path": "proc_link"}, "SYMLINK_NOT_FOLLOWED"),
    ("fs_search", {"pattern": "secret", "path": "escape_link"}, "SYMLINK_NOT_FOLLOWED"),
    ("fs_write", {"path": "proc_link/x", "content": "x"}, "SYMLINK_NOT_FOLLOWED"),
])
async def test_other_tools_refuse_escapes_too(executor, tool: str, args: dict, reason: str) -> None:  # type: ignore[no-untyped-def]
    outcome = await executor.execute(CTX, call(tool, **args))
    assert outcome.status is ToolStatus.DENIED and outcome.error_reason == reason


async def test_write_read_list_search_round_trip(executor) -> None:  # type: ignore[no-untyped-def]
    wrote = await executor.execute(CTX, call("fs_write", path="src/pkg/mod.py", content="def f():\n    return 42\n"))
    assert wrote.status is ToolStatus.OK and "wrote 23 bytes to src/pkg/mod.py" in wrote.content.text
    await executor.execute(CTX, call("fs_write", path="src/pkg/mod.py", content="# end\n", append=True))
    read = await executor.execute(CTX, call("fs_read", path="src/pkg/mod.py"))
    assert read.content.text == "def f():\n    return 42\n# end\n"
    part = await executor.execute(CTX, call("fs_read", path="src/pkg/mod.py", offset=4, limit=3))
    assert part.content.text == "f()"
    listing = await executor.execute(CTX, call("fs_list", path="src", recursive=True))
    assert listing.content.text.splitlines() == ["d pkg/", "f pkg/mod.py 29"]
    found = await executor.execute(CTX, call("fs_search", pattern=r"return \d+"))
    assert found.content.text == "src/pkg/mod.py:2:    return 42"
    missing = await executor.execute(CTX, call("fs_search", pattern="nothing-like-this"))
    assert missing.status is ToolStatus.OK and missing.exit_code == 1


async def test_read_missing_file_is_a_tool_error(executor) -> None:  # type: ignore[no-untyped-def]
    outcome = await executor.execute(CTX, call("fs_read", path="nope.txt"))
    assert outcome.status is ToolStatus.ERROR and outcome.error_reason == "FILE_NOT_FOUND"


async def test_large_file_comes_back_as_head_and_tail(executor, workspace_base: Path) -> None:  # type: ignore[no-untyped-def]
    root = workspace_of(workspace_base)
    (root / "big.log").write_text("first line\n" + "x" * 500_000 + "\nlast line\n")
    outcome = await executor.execute(CTX, call("fs_read", path="big.log"))
    assert outcome.status is ToolStatus.OK and outcome.content.truncated
    assert outcome.content.original_bytes == 500_022
    assert outcome.content.text.startswith("first line") and outcome.content.text.endswith("last line\n")


async def test_bad_search_pattern_is_invalid(executor) -> None:  # type: ignore[no-untyped-def]
    outcome = await executor.execute(CTX, call("fs_search", pattern="("))
    assert outcome.status is ToolStatus.INVALID and outcome.request_error.field == "arguments.pattern"


# symlinks, special files, ownership -----------------------------------------

async def test_a_symlink_inside_the_workspace_is_refused_and_named(executor, workspace_base: Path) -> None:  # type: ignore[no-untyped-def]
    root = workspace_of(workspace_base)
    (root / "real").mkdir()
    (root / "real" / "a.txt").write_text("inside")
    os.symlink("real", root / "alias")
    for tool, args in [("fs_read", {"path": "alias/a.txt"}), ("fs_list", {"path": "alias"}),
                       ("fs_write", {"path": "alias/b.txt", "content": "x"})]:
        outcome = await executor.execute(CTX, call(tool, **args))
        assert outcome.status is ToolStatus.DENIED and outcome.error_reason == "SYMLINK_NOT_FOLLOWED", tool
        assert "'alias'" in outcome.error_message and "symlink" in outcome.error_message
    assert not (root / "real" / "b.txt").exists()
    read = await executor.execute(CTX, call("fs_read", path="real/a.txt"))
    assert read.status is ToolStatus.OK and read.content.text == "inside"


async def test_list_shows_symlinks_and_special_files_without_following_them(executor, workspace_base: Path) -> None:  # type: ignore[no-untyped-def]
    root = workspace_of(workspace_base)
    os.mkfifo(root / "pipe")
    (root / "d").mkdir()
    (root / "d" / "f.txt").write_text("abc")
    listing = await executor.execute(CTX, call("fs_list", recursive=True))
    assert listing.status is ToolStatus.OK
    assert listing.content.text.splitlines() == [
        "d d/", "f d/f.txt 3", f"l escape_link -> {workspace_base / 'outside.txt'}", "o pipe FIFO",
        "l proc_link -> /proc/self"]


async def test_a_fifo_is_refused_at_once_by_every_file_tool(executor, workspace_base: Path) -> None:  # type: ignore[no-untyped-def]
    root = workspace_of(workspace_base)
    os.mkfifo(root / "pipe")
    (root / "note.txt").write_text("needle\n")
    for tool, args in [("fs_read", {"path": "pipe"}), ("fs_write", {"path": "pipe", "content": "x"}),
                       ("fs_write", {"path": "pipe", "content": "x", "append": True}),
                       ("fs_search", {"pattern": "x", "path": "pipe"})]:
        outcome = await asyncio.wait_for(executor.execute(CTX, call(tool, **args)), 2)
        assert outcome.status is ToolStatus.DENIED and outcome.error_reason == "NOT_A_REGULAR_FILE", tool
        assert outcome.request_error.field == "arguments.path" and "FIFO" in outcome.error_message
    assert stat.S_ISFIFO(os.lstat(root / "pipe").st_mode)  # not replaced by the write
    found = await asyncio.wait_for(executor.execute(CTX, call("fs_search", pattern="needle")), 2)
    assert found.content.text == "note.txt:1:needle"  # the walk skips the FIFO without opening it


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
async def test_a_device_node_is_refused(executor, workspace_base: Path) -> None:  # type: ignore[no-untyped-def]
    root = workspace_of(workspace_base)
    os.mknod(root / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    outcome = await executor.execute(CTX, call("fs_read", path="null"))
    assert outcome.status is ToolStatus.DENIED and outcome.error_reason == "NOT_A_REGULAR_FILE"
    assert "character device" in outcome.error_message


async def test_reading_a_file_through_a_file_is_a_tool_error(executor, workspace_base: Path) -> None:  # type: ignore[no-untyped-def]
    (workspace_of(workspace_base) / "a.txt").write_text("x")
    outcome = await executor.execute(CTX, call("fs_read", path="a.txt/b"))
    assert outcome.status is ToolStatus.ERROR and outcome.error_reason == "NOT_A_DIRECTORY"
    listed = await executor.execute(CTX, call("fs_list", path="a.txt"))
    assert listed.status is ToolStatus.ERROR and listed.error_reason == "NOT_A_DIRECTORY"


async def test_write_keeps_the_mode_of_the_file_it_replaces(executor, workspace_base: Path) -> None:  # type: ignore[no-untyped-def]
    root = workspace_of(workspace_base)
    (root / "run.sh").write_text("old")
    (root / "run.sh").chmod(0o755)
    await executor.execute(CTX, call("fs_write", path="run.sh", content="#!/bin/sh\n"))
    assert (root / "run.sh").read_text() == "#!/bin/sh\n" and stat.S_IMODE((root / "run.sh").stat().st_mode) == 0o755
    assert [p.name for p in root.iterdir() if p.name.endswith(".tmp")] == []


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
async def test_new_files_and_directories_belong_to_the_workspace_owner(executor, workspace_base: Path) -> None:  # type: ignore[no-untyped-def]
    root = workspace_of(workspace_base)
    await executor.execute(CTX, call("fs_list"))  # makes the workspace
    os.chown(root, 4242, 4343)  # a session uid of its own, as the sandbox hands out
    for args in [{"path": "a/b/new.txt", "content": "x"}, {"path": "a/log.txt", "content": "x", "append": True}]:
        assert (await executor.execute(CTX, call("fs_write", **args))).status is ToolStatus.OK
    for path in [root / "a", root / "a" / "b", root / "a" / "b" / "new.txt", root / "a" / "log.txt"]:
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (4242, 4343), path


# per-session threads --------------------------------------------------------

async def test_session_threads_bound_one_session_and_not_the_others() -> None:
    threads = SessionThreads(2)
    release = threading.Event()
    started = []

    def stuck(stop: threading.Event) -> str:
        started.append(1)
        release.wait(5)
        return "stuck"

    busy = [asyncio.ensure_future(threads.run("a", stuck)) for _ in range(3)]
    assert await wait_until(lambda: len(started) == 2, 2)
    await asyncio.sleep(0.2)
    assert len(started) == 2  # the third waits for a slot of its session
    other = await asyncio.wait_for(threads.run("b", lambda stop: "other"), 1)
    assert other == "other"
    release.set()
    assert await asyncio.wait_for(asyncio.gather(*busy), 2) == ["stuck"] * 3
    assert threads.sessions == {}


async def test_a_session_whose_slots_are_held_by_abandoned_threads_is_refused() -> None:
    threads = SessionThreads(2)
    release = threading.Event()
    for _ in range(2):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(threads.run("a", lambda stop: release.wait(5)), 0.1)
    with pytest.raises(ResourceExhausted) as err:
        await threads.run("a", lambda stop: "never")
    assert err.value.reason == "SESSION_BUSY"
    assert await asyncio.wait_for(threads.run("b", lambda stop: "fine"), 1) == "fine"
    release.set()
    assert await wait_until(lambda: "a" not in threads.sessions, 2)  # the stuck threads returned their slots
    assert await asyncio.wait_for(threads.run("a", lambda stop: "back"), 2) == "back"


async def test_a_stuck_file_tool_times_out_and_leaves_other_sessions_alone(workspace_base: Path) -> None:
    executor = make_executor(workspace_base, cache_ttl_s=0)
    file_tools = FileTools(1024, max_concurrent_per_session=1)
    release = threading.Event()

    def hang(args, ctx):  # type: ignore[no-untyped-def]
        return file_tools.threads.run((ctx.tenant_id, ctx.session_id), lambda stop: release.wait(10))

    executor.registry.add(ToolSpec(name="hang", description="", parameters_schema={"type": "object"},
                                   handler=hang, timeout_ms=200))
    for spec in file_tools.specs():  # the same tools, with one slot per session
        executor.registry.add(spec)
    root = workspace_of(workspace_base)
    root.mkdir(parents=True)
    (root / "a.txt").write_text("a")
    try:
        outcome = await asyncio.wait_for(executor.execute(CTX, call("hang")), 2)
        assert outcome.status is ToolStatus.TIMEOUT
        refused = await asyncio.wait_for(executor.execute(CTX, call("fs_read", path="a.txt")), 2)
        assert refused.status is ToolStatus.UNAVAILABLE and refused.error_reason == "SESSION_BUSY"
        assert isinstance(refused.request_error, ResourceExhausted)  # ExecuteTool: RESOURCE_EXHAUSTED
        other = replace(CTX, session_id="s2")
        (workspace_base / "acme" / "s2").mkdir()
        (workspace_base / "acme" / "s2" / "a.txt").write_text("b")
        read = await asyncio.wait_for(executor.execute(other, call("fs_read", path="a.txt")), 2)
        assert read.status is ToolStatus.OK and read.content.text == "b"
    finally:
        release.set()


async def test_text_that_is_not_valid_unicode_is_invalid_not_a_crash(executor) -> None:  # type: ignore[no-untyped-def]
    for args in [{"path": "a\udc00\ud800.txt", "content": "x"}, {"path": "a.txt", "content": "\ud800"}]:
        outcome = await executor.execute(CTX, call("fs_write", **args))
        assert outcome.status is ToolStatus.INVALID, outcome
    outcome = await executor.execute(CTX, call("fs_read", path="\ud800"))
    assert outcome.status is ToolStatus.INVALID and outcome.request_error.field == "arguments.path"
