"""fs_read, fs_write, fs_list, fs_search: file tools confined to the session workspace."""
from __future__ import annotations

import asyncio
import fnmatch
import os
import re
import stat
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument
from services.tools.core.model import RiskLevel, ToolContext, ToolOutput, ToolSpec
from services.tools.core.output import CapturedText

SEARCH_SKIP_BYTES = 4 * 1024 * 1024  # bigger files are not searched: logs and blobs, not code
BINARY_SNIFF_BYTES = 8192


def _failed(reason: str, message: str) -> ToolOutput:
    return ToolOutput(ok=False, exit_code=1, error_reason=reason, error_message=message)


def _open_no_follow(path: Path, flags: int, mode: int = 0o644) -> int:
    # The path was resolved already; O_NOFOLLOW refuses a symlink swapped in since.
    return os.open(path, flags | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), mode)


class FileTools:
    def __init__(self, max_read_bytes: int, owner_uid: int | None = None, owner_gid: int | None = None) -> None:
        self.max_read_bytes = max_read_bytes
        self.owner_uid = owner_uid
        self.owner_gid = owner_gid

    def specs(self) -> list[ToolSpec]:
        return [
            ToolSpec(
                name="fs_read", handler=self.read, state_token=self.read_state, idempotent=True, retryable=True,
                risk_level=RiskLevel.READ_ONLY, timeout_ms=10_000,
                description="Read a text file of the workspace. Long files come back as head and tail; "
                            "use offset/limit (bytes) to page through them.",
                parameters_schema={
                    "type": "object", "additionalProperties": False, "required": ["path"],
                    "properties": {
                        "path": {"type": "string", "minLength": 1, "description": "Path relative to the workspace"},
                        "offset": {"type": "integer", "minimum": 0},
                        "limit": {"type": "integer", "minimum": 1},
                    }}),
            ToolSpec(
                name="fs_write", handler=self.write, risk_level=RiskLevel.WRITE, timeout_ms=10_000,
                description="Write (or append) text to a file of the workspace, creating parent directories.",
                parameters_schema={
                    "type": "object", "additionalProperties": False, "required": ["path", "content"],
                    "properties": {
                        "path": {"type": "string", "minLength": 1},
                        "content": {"type": "string"},
                        "append": {"type": "boolean"},
                    }}),
            ToolSpec(
                name="fs_list", handler=self.list, state_token=self.list_state, idempotent=True, retryable=True,
                risk_level=RiskLevel.READ_ONLY, timeout_ms=10_000,
                description="List a directory of the workspace: 'd name/' for directories, 'f name size' for files.",
                parameters_schema={
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "path": {"type": "string", "minLength": 1},
                        "recursive": {"type": "boolean"},
                        "max_entries": {"type": "integer", "minimum": 1, "maximum": 10_000},
                    }}),
            ToolSpec(
                name="fs_search", handler=self.search, idempotent=True, retryable=True,
                risk_level=RiskLevel.READ_ONLY, timeout_ms=30_000,
                description="Search text files of the workspace for a regular expression; "
                            "lines come back as 'path:line:text'.",
                parameters_schema={
                    "type": "object", "additionalProperties": False, "required": ["pattern"],
                    "properties": {
                        "pattern": {"type": "string", "minLength": 1},
                        "path": {"type": "string", "minLength": 1},
                        "glob": {"type": "string", "minLength": 1},
                        "ignore_case": {"type": "boolean"},
                        "max_matches": {"type": "integer", "minimum": 1, "maximum": 10_000},
                    }}),
        ]

    # fs_read ---------------------------------------------------------------

    async def read_state(self, args: dict[str, Any], ctx: ToolContext) -> str | None:
        real = ctx.workspace.resolve(args["path"], "arguments.path")
        try:
            st = await asyncio.to_thread(os.stat, real)
        except OSError:
            return None  # a missing file is not worth caching
        return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"

    async def read(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        real = ctx.workspace.resolve(args["path"], "arguments.path")
        return await asyncio.to_thread(self._read_sync, real, args, ctx.output_cap_bytes)

    def _read_sync(self, real: Path, args: dict[str, Any], cap: int) -> ToolOutput:
        offset = args.get("offset", 0)
        try:
            fd = _open_no_follow(real, os.O_RDONLY)
        except FileNotFoundError:
            return _failed("FILE_NOT_FOUND", f"{args['path']}: no such file")
        except IsADirectoryError:
            return _failed("NOT_A_FILE", f"{args['path']}: is a directory")
        except OSError as exc:
            return _failed("READ_FAILED", f"{args['path']}: {exc.strerror}")
        # O_RDONLY opens a directory without complaint; reading it would raise.
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            os.close(fd)
            return _failed("NOT_A_FILE", f"{args['path']}: is a directory")
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                return _failed("NOT_A_FILE", f"{args['path']}: not a regular file")
            limit = args.get("limit")
            if limit is None and st.st_size - offset > self.max_read_bytes:
                return _failed("FILE_TOO_LARGE", f"{args['path']}: {st.st_size} bytes; read it in pieces "
                                                 f"with offset/limit (at most {self.max_read_bytes} bytes at once)")
            f.seek(offset)
            data = f.read(min(limit or self.max_read_bytes, self.max_read_bytes))
        return ToolOutput(ok=True, content=CapturedText.of(data, cap))

    # fs_write --------------------------------------------------------------

    async def write(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        real = ctx.workspace.resolve(args["path"], "arguments.path")
        if real == ctx.workspace.root:
            raise InvalidArgument("arguments.path: names the workspace itself, not a file", field="arguments.path")
        return await asyncio.to_thread(self._write_sync, real, args, ctx)

    def _write_sync(self, real: Path, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        data = args["content"].encode("utf-8")
        self._make_parents(real.parent, ctx)
        try:
            if args.get("append"):
                fd = _open_no_follow(real, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
            else:
                # Write a sibling then rename, so readers never see half a file.
                tmp = real.with_name(f".{real.name}.{os.getpid()}.tmp")
                fd = _open_no_follow(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                os.replace(tmp, real)
            self._chown(real)
        except IsADirectoryError:
            return _failed("NOT_A_FILE", f"{args['path']}: is a directory")
        except OSError as exc:
            return _failed("WRITE_FAILED", f"{args['path']}: {exc.strerror}")
        verb = "appended" if args.get("append") else "wrote"
        return ToolOutput(ok=True, content=CapturedText.of(
            f"{verb} {len(data)} bytes to {ctx.workspace.relative(real)}", ctx.output_cap_bytes))

    def _make_parents(self, parent: Path, ctx: ToolContext) -> None:
        missing = []
        while not parent.exists() and parent != ctx.workspace.root:
            missing.append(parent)
            parent = parent.parent
        for directory in reversed(missing):
            directory.mkdir(exist_ok=True)
            self._chown(directory)

    def _chown(self, path: Path) -> None:
        if self.owner_uid is not None:
            os.chown(path, self.owner_uid, self.owner_gid if self.owner_gid is not None else -1, follow_symlinks=False)

    # fs_list ---------------------------------------------------------------

    async def list_state(self, args: dict[str, Any], ctx: ToolContext) -> str | None:
        if args.get("recursive"):
            return None  # nested changes do not touch the top directory's mtime
        real = ctx.workspace.resolve(args.get("path", "."), "arguments.path")
        try:
            st = await asyncio.to_thread(os.stat, real)
        except OSError:
            return None
        return f"{st.st_ino}:{st.st_mtime_ns}"

    async def list(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        real = ctx.workspace.resolve(args.get("path", "."), "arguments.path")
        return await asyncio.to_thread(self._list_sync, real, args, ctx)

    def _list_sync(self, real: Path, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        if not real.is_dir():
            return _failed("NOT_A_DIRECTORY", f"{args.get('path', '.')}: not a directory")
        max_entries = args.get("max_entries", 1000)
        lines: list[str] = []
        for dirpath, dirnames, filenames in os.walk(real):
            dirnames.sort()
            base = Path(dirpath)
            for name in dirnames + sorted(filenames):
                path = base / name
                rel = path.relative_to(real).as_posix()
                st = path.lstat()
                if stat.S_ISLNK(st.st_mode):
                    lines.append(f"l {rel} -> {os.readlink(path)}")
                elif stat.S_ISDIR(st.st_mode):
                    lines.append(f"d {rel}/")
                else:
                    lines.append(f"f {rel} {st.st_size}")
                if len(lines) >= max_entries:
                    break
            if not args.get("recursive") or len(lines) >= max_entries:
                break
        if not args.get("recursive"):
            lines.sort(key=lambda line: line[2:])
        more = "\n[listing stopped at max_entries]" if len(lines) >= max_entries else ""
        return ToolOutput(ok=True, content=CapturedText.of("\n".join(lines) + more, ctx.output_cap_bytes))

    # fs_search -------------------------------------------------------------

    async def search(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        try:
            pattern = re.compile(args["pattern"], re.IGNORECASE if args.get("ignore_case") else 0)
        except re.error as exc:
            raise InvalidArgument(f"arguments.pattern: not a valid regular expression: {exc}",
                                  field="arguments.pattern") from None
        real = ctx.workspace.resolve(args.get("path", "."), "arguments.path")
        return await asyncio.to_thread(self._search_sync, real, pattern, args, ctx)

    def _search_sync(self, real: Path, pattern: re.Pattern[str], args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        glob = args.get("glob", "*")
        max_matches = args.get("max_matches", 200)
        files = [real] if real.is_file() else sorted(
            Path(d) / f for d, _dirs, fs in os.walk(real) for f in fs)  # os.walk does not follow symlinks
        matches: list[str] = []
        for path in files:
            if not fnmatch.fnmatch(path.name, glob) or path.is_symlink():
                continue
            try:
                if path.stat().st_size > SEARCH_SKIP_BYTES:
                    continue
                data = path.read_bytes()
            except OSError:
                continue
            if b"\x00" in data[:BINARY_SNIFF_BYTES]:
                continue
            rel = ctx.workspace.relative(path)
            for lineno, line in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
                if pattern.search(line):
                    matches.append(f"{rel}:{lineno}:{line}")
                    if len(matches) >= max_matches:
                        break
            if len(matches) >= max_matches:
                break
        if not matches:
            return ToolOutput(ok=True, exit_code=1, content=CapturedText.of("no matches", ctx.output_cap_bytes))
        return ToolOutput(ok=True, content=CapturedText.of("\n".join(matches), ctx.output_cap_bytes))
