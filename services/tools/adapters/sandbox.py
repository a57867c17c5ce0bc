"""Runs a command in a sandbox: own process group, rlimits, scrubbed env, no network.

Layers, strongest available first (``mode`` auto picks it):
- ``bwrap``: bubblewrap with new net/pid/ipc/uts namespaces, the system
  read-only, a private /tmp and /proc, the workspace bound at /workspace.
- ``unshare``: util-linux unshare with new net and pid namespaces.
- ``none``: process group, rlimits and scrubbed env only.
Run as root, the command itself runs as an unprivileged user (nobody by
default) so that RLIMIT_NPROC, which the kernel does not apply to root,
contains fork bombs. A timeout or cancellation SIGKILLs the whole process
group; with a pid namespace every process inside dies with its init too.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from services.tools.core.output import CapturedText, HeadTailBuffer

log = logging.getLogger("llmesh.tools.sandbox")

SANDBOX_WORKSPACE = "/workspace"
SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
READ_CHUNK = 65536
# After the command ends, how long stray holders of its pipes get before we stop reading.
DRAIN_GRACE_S = 1.0
SYSTEM_DIRS = ("/usr", "/etc", "/opt")
MERGED_DIRS = ("/bin", "/sbin", "/lib", "/lib32", "/lib64")


@dataclass(frozen=True)
class SandboxLimits:
    cpu_seconds: int = 30
    address_space_bytes: int = 2 * 1024**3
    file_size_bytes: int = 256 * 1024**2
    open_files: int = 256
    processes: int = 64


@dataclass(frozen=True)
class ProcessResult:
    exit_code: int
    stdout: CapturedText
    stderr: CapturedText


def _probe(argv: Sequence[str]) -> bool:
    try:
        return subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=10, check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def detect_mode(requested: str) -> str:
    """The sandbox mode to use: ``requested`` when it works, else the best that does."""
    bwrap_ok = shutil.which("bwrap") is not None and _probe(
        ["bwrap", "--unshare-net", "--unshare-pid", "--ro-bind", "/", "/", "--proc", "/proc", "--dev", "/dev", "true"])
    unshare_ok = shutil.which("unshare") is not None and _probe(_unshare_prefix() + ["true"])
    if requested == "bwrap" and not bwrap_ok:
        raise RuntimeError("sandbox=bwrap but bubblewrap is missing or cannot create namespaces")
    if requested == "unshare" and not unshare_ok:
        raise RuntimeError("sandbox=unshare but unshare cannot create namespaces")
    if requested in ("bwrap", "unshare", "none"):
        return requested
    return "bwrap" if bwrap_ok else "unshare" if unshare_ok else "none"


def _unshare_prefix() -> list[str]:
    # Not root: a user namespace is what lets us create the others.
    user = [] if os.geteuid() == 0 else ["--user"]
    return ["unshare", *user, "--net", "--pid", "--fork", "--kill-child", "--mount-proc"]


def _count_processes_of(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    count += 1
    return count


class Sandbox:
    def __init__(self, mode: str, limits: SandboxLimits, run_as_uid: int = 65534, run_as_gid: int = 65534) -> None:
        self.mode = mode
        self.limits = limits
        # Only root can (and must) switch users; everyone else runs as itself.
        self.drop_to = (run_as_uid, run_as_gid) if os.geteuid() == 0 and run_as_uid >= 0 else None

    def _limits_prefix(self, nproc: int) -> list[str]:
        """util-linux prlimit sets the rlimits, then execs the rest.

        Not a preexec_fn: running Python between fork and exec in a process
        full of gRPC threads can crash the child before it execs.
        """
        lim = self.limits
        return ["prlimit", f"--cpu={lim.cpu_seconds}:{lim.cpu_seconds + 1}",
                f"--as={lim.address_space_bytes}", f"--fsize={lim.file_size_bytes}",
                f"--nofile={lim.open_files}", f"--nproc={nproc}", "--core=0", "--"]

    def _drop_privileges(self) -> list[str]:
        if self.drop_to is None:
            return []
        uid, gid = self.drop_to
        return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--no-new-privs", "--"]

    def build_argv(self, inner: Sequence[str], workspace_root: Path, cwd: Path) -> tuple[list[str], Path]:
        """The full command line and the directory to start it in."""
        inner = list(inner)
        if self.mode == "bwrap":
            argv = ["bwrap", "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                    "--unshare-cgroup-try", "--die-with-parent", "--hostname", "sandbox"]
            for directory in SYSTEM_DIRS:
                if os.path.isdir(directory):
                    argv += ["--ro-bind", directory, directory]
            for directory in MERGED_DIRS:
                if os.path.islink(directory):
                    argv += ["--symlink", os.readlink(directory), directory]
                elif os.path.isdir(directory):
                    argv += ["--ro-bind", directory, directory]
            rel = cwd.relative_to(workspace_root).as_posix()
            inside = SANDBOX_WORKSPACE if rel == "." else f"{SANDBOX_WORKSPACE}/{rel}"
            argv += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
                     "--bind", str(workspace_root), SANDBOX_WORKSPACE, "--chdir", inside]
            return argv + self._drop_privileges() + inner, workspace_root
        if self.mode == "unshare":
            return _unshare_prefix() + self._drop_privileges() + inner, cwd
        return inner, cwd

    def environment(self, workspace_root: Path, extra: dict[str, str]) -> dict[str, str]:
        home = SANDBOX_WORKSPACE if self.mode == "bwrap" else str(workspace_root)
        env = {"PATH": SAFE_PATH, "HOME": home, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TMPDIR": "/tmp",
               "TERM": "dumb"}
        env.update(extra)
        return env

    async def run(self, inner: Sequence[str], workspace_root: Path, cwd: Path, *, env: dict[str, str],
                  stdin: bytes | None, output_cap_bytes: int) -> ProcessResult:
        argv, start_dir = self.build_argv(inner, workspace_root, cwd)
        nproc = self.limits.processes
        if self.drop_to is None:
            # RLIMIT_NPROC counts every process of the user, not just ours.
            nproc += _count_processes_of(os.geteuid())
        # Limits go on first: bwrap, unshare and setpriv pass them on to the command.
        argv = self._limits_prefix(nproc) + argv
        # In "none" mode there is no setpriv inside: switch users in the child.
        user_kwargs = {}
        if self.mode == "none" and self.drop_to is not None:
            user_kwargs = {"user": self.drop_to[0], "group": self.drop_to[1], "extra_groups": []}
        # Our own pipes, not asyncio's: a process that inherited them (and escaped
        # the group) must not keep proc.wait() from returning once the command ended.
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=start_dir, env=env, start_new_session=True,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=out_write, stderr=err_write, **user_kwargs)
        except BaseException:
            os.close(out_read)
            os.close(err_read)
            raise
        finally:
            os.close(out_write)
            os.close(err_write)
        out, err = HeadTailBuffer(output_cap_bytes), HeadTailBuffer(output_cap_bytes)
        readers = [asyncio.create_task(_pump(out_read, out)), asyncio.create_task(_pump(err_read, err))]
        try:
            if stdin is not None:
                await _feed(proc, stdin)
            returncode = await proc.wait()
        except BaseException:
            _kill_group(proc.pid)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(proc.wait()), DRAIN_GRACE_S)
            for reader in readers:
                reader.cancel()
            raise
        # Whatever the command left running in its group goes with it.
        _kill_group(proc.pid)
        _done, pending = await asyncio.wait(readers, timeout=DRAIN_GRACE_S)
        for reader in pending:
            reader.cancel()
        exit_code = returncode if returncode >= 0 else 128 - returncode
        return ProcessResult(exit_code, out.captured(), err.captured())


async def _pump(fd: int, buf: HeadTailBuffer) -> None:
    """Read ``fd`` to EOF into ``buf``; closes ``fd`` however it ends."""
    loop = asyncio.get_running_loop()
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                chunk = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                ready = loop.create_future()
                loop.add_reader(fd, lambda: None if ready.done() else ready.set_result(None))
                try:
                    await ready
                finally:
                    loop.remove_reader(fd)
                continue
            if not chunk:
                return
            buf.feed(chunk)
    finally:
        os.close(fd)


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(data)
        await proc.stdin.drain()
    proc.stdin.close()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
