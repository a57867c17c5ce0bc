"""A uid (and a group of the same number) of its own for each session's workspace.

The owner of a workspace directory is the record of which uid its commands
run as, so every replica that mounts the same workspaces agrees without a
table of its own. New numbers come from a counter file beside the
workspaces (``<workspace_root>/.next-uid``), read and advanced under its
lock (``FileLock``: a thread lock, then an exclusive ``flock``), so two
replicas, or two threads of one, never hand out the same one. Every replica
sharing the root must use the same ``sandbox_uid_base``: the file holds the
offset into the range.
"""
from __future__ import annotations

import os
from pathlib import Path

from services.common.errors import ResourceExhausted
from services.tools.core.locks import FileLock

COUNTER_FILE = ".next-uid"


class SessionUidPool:
    """Hands out ``first_uid`` .. ``first_uid + size - 1``, each once."""

    def __init__(self, base: Path, first_uid: int, size: int) -> None:
        if first_uid < 1000 or size < 1 or first_uid + size > 2**31 - 2:
            raise ValueError(f"uid pool {first_uid}+{size}: must lie within 1000 .. 2**31-2")
        self.base = base
        self.first_uid = first_uid
        self.size = size

    def allocate(self) -> tuple[int, int]:
        self.base.mkdir(parents=True, exist_ok=True)
        with FileLock(self.base / COUNTER_FILE).hold() as fd:
            raw = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            offset = int(raw) if raw.isdigit() else 0
            if offset >= self.size:
                raise ResourceExhausted(
                    f"all {self.size} sandbox uids from {self.first_uid} are taken; raise sandbox_uid_count",
                    reason="SANDBOX_UIDS_EXHAUSTED")
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(offset + 1).encode("ascii"), 0)
            os.fsync(fd)  # on the shared volume before the lock is let go
        uid = self.first_uid + offset
        return uid, uid
