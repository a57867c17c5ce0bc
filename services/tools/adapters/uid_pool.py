"""A uid (and a group of the same number) of its own for each session's workspace.

The owner of a workspace directory is the record of which uid its commands
run as, so every replica that mounts the same workspaces agrees without a
table of its own. New numbers come from a counter file beside the
workspaces, taken under an exclusive ``flock`` so that two replicas (or two
threads) never hand out the same one.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from services.common.errors import ResourceExhausted

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
        fd = os.open(self.base / COUNTER_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            offset = int(raw) if raw.isdigit() else 0
            if offset >= self.size:
                raise ResourceExhausted(
                    f"all {self.size} sandbox uids from {self.first_uid} are taken; raise sandbox_uid_count",
                    reason="SANDBOX_UIDS_EXHAUSTED")
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(offset + 1).encode("ascii"), 0)
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock
        uid = self.first_uid + offset
        return uid, uid
