"""fs_read, fs_write, fs_list, fs_search: file tools confined to the session workspace.

Every path is walked from a descriptor of the workspace root, one component
at a time with O_NOFOLLOW (``Workspace.open_dir``), and every file is opened
relative to its parent directory's descriptor: no string path is looked up
again after a check, so a directory swapped for a symlink by the sandboxed
code is refused, never followed. Special files (FIFOs, sockets, devices) are
refused from an lstat before any open, and opens use O_NONBLOCK so a swap
after the lstat cannot block either. The blocking work runs on
``SessionThreads``: daemon threads, a few per session.
"""
from __future__ import annotations

import errno
import fcntl
import fnmatch
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterator
from typing import Any

from services.common.errors import InvalidArgument, PermissionDenied
from services.tools.core.executor import SessionThreads
from services.tools.core.model import RiskLevel, ToolContext, ToolOutput, ToolSpec
from services.tools.core.output import CapturedText
from services.tools.core.workspace import Workspace, disk_usage, is_symlink_at, split_beneath, symlink_refused

SEARCH_SKIP_BYTES = 4 * 1024 * 1024  # bigger files are not searched: logs and blobs, not code
BINARY_SNIFF_BYTES = 8192
MAX_WALK_DEPTH = 64  # fs_list/fs_search do not go deeper (one descriptor is open per level)
DEFAULT_MAX_CONCURRENT_PER_SESSION = 4
FIELD = "arguments.path"

# O_NONBLOCK: opening a FIFO swapped in after the lstat returns at once instead of waiting for a writer.
_OPEN_FLAGS = os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
_LIST_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device"}


