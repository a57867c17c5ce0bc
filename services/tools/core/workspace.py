"""Per-session workspace roots and the path confinement every file tool uses."""
from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgument, PermissionDenied
from services.tools.core.locks import THREAD_LOCKS, FileLock

# Tenant and session ids become path components: keep them boring.
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def check_id(value: str, field: str) -> str:
    if not _ID.match(value) or value in (".", ".."):
        raise InvalidArgument(
            f"{field}: must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}, got {value!r}", field=field)
    return value


# Directories on the way to a path are opened one by one, each relative to the
# previous one and never looked up again by name. O_NOFOLLOW|O_DIRECTORY makes
# the kernel refuse a symlink (or anything but a directory) in the same step
# as the lookup, so nothing swapped in after a check is ever followed. O_PATH
# needs no read permission and never starts a device's or FIFO's open.
DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# Lookups of one component before giving up on one that keeps changing under us.
_COMPONENT_ATTEMPTS = 3


def _check_text(path: object, field: str) -> str:
    if not isinstance(path, str) or "\x00" in path:
        raise InvalidArgument(f"{field}: must be a string without NUL bytes", field=field)
    try:
        os.fsencode(path)
    except UnicodeEncodeError:
        raise InvalidArgument(f"{field}: {path!r} is not valid text for a file name", field=field) from None
    if os.path.isabs(path) or path.startswith("~"):
        raise PermissionDenied(
            f"{field}: {path!r} is absolute; paths are relative to the session workspace",
            reason="PATH_OUTSIDE_WORKSPACE", field=field)
    return path


def split_beneath(path: str, field: str = "path") -> tuple[str, ...]:
    """The components of ``path`` below the workspace root, ``.`` and ``..`` applied to the text.

    ``..`` never climbs above the root (PERMISSION_DENIED,
    ``PATH_OUTSIDE_WORKSPACE``); ``()`` is the root itself.
    """
    parts: list[str] = []
    for part in _check_text(path, field).split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise PermissionDenied(f"{field}: {path!r} resolves outside the session workspace",
                                       reason="PATH_OUTSIDE_WORKSPACE", field=field)
            parts.pop()
        else:
            parts.append(part)
    return tuple(parts)


def symlink_refused(field: str, path: str, through: str) -> PermissionDenied:
    where = f"{path!r} is a symlink" if split_beneath(path, field) == tuple(through.split("/")) \
        else f"{path!r} goes through the symlink {through!r}"
    return PermissionDenied(f"{field}: {where}; file tools do not follow symlinks",
                            reason="SYMLINK_NOT_FOLLOWED", field=field)


def is_symlink_at(dir_fd: int, name: str) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


