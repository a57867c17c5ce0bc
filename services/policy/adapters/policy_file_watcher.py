"""Reloads the policy file when it changes, without a restart.

Polls the file's mtime and size with an asyncio sleep in between; this is
not on the request path, and polling works the same on every file system.
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from services.policy.core.policy_holder import PolicyHolder

log = logging.getLogger("llmesh.policy")


class PolicyFileWatcher:
    def __init__(self, path: Path, holder: PolicyHolder, interval_s: float) -> None:
        self.path = path
        self.holder = holder
        self.interval_s = interval_s
        self._signature = self._stat()
        self._task: asyncio.Task[None] | None = None

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def check_now(self) -> bool:
        """Reload if the file changed; True when new rules were swapped in."""
        signature = self._stat()
        if signature is None or signature == self._signature:
            return False
        self._signature = signature
        try:
            text = self.path.read_text()
        except OSError as exc:
            log.error("cannot read policy file", extra={"event": "policy_reload_failed", "error": str(exc)})
            return False
        if self.holder.reload(text, str(self.path)):
            log.info("policy reloaded", extra={"event": "policy_reloaded", "version": self.holder.policy.version})
            return True
        # The old rules keep serving; the error names the line to fix.
        log.error("policy file rejected", extra={"event": "policy_rejected", "error": self.holder.last_error})
        return False

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="policy-file-watcher")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            self.check_now()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
