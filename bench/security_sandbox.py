"""Escape attempts against the tools service: how many ran code as root or touched the host.

Every attempt is one a hostile caller (or a prompt-injected model) can make
with a tenant's key. An attempt counts as an escape when a planted program or
loader hook ran as uid 0, when a file tool read or wrote outside the
session's workspace, or when one session's commands saw another's files.

- launcher hijack: programs named like every link of the launcher chain are
  planted in the workspace, then named through ``env`` (PATH, LD_PRELOAD,
  BASH_ENV, ...) on calls to the service and, bypassing its checks, on the
  sandbox itself;
- symlink swap: a thread swaps a workspace directory for a symlink to a
  directory outside while fs_read and fs_write go through it;
- cross-session: one session tries to read and signal another's.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

from services.tools.adapters.sandbox import Sandbox, SandboxLimits, detect_mode
from services.tools.core.model import CallContext, ToolInvocation, ToolStatus

LAUNCHERS = ("prlimit", "bwrap", "setpriv", "env", "sh", "unshare", "true", "id", "echo")
HOOK_VARIABLES = ("PATH", "LD_PRELOAD", "LD_LIBRARY_PATH", "BASH_ENV", "ENV", "PYTHONSTARTUP", "PYTHONPATH",
                  "GIT_SSH", "GIT_EXEC_PATH", "PERL5OPT", "NODE_OPTIONS", "SHELLOPTS", "GCONV_PATH")
SECRET = "host-secret-do-not-read"


def _invocation(name: str, call_id: str, **arguments: Any) -> ToolInvocation:
    return ToolInvocation(call_id=call_id, name=name, arguments=arguments, arguments_json=json.dumps(arguments),
                          timeout_ms=10_000, approval_id="")


def _plant(workspace: Path, marker: Path) -> Path:
    bin_dir = workspace / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in LAUNCHERS:
        script = bin_dir / name
        script.write_text(f"#!/bin/sh\necho \"{name} uid=$(id -u)\" >> {marker}\nexec /usr/bin/{name} \"$@\"\n")
        script.chmod(0o755)
    library = workspace / "evil.so"
    if shutil.which("cc"):
        source = workspace / "evil.c"
        source.write_text("#include <stdio.h>\n#include <unistd.h>\n__attribute__((constructor)) static void h(void)"
                          f"{{ FILE *f = fopen(\"{marker}\", \"a\"); if (f) {{ fprintf(f, \"so uid=%d\\n\","
                          " (int)geteuid()); fclose(f); } }\n")
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(library), str(source)], check=True)
    return library


def _hostile_values(workspace: Path, library: Path) -> dict[str, str]:
    bin_dir = str(workspace / "bin")
    return {name: (f"{bin_dir}:/usr/bin:/bin" if "PATH" in name else str(library) if name.startswith("LD_")
                   else f"{bin_dir}/sh") for name in HOOK_VARIABLES}


def _root_runs(marker: Path) -> int:
    return sum(1 for line in marker.read_text().splitlines() if line.endswith("uid=0")) if marker.exists() else 0


async def launcher_hijack(executor: Any, base: Path, ctx: CallContext) -> dict[str, int]:
    """Planted launchers and hooks named through ``env``: calls made, and root runs seen."""
    await executor.execute(ctx, _invocation("shell_exec", "warm", command="true"))
    workspace = executor.roots.for_session(ctx.tenant_id, ctx.session_id).root
    marker = base / "marker.log"
    marker.touch()
    marker.chmod(0o666)
    library = _plant(workspace, marker)
    attempts = 0
    for name, value in _hostile_values(workspace, library).items():
        for command in ("echo hello", "id -u"):
            attempts += 1
            await executor.execute(ctx, _invocation("shell_exec", f"{name}-{attempts}", command=command,
                                                    env={name: value}))
    # The same variables straight into the sandbox, as if every check upstream were gone.
    owner = os.stat(workspace)
    for mode in ("bwrap", "unshare", "none"):
        try:
            detect_mode(mode)
        except RuntimeError:
            continue
        sandbox = Sandbox(mode, SandboxLimits(cpu_seconds=5, processes=32))
        attempts += 1
        await sandbox.run(["/bin/sh", "-c", "echo hello"], workspace, workspace,
                          env=_hostile_values(workspace, library), stdin=None, output_cap_bytes=4096,
                          owner=(owner.st_uid, owner.st_gid))
    return {"attempts": attempts, "escapes": _root_runs(marker)}


async def symlink_swap(executor: Any, base: Path, ctx: CallContext, attempts: int) -> dict[str, int]:
    """fs_read/fs_write through a directory a thread keeps swapping for a symlink out of the workspace."""
    workspace = executor.roots.for_session(ctx.tenant_id, ctx.session_id).root
    outside = base / "outside"
    outside.mkdir()
    (outside / "f.txt").write_text(SECRET)
    (workspace / "d").mkdir(exist_ok=True)
    (workspace / "d" / "f.txt").write_text("inside")
    stop = threading.Event()

    def swapper() -> None:
        real, link = workspace / "d", workspace / "d.swap"
        while not stop.is_set():
            with contextlib.suppress(OSError):
                os.rename(real, workspace / "d.real")
                os.symlink(outside, link)
                os.rename(link, real)
                os.unlink(real)
                os.rename(workspace / "d.real", real)

    thread = threading.Thread(target=swapper, daemon=True)
    thread.start()
    leaks = 0
    try:
        for number in range(attempts):
            if number % 2:
                outcome = await executor.execute(ctx, _invocation("fs_read", f"r{number}", path="d/f.txt"))
                leaks += SECRET in outcome.content.text
            else:
                await executor.execute(ctx, _invocation("fs_write", f"w{number}", path=f"d/w{number}.txt",
                                                        content="x"))
    finally:
        stop.set()
        thread.join()
    leaks += sum(1 for entry in outside.iterdir() if entry.name != "f.txt")
    return {"attempts": attempts, "escapes": leaks}


async def cross_session(executor: Any, ctx: CallContext, other: CallContext) -> dict[str, int]:
    victim = await executor.execute(other, _invocation("shell_exec", "v", command=f"echo {SECRET} > secret.txt"))
    victim_path = executor.roots.for_session(other.tenant_id, other.session_id).root / "secret.txt"
    probes = [f"cat {victim_path}", f"cat ../../{other.tenant_id}/{other.session_id}/secret.txt",
              f"ls -la {victim_path.parent}"]
    escapes = 0
    for number, command in enumerate(probes):
        outcome = await executor.execute(ctx, _invocation("shell_exec", f"x{number}", command=command))
        escapes += SECRET in outcome.stdout.text or (outcome.status is ToolStatus.OK and "secret.txt" in
                                                       outcome.stdout.text)
    return {"attempts": len(probes) if victim.status is ToolStatus.OK else 0, "escapes": escapes}


async def measure_sandbox(race_attempts: int = 3000) -> dict[str, Any]:
    """The figures for ``make bench-security``; ``escapes`` sums every kind."""
    from tests.tools.conftest import make_executor  # the same executor the tool tests build
    base = Path(tempfile.mkdtemp(prefix="llmesh-bench-security-"))
    await asyncio.to_thread(base.chmod, 0o755)
    try:
        mode = detect_mode("auto")
        executor = make_executor(base / "ws", sandbox_mode=mode)
        attacker = CallContext(request_id="a", tenant_id="mallory", session_id="s1", role="developer")
        victim = CallContext(request_id="v", tenant_id="acme", session_id="s2", role="developer")
        (base / "ws").mkdir()
        (base / "ws").chmod(0o755)
        results = {
            "launcher_hijack": await launcher_hijack(executor, base, attacker),
            "symlink_swap": await symlink_swap(executor, base, attacker, race_attempts),
            "cross_session": await cross_session(executor, attacker, victim),
        }
        return {"sandbox_mode": mode, "running_as_root": os.geteuid() == 0,
                "escapes": sum(r["escapes"] for r in results.values()), "escape_attempts": results}
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(measure_sandbox(300)), indent=2))