@dataclass(frozen=True)
class Workspace:
    """A directory a session's tools may touch, and nothing outside it."""

    root: Path  # resolved, absolute
    # The session's lock file, beside the workspace where its commands cannot
    # reach it; None locks within this process only.
    lock_file: Path | None = None

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Holds the session's lock: one holder at a time in every process sharing the root.

        Blocking; call it from a worker thread, never on the event loop.
        """
        if self.lock_file is None:
            with THREAD_LOCKS.hold(str(self.root)):
                yield
        else:
            with FileLock(self.lock_file).hold():
                yield

    def resolve(self, path: str, field: str = "path") -> Path:
        """The real path of ``path`` (relative to the root), or PERMISSION_DENIED.

        Absolute paths (``/etc/passwd``, ``/proc/self/environ``) are refused
        outright; relative ones are resolved through every symlink and ``..``
        and must still land inside the root. A symlink inside the workspace
        pointing out of it is therefore refused too. The answer is a string
        path, checked once: for handing a directory to the sandbox, never for
        opening files (the file tools use ``open_root`` and ``open_dir``).
        """
        _check_text(path, field)
        real = Path(os.path.realpath(self.root / path))
        if real != self.root and self.root not in real.parents:
            raise PermissionDenied(
                f"{field}: {path!r} resolves outside the session workspace",
                reason="PATH_OUTSIDE_WORKSPACE", field=field)
        return real

    def relative(self, real: Path) -> str:
        rel = real.relative_to(self.root).as_posix()
        return rel or "."

    def open_root(self) -> int:
        """An O_PATH descriptor of the root; every other lookup starts from it."""
        return os.open(self.root, DIR_FLAGS)

    def open_dir(self, root_fd: int, parts: Sequence[str], field: str, path: str, *,
                 create: bool = False, owner: tuple[int, int] | None = None) -> int:
        """An O_PATH descriptor of the directory ``parts`` below ``root_fd``.

        Each component is opened relative to its parent's descriptor with
        O_NOFOLLOW: a symlink anywhere is PERMISSION_DENIED
        (``SYMLINK_NOT_FOLLOWED``), whatever it points to and whenever it
        was swapped in. A missing component raises FileNotFoundError, or is
        made (mode 0755, handed to ``owner``) when ``create`` is set; one that
        is not a directory raises NotADirectoryError.
        """
        fd = os.open(".", DIR_FLAGS, dir_fd=root_fd)
        try:
            for depth, name in enumerate(parts):
                child = self._open_component(fd, name, "/".join(parts[:depth + 1]), field, path, create, owner)
                os.close(fd)
                fd = child
            return fd
        except BaseException:
            os.close(fd)
            raise

    def _open_component(self, parent: int, name: str, through: str, field: str, path: str, create: bool,
                        owner: tuple[int, int] | None) -> int:
        for _attempt in range(_COMPONENT_ATTEMPTS):
            try:
                return self._open_child(parent, name, create, owner)
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
            # Not a directory when opened: say why, from what is there now.
            try:
                mode = os.stat(name, dir_fd=parent, follow_symlinks=False).st_mode
            except FileNotFoundError:
                mode = 0
            if stat.S_ISLNK(mode):
                raise symlink_refused(field, path, through)
            if not stat.S_ISDIR(mode):
                break
            # A directory again: swapped back and forth meanwhile; look once more.
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", through)

    @staticmethod
    def _open_child(parent: int, name: str, create: bool, owner: tuple[int, int] | None) -> int:
        try:
            return os.open(name, DIR_FLAGS, dir_fd=parent)
        except FileNotFoundError:
            if not create:
                raise
        try:
            os.mkdir(name, 0o755, dir_fd=parent)
        except FileExistsError:
            return os.open(name, DIR_FLAGS, dir_fd=parent)  # made meanwhile: take it as it is
        # Handed over through a descriptor of the new directory, never by name.
        made = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        try:
            if owner is not None:
                os.fchown(made, *owner)
            return os.open(".", DIR_FLAGS, dir_fd=made)
        finally:
            os.close(made)


# Beside the tenants' folders; ids cannot start with a dot, so no tenant is called this.
LOCKS_DIR = ".locks"
_OPEN_WORKSPACE = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class WorkspaceRoots:
    """``<base>/<tenant_id>/<session_id>``, created on first use.

    ``base`` may be shared by several tools processes (replicas on one
    machine, or on many through a ReadWriteMany volume): a workspace is made
    under its session's lock (``<base>/.locks/<tenant_id>/<session_id>.lock``,
    an flock), so exactly one of them makes it and hands it over, and the
    others take it as it is.

    When the sandbox runs commands as other users (the service is root), a
    new workspace is handed to its owner: a uid of the session's own from
    ``allocate_owner``, or the fixed ``owner_uid``/``owner_gid``. It is made
    private to that owner (0700), so no other session's commands can look in.
    Until then it belongs to root, which is how a workspace whose maker died
    half-way is told from a finished one: the next call finishes it.
    """

    def __init__(self, base: Path, owner_uid: int | None = None, owner_gid: int | None = None, *,
                 allocate_owner: Callable[[], tuple[int, int]] | None = None) -> None:
        self.base = base
        self.owner_uid = owner_uid
        self.owner_gid = owner_gid
        self.allocate_owner = allocate_owner

    @property
    def hands_over(self) -> bool:
        return self.allocate_owner is not None or self.owner_uid not in (None, 0)

    def lock_file(self, tenant_id: str, session_id: str) -> Path:
        return self.base / LOCKS_DIR / tenant_id / f"{session_id}.lock"

    def find(self, tenant_id: str, session_id: str) -> Workspace | None:
        """The session's workspace if it is ready, else None; never blocks on a lock."""
        check_id(tenant_id, "tenant_id")
        check_id(session_id, "session_id")
        path = self.base / tenant_id / session_id
        try:
            info = os.stat(path, follow_symlinks=False)
        except FileNotFoundError:
            return None
        if not stat.S_ISDIR(info.st_mode) or self._unfinished(info):
            return None
        return self._workspace(tenant_id, session_id)

    def for_session(self, tenant_id: str, session_id: str) -> Workspace:
        """The session's workspace, made (under the session's lock) when missing.

        Blocks while another process holds the session's lock: call it on a
        worker thread (``find`` answers at once for a workspace that is ready).
        """
        found = self.find(tenant_id, session_id)
        if found is not None:
            return found
        self.base.mkdir(parents=True, exist_ok=True)
        # The service's alone: a sandboxed command (another uid) cannot open, and so hold, a lock.
        (self.base / LOCKS_DIR).mkdir(mode=0o700, exist_ok=True)
        with FileLock(self.lock_file(tenant_id, session_id)).hold():
            self._make(self.base / tenant_id / session_id)
        return self._workspace(tenant_id, session_id)

    def _workspace(self, tenant_id: str, session_id: str) -> Workspace:
        return Workspace(Path(os.path.realpath(self.base / tenant_id / session_id)),
                         self.lock_file(tenant_id, session_id))

    def _unfinished(self, info: os.stat_result) -> bool:
        return self.hands_over and info.st_uid == 0

    def _make(self, path: Path) -> None:
        """Make ``path`` or finish it; the caller holds the session's lock."""
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)  # atomic on the shared filesystem, whatever this machine has cached
        except FileExistsError:
            pass  # made by another process (which handed it over, or died before it could)
        # Attributes from an open descriptor are fresh (NFS checks them with the
        # server on open), so a workspace another machine finished is seen as finished.
        fd = os.open(path, _OPEN_WORKSPACE)
        try:
            if self._unfinished(os.fstat(fd)):
                self._hand_over(fd)
        finally:
            os.close(fd)

    def _hand_over(self, fd: int) -> None:
        if self.allocate_owner is not None:
            uid, gid = self.allocate_owner()
        else:
            assert self.owner_uid is not None
            uid, gid = self.owner_uid, self.owner_gid if self.owner_gid is not None else -1
        # Private first, then given away: never a moment when its owner is not root and others may look in.
        os.fchmod(fd, 0o700)
        os.fchown(fd, uid, gid)


def disk_usage(root: Path) -> int:
    """Bytes the files below ``root`` take on disk; symlinks are not followed."""
    total = 0
    stack = [str(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            total += info.st_blocks * 512
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
    return total
