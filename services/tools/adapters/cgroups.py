"""A memory and pids cgroup for each sandboxed call, where the machine lets us make one.

rlimits count per process (memory) or per user (processes); a cgroup caps
the whole call, every process it forks included. Both layouts are handled:
the unified hierarchy (cgroup v2, ``memory.max`` / ``pids.max``) and the
legacy per-controller one (v1, ``memory.limit_in_bytes`` / ``pids.max``).
Each call gets a child of a group made for this process, beneath the group
the service itself runs in. Where none can be made (no cgroupfs, not root, a
read-only mount), ``CgroupLimits.detect`` returns None and calls run with
rlimits alone.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("llmesh.tools.cgroups")

CGROUP_ROOT = Path("/sys/fs/cgroup")
RMDIR_ATTEMPTS = 50


def _own_group(controller: str) -> str | None:
    """This process's path in the hierarchy of ``controller`` ("" for v2), from /proc/self/cgroup."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _num, controllers, path = line.split(":", 2)
            if controller in controllers.split(","):
                return path
    return None


@dataclass(frozen=True)
class _Hierarchy:
    parent: Path  # the group made for this process
    limit_files: dict[str, str]  # "memory" / "pids" -> file name


class CgroupLimits:
    """Makes, fills and removes one child group per call in each hierarchy."""

    def __init__(self, hierarchies: list[_Hierarchy]) -> None:
        self.hierarchies = hierarchies
        self._ids = itertools.count(1)

    @property
    def kind(self) -> str:
        return "v2" if any("memory.max" in h.limit_files.values() for h in self.hierarchies) else "v1"

    @classmethod
    def detect(cls, root: Path = CGROUP_ROOT) -> CgroupLimits | None:
        name = f"llmesh-tools-{os.getpid()}"
        hierarchies: list[_Hierarchy] = []
        unified = root / "cgroup.controllers"
        try:
            if unified.exists():
                own = _own_group("") or "/"
                parent = root / own.lstrip("/") / name
                controllers = unified.read_text().split()
                if not {"memory", "pids"} <= set(controllers):
                    return None
                parent.mkdir(exist_ok=True)
                (parent / "cgroup.subtree_control").write_text("+memory +pids")
                hierarchies.append(_Hierarchy(parent, {"memory": "memory.max", "pids": "pids.max"}))
            else:
                for controller, limit in (("memory", "memory.limit_in_bytes"), ("pids", "pids.max")):
                    group = _own_group(controller)
                    base = root / controller
                    if group is None or not base.is_dir():
                        continue
                    parent = base / group.lstrip("/") / name
                    parent.mkdir(exist_ok=True)
                    hierarchies.append(_Hierarchy(parent, {controller: limit}))
        except OSError as exc:
            log.warning("no cgroup limits for sandboxed calls: %s", exc)
            for hierarchy in hierarchies:
                with contextlib.suppress(OSError):
                    hierarchy.parent.rmdir()
            return None
        return cls(hierarchies) if hierarchies else None

    def create(self, memory_bytes: int, max_pids: int) -> list[Path]:
        """A new child group per hierarchy with the limits set; its ``cgroup.procs`` files."""
        call_id = next(self._ids)
        procs: list[Path] = []
        values = {"memory": str(memory_bytes), "pids": str(max_pids)}
        try:
            for hierarchy in self.hierarchies:
                group = hierarchy.parent / f"call-{call_id}"
                group.mkdir()
                procs.append(group / "cgroup.procs")
                for controller, file_name in hierarchy.limit_files.items():
                    (group / file_name).write_text(values[controller])
        except OSError:
            self.remove(procs)
            raise
        return procs

    def remove(self, procs: list[Path]) -> None:
        """Kill whatever is left in the call's groups and remove them."""
        for procs_file in procs:
            group = procs_file.parent
            for _attempt in range(RMDIR_ATTEMPTS):
                with contextlib.suppress(OSError, ValueError):
                    for pid in procs_file.read_text().split():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(int(pid), signal.SIGKILL)
                try:
                    group.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)
            else:
                log.warning("cgroup %s still busy; left behind", group)

    def close(self) -> None:
        for hierarchy in self.hierarchies:
            with contextlib.suppress(OSError):
                hierarchy.parent.rmdir()
