"""A lock that every tools process sharing a workspace root honours: a thread lock, then an flock.

``flock(2)`` on a file excludes every other open file of it: other processes
on the machine, and, on NFSv4 or CephFS, processes on other machines
mounting the same volume. Over NFS the kernel emulates flock with byte-range
locks held on the server, whose ownership rules are those of the protocol
and the kernel rather than flock's; so that the threads of one process never
depend on them, a thread lock per file, shared by the whole process, is
taken first. A process that dies releases its flocks (over NFS, once the
server's lease on it runs out).

Lock files are never removed: a waiter could be holding a descriptor of one
that was unlinked and replaced, and would then lock a file nobody else uses.
"""
from __future__ import annotations

import fcntl
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class _ThreadLocks:
    """One ``threading.Lock`` per key while anyone holds or waits for it."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}

    @contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._mutex:
            lock, users = self._locks.get(key, (None, 0))
            if lock is None:
                lock = threading.Lock()
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._mutex:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        with self._mutex:
            return len(self._locks)


# Process-wide, like the byte-range locks that may stand behind an flock.
THREAD_LOCKS = _ThreadLocks()


class FileLock:
    """An exclusive lock on ``path`` (made 0600, its folder 0700, when missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextmanager
    def hold(self) -> Iterator[int]:
        """Blocks until this process's threads and every other process have let go.

        Yields the lock file's descriptor: read and write the file through it
        only (where flock is emulated with byte-range locks, closing another
        descriptor of the file could drop the lock).
        """
        with THREAD_LOCKS.hold(os.path.abspath(self.path)):
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, LOCK_FILE_FLAGS, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield fd
            finally:
                os.close(fd)  # releases the flock
