"""Built-in file tools, confined to the session workspace."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.tools.core.model import ToolStatus
from tests.tools.conftest import CTX, call, make_executor, workspace_of


@pytest.fixture
def executor(workspace_base: Path):  # type: ignore[no-untyped-def]
    executor = make_executor(workspace_base, cache_ttl_s=0)
    root = workspace_of(workspace_base)
    root.mkdir(parents=True)
    (workspace_base / "outside.txt").write_text("top secret")
    os.symlink(workspace_base / "outside.txt", root / "escape_link")
    os.symlink("/proc/self", root / "proc_link")
    return executor


ESCAPES = ["../outside.txt", "../../acme/../outside.txt", str(Path("/etc/passwd")), "/proc/self/environ",
           "escape_link", "proc_link/environ"]


@pytest.mark.parametrize("path", ESCAPES)
async def test_read_escapes_are_denied(executor, path: str) -> None:  # type: ignore[no-untyped-def]
    outcome = await executor.execute(CTX, call("fs_read", path=path))
    assert outcome.status is ToolStatus.DENIED and outcome.error_reason == "PATH_OUTSIDE_WORKSPACE"
    assert "top secret" not in outcome.content.text and outcome.content.text == ""
    assert outcome.request_error is not None and outcome.request_error.field == "arguments.path"


@pytest.mark.parametrize("path", ["../planted.txt", "/tmp/planted.txt", "escape_link"])
async def test_write_escapes_are_denied_and_write_nothing(executor, workspace_base: Path, path: str) -> None:  # type: ignore[no-untyped-def]
    outcome = await executor.execute(CTX, call("fs_write", path=path, content="pwned"))
    assert outcome.status is ToolStatus.DENIED
    assert (workspace_base / "outside.txt").read_text() == "top secret"
    assert not (workspace_base / "acme" / "planted.txt").exists()


@pytest.mark.parametrize("tool,args", [("fs_list", {"path": ".."}), ("fs_search", {"pattern": "secret", "path": "/"}),
                                       ("shell_exec", {"command": "pwd", "cwd": "../.."})])
async def test_other_tools_refuse_escapes_too(executor, tool: str, args: dict) -> None:  # type: ignore[no-untyped-def]
    outcome = await executor.execute(CTX, call(tool, **args))
    assert outcome.status is ToolStatus.DENIED and outcome.error_reason == "PATH_OUTSIDE_WORKSPACE"


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
