"""Per-session workspace roots and the path confinement every file tool uses."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgument, PermissionDenied

# Tenant and session ids become path components: keep them boring.
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")


def check_id(value: str, field: str) -> str:
    if not _ID.match(value) or value in (".", ".."):
        raise InvalidArgument(
            f"{field}: must match [A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}}, got {value!r}", field=field)
    return value


@dataclass(frozen=True)
class Workspace:
    """A directory a session's tools may touch, and nothing outside it."""

    root: Path  # resolved, absolute

    def resolve(self, path: str, field: str = "path") -> Path:
        """The real path of ``path`` (relative to the root), or PERMISSION_DENIED.

        Absolute paths (``/etc/passwd``, ``/proc/self/environ``) are refused
        outright; relative ones are resolved through every symlink and ``..``
        and must still land inside the root. A symlink inside the workspace
        pointing out of it is therefore refused too.
        """
        if not isinstance(path, str) or "\x00" in path:
            raise InvalidArgument(f"{field}: must be a string without NUL bytes", field=field)
        if os.path.isabs(path) or path.startswith("~"):
            raise PermissionDenied(
                f"{field}: {path!r} is absolute; paths are relative to the session workspace",
                reason="PATH_OUTSIDE_WORKSPACE", field=field)
        real = Path(os.path.realpath(self.root / path))
        if real != self.root and self.root not in real.parents:
            raise PermissionDenied(
                f"{field}: {path!r} resolves outside the session workspace",
                reason="PATH_OUTSIDE_WORKSPACE", field=field)
        return real

    def relative(self, real: Path) -> str:
        rel = real.relative_to(self.root).as_posix()
        return rel or "."


class WorkspaceRoots:
    """``<base>/<tenant_id>/<session_id>``, created on first use."""

    def __init__(self, base: Path, owner_uid: int | None = None, owner_gid: int | None = None) -> None:
        self.base = base
        # When the sandbox runs commands as another user (root drops to
        # nobody), that user must be able to write its workspace.
        self.owner_uid = owner_uid
        self.owner_gid = owner_gid

    def for_session(self, tenant_id: str, session_id: str) -> Workspace:
        check_id(tenant_id, "tenant_id")
        check_id(session_id, "session_id")
        path = self.base / tenant_id / session_id
        if not path.is_dir():
            path.mkdir(parents=True, exist_ok=True)
            if self.owner_uid is not None:
                os.chown(path, self.owner_uid, self.owner_gid if self.owner_gid is not None else -1)
        return Workspace(Path(os.path.realpath(path)))
