"""Runs a command in a sandbox: own process group, rlimits, a cgroup, a scrubbed env, no network.

Layers, strongest available first (``mode`` auto picks it):
- ``bwrap``: bubblewrap with new net/pid/ipc/uts namespaces, the system
  read-only, a private size-capped /tmp, no /proc, the workspace bound at
  /workspace (so no host path is visible inside).
- ``unshare``: util-linux unshare with new net and pid namespaces.
- ``none``: process group, rlimits and scrubbed env only.
The launcher chain (``launcher.py``) runs from verified absolute paths with a
fixed environment; the caller's variables reach only the command, through
``env -i`` after privileges are dropped. Run as root, the command runs as the
session's own uid (the owner of its workspace), so RLIMIT_NPROC, which the
kernel does not apply to root, contains fork bombs per session, and a
session can neither signal nor starve another. A memory and pids cgroup
caps each call where the machine offers one (``cgroups.py``). A timeout or
cancellation SIGKILLs the whole process group and empties the cgroup; with a
pid namespace every process inside dies with its init too.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.common.errors import InvalidArgument
from services.tools.adapters.cgroups import CgroupLimits
from services.tools.adapters.launcher import LAUNCHER_ENV, SANDBOX_PATH, Launchers, check_env
from services.tools.core.output import CapturedText, HeadTailBuffer

log = logging.getLogger("llmesh.tools.sandbox")

SANDBOX_WORKSPACE = "/workspace"
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
    tmp_bytes: int = 64 * 1024**2


@dataclass(frozen=True)
class ProcessResult:
    exit_code: int
    stdout: CapturedText
    stderr: CapturedText


def _probe(argv: Sequence[str]) -> bool:
    try:
        return subprocess.run(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=LAUNCHER_ENV, timeout=10,
                              check=False).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def detect_mode(requested: str, launchers: Launchers | None = None) -> str:
    """The sandbox mode to use: ``requested`` when it works, else the best that does."""
    launchers = launchers or Launchers.resolve()
    bwrap_ok = bool(launchers.bwrap) and _probe(
        [launchers.bwrap, "--unshare-net", "--unshare-pid", "--ro-bind", "/", "/", "--dev", "/dev", "--", "true"])
    user = [] if os.geteuid() == 0 else ["--user"]
    unshare_ok = bool(launchers.unshare) and _probe(
        [launchers.unshare, *user, "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--", "true"])
    if requested == "bwrap" and not bwrap_ok:
        raise RuntimeError("sandbox=bwrap but bubblewrap is missing or cannot create namespaces")
    if requested == "unshare" and not unshare_ok:
        raise RuntimeError("sandbox=unshare but unshare cannot create namespaces")
    if requested in ("bwrap", "unshare", "none"):
        return requested
    return "bwrap" if bwrap_ok else "unshare" if unshare_ok else "none"


def _count_processes_of(uid: int) -> int:
    count = 0
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_uid == uid:
                    count += 1
    return count


class Sandbox:
    """Starts commands through the launcher chain: cgroup, rlimits, namespaces, a dropped uid, then the env."""

    def __init__(self, mode: str, limits: SandboxLimits, run_as_uid: int = 65534, run_as_gid: int = 65534, *,
                 launchers: Launchers | None = None, cgroups: CgroupLimits | None = None) -> None:
        self.mode = mode
        self.limits = limits
        self.launchers = launchers or Launchers.resolve()
        self.cgroups = cgroups
        if mode == "bwrap" and not self.launchers.bwrap:
            raise RuntimeError("sandbox=bwrap but no trusted bwrap was found")
        if mode == "unshare" and not self.launchers.unshare:
            raise RuntimeError("sandbox=unshare but no trusted unshare was found")
        self.is_root = os.geteuid() == 0
        if self.is_root and not self.launchers.setpriv and mode != "none":
            raise RuntimeError("running as root needs a trusted setpriv to drop privileges")
        # Only root can (and must) switch users; everyone else runs as itself.
        self.drop_to = (run_as_uid, run_as_gid) if self.is_root and run_as_uid >= 0 else None

    def _run_as(self, owner: tuple[int, int] | None) -> tuple[int, int] | None:
        """The uid/gid a call runs as: the session's own when given, else the default."""
        if not self.is_root:
            return None
        if owner is not None and owner[0] > 0:
            return owner
        return self.drop_to

    def _limits_prefix(self, nproc: int, file_size_bytes: int) -> list[str]:
        """util-linux prlimit sets the rlimits, then execs the rest.

        Not a preexec_fn: running Python between fork and exec in a process
        full of gRPC threads can crash the child before it execs.
        """
        lim = self.limits
        return [self.launchers.prlimit, f"--cpu={lim.cpu_seconds}:{lim.cpu_seconds + 1}",
                f"--as={lim.address_space_bytes}", f"--fsize={file_size_bytes}",
                f"--nofile={lim.open_files}", f"--nproc={nproc}", "--core=0", "--"]

    def _drop_privileges(self, run_as: tuple[int, int] | None) -> list[str]:
        if run_as is None or self.mode == "none":
            return []
        uid, gid = run_as
        return [self.launchers.setpriv, f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--no-new-privs", "--"]

    def _namespaces(self, workspace_root: Path) -> list[str]:
        if self.mode == "unshare":
            # Not root: a user namespace is what lets us create the others.
            user = [] if self.is_root else ["--user"]
            return [self.launchers.unshare, *user, "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--"]
        if self.mode != "bwrap":
            return []
        argv = [self.launchers.bwrap, "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts",
                "--unshare-cgroup-try", "--die-with-parent", "--new-session", "--hostname", "sandbox"]
        for directory in SYSTEM_DIRS:
            if os.path.isdir(directory):
                argv += ["--ro-bind", directory, directory]
        for directory in MERGED_DIRS:
            if os.path.islink(directory):
                argv += ["--symlink", os.readlink(directory), directory]
            elif os.path.isdir(directory):
                argv += ["--ro-bind", directory, directory]
        # No /proc: its mountinfo would show where the workspace lives on the host.
        return argv + ["--dev", "/dev", "--perms", "01777", "--size", str(self.limits.tmp_bytes), "--tmpfs", "/tmp",
                       "--bind", str(workspace_root), SANDBOX_WORKSPACE, "--chdir", SANDBOX_WORKSPACE, "--"]

    def inside_path(self, workspace_root: Path, path: Path) -> str:
        """``path`` (in the workspace) as the command sees it."""
        if self.mode != "bwrap":
            return str(path)
        rel = path.relative_to(workspace_root).as_posix()
        return SANDBOX_WORKSPACE if rel == "." else f"{SANDBOX_WORKSPACE}/{rel}"

    def environment(self, workspace_root: Path, extra: dict[str, str]) -> dict[str, str]:
        """What the command sees: the sandbox's fixed variables and the caller's checked ones."""
        env = {"PATH": SANDBOX_PATH, "HOME": self.inside_path(workspace_root, workspace_root), "LANG": "C.UTF-8",
               "LC_ALL": "C.UTF-8", "TMPDIR": "/tmp", "TERM": "dumb"}
        env.update(check_env(extra))
        return env

    def build_argv(self, inner: Sequence[str], workspace_root: Path, cwd: Path, env: dict[str, str], *,
                   run_as: tuple[int, int] | None, nproc: int, file_size_bytes: int,
                   cgroup_procs: Sequence[Path] = ()) -> list[str]:
        """The whole launcher chain; only its last link, ``env``, carries anything from the caller."""
        if inner and "=" in inner[0]:
            raise InvalidArgument("arguments.argv[0]: a program name cannot contain '='", field="arguments.argv")
        argv: list[str] = []
        if cgroup_procs:
            argv += [self.launchers.sh, "-c", _JOIN_CGROUPS, "sh", *map(str, cgroup_procs), "--"]
        argv += self._limits_prefix(nproc, file_size_bytes)
        argv += self._namespaces(workspace_root)
        argv += self._drop_privileges(run_as)
        assignments = [f"{name}={value}" for name, value in env.items()]
        return argv + [self.launchers.env, "-i", "-C", self.inside_path(workspace_root, cwd), *assignments, *inner]

    async def run(self, inner: Sequence[str], workspace_root: Path, cwd: Path, *, env: dict[str, str],
                  stdin: bytes | None, output_cap_bytes: int, owner: tuple[int, int] | None = None,
                  max_file_bytes: int | None = None) -> ProcessResult:
        """Run ``inner`` as ``owner`` (the session's uid/gid) or the default user, inside the sandbox."""
        run_as = self._run_as(owner)
        nproc = self.limits.processes
        if run_as is None:
            # RLIMIT_NPROC counts every process of the user, not just ours.
            nproc += _count_processes_of(os.geteuid())
        file_size = self.limits.file_size_bytes if max_file_bytes is None else max(0, min(
            max_file_bytes, self.limits.file_size_bytes))
        cgroups = self.cgroups
        procs = await asyncio.to_thread(cgroups.create, self.limits.address_space_bytes,
                                        self.limits.processes) if cgroups else []
        try:
            argv = self.build_argv(inner, workspace_root, cwd, env, run_as=run_as, nproc=nproc,
                                   file_size_bytes=file_size, cgroup_procs=procs)
            # In "none" mode there are no namespaces and no setpriv: switch users in the child.
            user_kwargs = {}
            if self.mode == "none" and run_as is not None:
                user_kwargs = {"user": run_as[0], "group": run_as[1], "extra_groups": []}
            return await _spawn(argv, LAUNCHER_ENV, stdin, output_cap_bytes, user_kwargs)
        finally:
            if procs and cgroups is not None:
                await asyncio.to_thread(cgroups.remove, procs)


# Joins the call's cgroups (its cgroup.procs files come first, up to "--"), then execs the chain.
_JOIN_CGROUPS = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'


async def _spawn(argv: list[str], env: dict[str, str], stdin: bytes | None, output_cap_bytes: int,
                 user_kwargs: dict) -> ProcessResult:
    # Our own pipes, not asyncio's: a process that inherited them (and escaped
    # the group) must not keep proc.wait() from returning once the command ended.
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd="/", env=env, start_new_session=True,
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
                loop.add_reader(fd, _set_ready, ready)
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


def _set_ready(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _feed(proc: asyncio.subprocess.Process, data: bytes) -> None:
    assert proc.stdin is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(data)
        await proc.stdin.drain()
    proc.stdin.close()


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