class _Failed(Exception):
    """A tool error (the call ran, the answer is no): becomes an ok=False ToolOutput."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.output = ToolOutput(ok=False, exit_code=1, error_reason=reason, error_message=message)


class _Stopped(Exception):
    """The caller gave up (timeout, cancel): stop walking."""


def _check_kind(st: os.stat_result, parts: tuple[str, ...], shown: str) -> None:
    """Refuse anything but a regular file, from its lstat or fstat."""
    mode = st.st_mode
    if stat.S_ISREG(mode):
        return
    if stat.S_ISLNK(mode):
        raise symlink_refused(FIELD, shown, "/".join(parts))
    if stat.S_ISDIR(mode):
        raise _Failed("NOT_A_FILE", f"{shown}: is a directory")
    kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
    raise PermissionDenied(f"{FIELD}: {shown!r} is {kind}; file tools only open regular files and directories",
                           reason="NOT_A_REGULAR_FILE", field=FIELD)


def _open_file(parent: int, parts: tuple[str, ...], shown: str, flags: int) -> int:
    """A descriptor of the existing regular file ``parts[-1]`` in ``parent``, in blocking mode."""
    name = parts[-1]
    _check_kind(os.stat(name, dir_fd=parent, follow_symlinks=False), parts, shown)
    try:
        fd = os.open(name, flags | _OPEN_FLAGS, dir_fd=parent)
    except OSError as exc:
        if exc.errno == errno.ELOOP or is_symlink_at(parent, name):
            raise symlink_refused(FIELD, shown, "/".join(parts)) from None
        if exc.errno == errno.EISDIR:
            raise _Failed("NOT_A_FILE", f"{shown}: is a directory") from None
        if exc.errno == errno.ENXIO:  # a FIFO without a reader, swapped in after the lstat
            raise PermissionDenied(f"{FIELD}: {shown!r} is a FIFO; file tools only open regular files "
                                   "and directories", reason="NOT_A_REGULAR_FILE", field=FIELD) from None
        raise
    try:
        _check_kind(os.fstat(fd), parts, shown)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _create_file(parent: int, name: str, flags: int, mode: int, owner: tuple[int, int] | None) -> int:
    """A new regular file ``name`` in ``parent``: O_EXCL, so nothing already there is opened."""
    fd = os.open(name, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=parent)
    try:
        if owner is not None:
            os.fchown(fd, *owner)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _lstat_or_none(parent: int, name: str) -> os.stat_result | None:
    try:
        return os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return None


class _Walk:
    """Entries below a directory descriptor, depth first by name, never through a symlink."""

    def __init__(self, stop: threading.Event) -> None:
        self.stop = stop
        self.too_deep: list[str] = []

    def entries(self, dir_fd: int, prefix: str, recursive: bool,
                depth: int = 0) -> Iterator[tuple[str, os.stat_result, int, str]]:
        """(relative path, lstat, parent descriptor, name) of each entry."""
        listing = os.open(".", _LIST_FLAGS, dir_fd=dir_fd)
        try:
            found: list[tuple[str, os.stat_result]] = []
            with os.scandir(listing) as it:
                for entry in it:
                    try:
                        found.append((entry.name, entry.stat(follow_symlinks=False)))
                    except OSError:
                        continue  # removed since the directory was read
        finally:
            os.close(listing)
        for name, st in sorted(found, key=lambda item: item[0]):
            if self.stop.is_set():
                raise _Stopped()
            rel = prefix + name
            yield rel, st, dir_fd, name
            if not (recursive and stat.S_ISDIR(st.st_mode)):
                continue
            if depth + 1 >= MAX_WALK_DEPTH:
                self.too_deep.append(rel)
                continue
            try:
                sub = os.open(name, _LIST_FLAGS, dir_fd=dir_fd)
            except OSError:
                continue  # replaced (by a symlink, say) since it was listed: not followed
            try:
                yield from self.entries(sub, rel + "/", recursive, depth + 1)
            finally:
                os.close(sub)


class FileTools:
    """The four file tools.

    Files and directories they create belong to the workspace root's owner
    when the service runs as root (each session's sandbox user); on a root
    owned by root, to ``owner_uid``/``owner_gid`` when given.
    """

    def __init__(self, max_read_bytes: int, owner_uid: int | None = None, owner_gid: int | None = None, *,
                 max_concurrent_per_session: int = DEFAULT_MAX_CONCURRENT_PER_SESSION,
                 threads: SessionThreads | None = None, workspace_quota_bytes: int = 0) -> None:
        self.max_read_bytes = max_read_bytes
        self.workspace_quota_bytes = workspace_quota_bytes
        self.owner_uid = owner_uid
        self.owner_gid = owner_gid
        self.threads = threads or SessionThreads(max_concurrent_per_session, name="fs")

    def close(self) -> None:
        self.threads.close()

    def specs(self) -> list[ToolSpec]:
        path = {"type": "string", "minLength": 1, "description": "Path relative to the workspace"}
        return [
            ToolSpec(
                name="fs_read", handler=self.read, state_token=self.read_state, idempotent=True, retryable=True,
                risk_level=RiskLevel.READ_ONLY, timeout_ms=10_000,
                description="Read a text file of the workspace. Long files come back as head and tail; "
                            "use offset/limit (bytes) to page through them.",
                parameters_schema={
                    "type": "object", "additionalProperties": False, "required": ["path"],
                    "properties": {"path": path, "offset": {"type": "integer", "minimum": 0},
                                   "limit": {"type": "integer", "minimum": 1}}}),
            ToolSpec(
                name="fs_write", handler=self.write, risk_level=RiskLevel.WRITE, timeout_ms=10_000,
                description="Write (or append) text to a file of the workspace, creating parent directories.",
                parameters_schema={
                    "type": "object", "additionalProperties": False, "required": ["path", "content"],
                    "properties": {"path": {"type": "string", "minLength": 1}, "content": {"type": "string"},
                                   "append": {"type": "boolean"}}}),
            ToolSpec(
                name="fs_list", handler=self.list, state_token=self.list_state, idempotent=True, retryable=True,
                risk_level=RiskLevel.READ_ONLY, timeout_ms=10_000,
                description="List a directory of the workspace: 'd name/' for directories, 'f name size' for files.",
                parameters_schema={
                    "type": "object", "additionalProperties": False,
                    "properties": {"path": {"type": "string", "minLength": 1}, "recursive": {"type": "boolean"},
                                   "max_entries": {"type": "integer", "minimum": 1, "maximum": 10_000}}}),
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

    async def _run(self, ctx: ToolContext, shown: str, failed_reason: str,
                   work: Callable[[threading.Event, int], Any]) -> Any:
        """``work(stop, root_fd)`` on this session's threads; OS errors become tool errors."""
        workspace: Workspace = ctx.workspace

        def body(stop: threading.Event) -> Any:
            try:
                root_fd = workspace.open_root()
                try:
                    return work(stop, root_fd)
                finally:
                    os.close(root_fd)
            except _Failed as failed:
                return failed.output
            except FileNotFoundError:
                return _Failed("FILE_NOT_FOUND", f"{shown}: no such file or directory").output
            except NotADirectoryError as exc:
                return _Failed("NOT_A_DIRECTORY", f"{shown}: {exc.filename or shown} is not a directory").output
            except IsADirectoryError:
                return _Failed("NOT_A_FILE", f"{shown}: is a directory").output
            except OSError as exc:
                return _Failed(failed_reason, f"{shown}: {exc.strerror or exc}").output

        return await self.threads.run((ctx.tenant_id, ctx.session_id), body)

    def _owner(self, root_fd: int) -> tuple[int, int] | None:
        if os.geteuid() != 0:
            return None  # what we create is ours, as the workspace is
        st = os.fstat(root_fd)
        if st.st_uid != 0:
            return st.st_uid, st.st_gid
        if self.owner_uid is not None:
            return self.owner_uid, self.owner_gid if self.owner_gid is not None else -1
        return None

    # fs_read ---------------------------------------------------------------

    async def read_state(self, args: dict[str, Any], ctx: ToolContext) -> str | None:
        parts = split_beneath(args["path"], FIELD)
        if not parts:
            return None

        def state(_stop: threading.Event, root_fd: int) -> str | None:
            parent = ctx.workspace.open_dir(root_fd, parts[:-1], FIELD, args["path"])
            try:
                st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(parent)
            return f"{st.st_ino}:{st.st_size}:{st.st_mtime_ns}" if stat.S_ISREG(st.st_mode) else None

        token = await self._run(ctx, args["path"], "READ_FAILED", state)
        return token if isinstance(token, str) else None  # a failure is not worth caching

    async def read(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        parts = split_beneath(args["path"], FIELD)
        shown, offset, limit = args["path"], args.get("offset", 0), args.get("limit")

        def read(_stop: threading.Event, root_fd: int) -> ToolOutput:
            if not parts:
                raise _Failed("NOT_A_FILE", f"{shown}: is a directory")
            parent = ctx.workspace.open_dir(root_fd, parts[:-1], FIELD, shown)
            try:
                fd = _open_file(parent, parts, shown, os.O_RDONLY)
            finally:
                os.close(parent)
            with os.fdopen(fd, "rb") as f:
                size = os.fstat(fd).st_size
                if limit is None and size - offset > self.max_read_bytes:
                    raise _Failed("FILE_TOO_LARGE", f"{shown}: {size} bytes; read it in pieces with "
                                                    f"offset/limit (at most {self.max_read_bytes} bytes at once)")
                f.seek(offset)
                data = f.read(min(limit or self.max_read_bytes, self.max_read_bytes))
            return ToolOutput(ok=True, content=CapturedText.of(data, ctx.output_cap_bytes))

        return await self._run(ctx, shown, "READ_FAILED", read)

    # fs_write --------------------------------------------------------------

    async def write(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        parts = split_beneath(args["path"], FIELD)
        if not parts:
            raise InvalidArgument(f"{FIELD}: names the workspace itself, not a file", field=FIELD)
        try:
            data = args["content"].encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidArgument("arguments.content: not valid text (a lone surrogate)",
                                  field="arguments.content") from None
        shown, append = args["path"], bool(args.get("append"))

        def write(stop: threading.Event, root_fd: int) -> ToolOutput:
            # The quota is measured and the file written under the session's lock:
            # two writes (on this replica or another) cannot both pass one measurement.
            with ctx.workspace.locked():
                if stop.is_set():  # the call timed out waiting for the lock: write nothing
                    return ToolOutput(ok=False, exit_code=1, error_reason="TIMEOUT",
                                      error_message="gave up waiting for the session's lock")
                if self.workspace_quota_bytes > 0 and \
                        disk_usage(ctx.workspace.root) + len(data) > self.workspace_quota_bytes:
                    return ToolOutput(ok=False, exit_code=1, error_reason="WORKSPACE_QUOTA_EXCEEDED",
                                      error_message=f"the workspace would pass its quota of "
                                                    f"{self.workspace_quota_bytes} bytes; delete files first")
                owner = self._owner(root_fd)
                parent = ctx.workspace.open_dir(root_fd, parts[:-1], FIELD, shown, create=True, owner=owner)
                try:
                    self._write_in(parent, parts, shown, data, append, owner)
                finally:
                    os.close(parent)
            verb = "appended" if append else "wrote"
            return ToolOutput(ok=True, content=CapturedText.of(
                f"{verb} {len(data)} bytes to {'/'.join(parts)}", ctx.output_cap_bytes))

        return await self._run(ctx, shown, "WRITE_FAILED", write)

    @staticmethod
    def _write_in(parent: int, parts: tuple[str, ...], shown: str, data: bytes, append: bool,
                  owner: tuple[int, int] | None) -> None:
        name = parts[-1]
        existing = _lstat_or_none(parent, name)
        if existing is not None:
            _check_kind(existing, parts, shown)
        if append:
            try:
                fd = _create_file(parent, name, os.O_WRONLY | os.O_APPEND, 0o644, owner) if existing is None \
                    else _open_file(parent, parts, shown, os.O_WRONLY | os.O_APPEND)
            except FileExistsError:  # made since the lstat: append to it, if it is a file
                fd = _open_file(parent, parts, shown, os.O_WRONLY | os.O_APPEND)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            return
        # Write a sibling then rename it over, so readers never see half a file.
        tmp = f".{secrets.token_hex(8)}.fs_write.tmp"
        mode = stat.S_IMODE(existing.st_mode) & 0o777 if existing is not None else 0o644
        fd = _create_file(parent, tmp, os.O_WRONLY, mode, owner)
        try:
            try:
                _write_all(fd, data)
                os.fchmod(fd, mode)  # the umask is not the existing file's mode
            finally:
                os.close(fd)
            os.replace(tmp, name, src_dir_fd=parent, dst_dir_fd=parent)
        except BaseException:
            try:
                os.unlink(tmp, dir_fd=parent)
            except OSError:
                pass
            raise

    # fs_list ---------------------------------------------------------------

    async def list_state(self, args: dict[str, Any], ctx: ToolContext) -> str | None:
        if args.get("recursive"):
            return None  # nested changes do not touch the top directory's mtime
        path = args.get("path", ".")
        parts = split_beneath(path, FIELD)

        def state(_stop: threading.Event, root_fd: int) -> str:
            fd = ctx.workspace.open_dir(root_fd, parts, FIELD, path)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            return f"{st.st_ino}:{st.st_mtime_ns}"

        token = await self._run(ctx, path, "LIST_FAILED", state)
        return token if isinstance(token, str) else None

    async def list(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        path = args.get("path", ".")
        parts = split_beneath(path, FIELD)
        max_entries, recursive = args.get("max_entries", 1000), bool(args.get("recursive"))

        def listing(stop: threading.Event, root_fd: int) -> ToolOutput:
            try:
                fd = ctx.workspace.open_dir(root_fd, parts, FIELD, path)
            except NotADirectoryError:
                raise _Failed("NOT_A_DIRECTORY", f"{path}: not a directory") from None
            walk = _Walk(stop)
            lines: list[str] = []
            try:
                for rel, st, dir_fd, name in walk.entries(fd, "", recursive):
                    lines.append(_list_line(rel, st, dir_fd, name))
                    if len(lines) >= max_entries:
                        break
            finally:
                os.close(fd)
            more = "\n[listing stopped at max_entries]" if len(lines) >= max_entries else ""
            more += "".join(f"\n[{rel}/: deeper than {MAX_WALK_DEPTH} levels, not listed]" for rel in walk.too_deep)
            return ToolOutput(ok=True, content=CapturedText.of("\n".join(lines) + more, ctx.output_cap_bytes))

        return await self._run(ctx, path, "LIST_FAILED", _stoppable(listing))

    # fs_search -------------------------------------------------------------

    async def search(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        try:
            pattern = re.compile(args["pattern"], re.IGNORECASE if args.get("ignore_case") else 0)
        except re.error as exc:
            raise InvalidArgument(f"arguments.pattern: not a valid regular expression: {exc}",
                                  field="arguments.pattern") from None
        path = args.get("path", ".")
        parts = split_beneath(path, FIELD)
        glob, max_matches = args.get("glob", "*"), args.get("max_matches", 200)

        def search(stop: threading.Event, root_fd: int) -> ToolOutput:
            matches: list[str] = []
            for rel, text in self._search_files(stop, ctx.workspace, root_fd, parts, path, glob):
                for lineno, line in enumerate(text.splitlines(), 1):
                    if pattern.search(line):
                        matches.append(f"{rel}:{lineno}:{line}")
                        if len(matches) >= max_matches:
                            break
                if len(matches) >= max_matches:
                    break
            if not matches:
                return ToolOutput(ok=True, exit_code=1, content=CapturedText.of("no matches", ctx.output_cap_bytes))
            return ToolOutput(ok=True, content=CapturedText.of("\n".join(matches), ctx.output_cap_bytes))

        return await self._run(ctx, path, "SEARCH_FAILED", _stoppable(search))

    @staticmethod
    def _search_files(stop: threading.Event, workspace: Workspace, root_fd: int, parts: tuple[str, ...],
                      shown: str, glob: str) -> Iterator[tuple[str, str]]:
        """(workspace-relative path, text) of each text file to search, by path."""
        if parts:
            parent = workspace.open_dir(root_fd, parts[:-1], FIELD, shown)
            try:
                st = os.stat(parts[-1], dir_fd=parent, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):  # one file: refused if it is not a regular one
                    _check_kind(st, parts, shown)
                    text = _text_of(parent, parts[-1], glob, strict=(parts, shown))
                    if text is not None:
                        yield "/".join(parts), text
                    return
            finally:
                os.close(parent)
        top = workspace.open_dir(root_fd, parts, FIELD, shown)
        prefix = "/".join(parts) + "/" if parts else ""
        try:
            for rel, st, dir_fd, name in _Walk(stop).entries(top, prefix, recursive=True):
                if stat.S_ISREG(st.st_mode) and st.st_size <= SEARCH_SKIP_BYTES:
                    text = _text_of(dir_fd, name, glob)
                    if text is not None:
                        yield rel, text
        finally:
            os.close(top)


def _text_of(dir_fd: int, name: str, glob: str, strict: tuple[tuple[str, ...], str] | None = None) -> str | None:
    """The text of the regular file ``name``, or None for one not searched (glob, size, binary, gone)."""
    if not fnmatch.fnmatch(name, glob):
        return None
    try:
        fd = _open_file(dir_fd, strict[0] if strict else (name,), strict[1] if strict else name, os.O_RDONLY)
    except (OSError, PermissionDenied, _Failed):
        if strict:
            raise
        return None  # swapped for a symlink or a special file since it was listed: skipped
    with os.fdopen(fd, "rb") as f:
        data = f.read(SEARCH_SKIP_BYTES + 1)
    if len(data) > SEARCH_SKIP_BYTES or b"\x00" in data[:BINARY_SNIFF_BYTES]:
        return None
    return data.decode("utf-8", "replace")


def _list_line(rel: str, st: os.stat_result, dir_fd: int, name: str) -> str:
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        try:
            target = os.readlink(name, dir_fd=dir_fd)
        except OSError:
            target = "?"
        return f"l {rel} -> {target}"
    if stat.S_ISDIR(mode):
        return f"d {rel}/"
    if stat.S_ISREG(mode):
        return f"f {rel} {st.st_size}"
    return f"o {rel} {_KINDS.get(stat.S_IFMT(mode), 'special file').split(' ', 1)[1]}"


def _stoppable(work: Callable[[threading.Event, int], ToolOutput]) -> Callable[[threading.Event, int], ToolOutput]:
    def run(stop: threading.Event, root_fd: int) -> ToolOutput:
        try:
            return work(stop, root_fd)
        except _Stopped:
            return _Failed("CANCELLED", "stopped: the call was given up").output
    return run

