"""shell_exec: a command in the sandbox, cwd inside the session workspace.

The command runs as the workspace's owner (a uid of the session's own when
the service is root). The workspace quota is enforced through RLIMIT_FSIZE:
a command may grow no file past what is left of the quota, and none at all
once the workspace is full (reading and deleting still work).
"""
from __future__ import annotations

import asyncio
import os
from typing import Any

from services.common.errors import InvalidArgument
from services.tools.adapters.launcher import ENV_NAME, MAX_ENV_VARS, check_env
from services.tools.adapters.sandbox import Sandbox
from services.tools.core.model import RiskLevel, ToolContext, ToolOutput, ToolSpec
from services.tools.core.workspace import disk_usage

SHELL_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "command": {"type": "string", "minLength": 1, "description": "Run with /bin/sh -c"},
        "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                 "description": "Run directly, without a shell"},
        "cwd": {"type": "string", "minLength": 1, "description": "Directory relative to the workspace"},
        "env": {"type": "object", "maxProperties": MAX_ENV_VARS, "description": "Extra variables (no LD_*, PATH, ...)",
                "propertyNames": {"pattern": f"^{ENV_NAME}$"}, "additionalProperties": {"type": "string"}},
        "stdin": {"type": "string"},
    },
    "oneOf": [{"required": ["command"]}, {"required": ["argv"]}],
}


def _check_env_names(arguments: dict[str, Any]) -> None:
    """Hook variables are refused before policy sees the call, naming the variable."""
    check_env(arguments.get("env") or {}, field="$.env")


class ShellTool:
    def __init__(self, sandbox: Sandbox, timeout_ms: int, workspace_quota_bytes: int = 0) -> None:
        self.sandbox = sandbox
        self.timeout_ms = timeout_ms
        self.workspace_quota_bytes = workspace_quota_bytes

    def spec(self) -> ToolSpec:
        return ToolSpec(
            name="shell_exec", handler=self.run, risk_level=RiskLevel.DANGEROUS, timeout_ms=self.timeout_ms,
            version=f"1+{self.sandbox.mode}",
            description="Run a shell command in the session workspace, sandboxed without network. "
                        "Returns exit code, stdout and stderr.",
            parameters_schema=SHELL_SCHEMA, check_arguments=_check_env_names)

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        root = ctx.workspace.root
        cwd = ctx.workspace.resolve(args.get("cwd", "."), "arguments.cwd")
        if not cwd.is_dir():
            raise InvalidArgument(f"arguments.cwd: {args['cwd']!r} is not a directory", field="arguments.cwd")
        inner = ["/bin/sh", "-c", args["command"]] if "command" in args else list(args["argv"])
        stdin = args["stdin"].encode("utf-8") if "stdin" in args else None
        env = self.sandbox.environment(root, args.get("env", {}))
        info = os.stat(root)
        max_file_bytes = None
        if self.workspace_quota_bytes > 0:
            used = await asyncio.to_thread(disk_usage, root)
            max_file_bytes = max(0, self.workspace_quota_bytes - used)
        result = await self.sandbox.run(inner, root, cwd, env=env, stdin=stdin, output_cap_bytes=ctx.output_cap_bytes,
                                        owner=(info.st_uid, info.st_gid), max_file_bytes=max_file_bytes)
        ok = result.exit_code == 0
        return ToolOutput(ok=ok, exit_code=result.exit_code, stdout=result.stdout, stderr=result.stderr,
                          error_reason="" if ok else "NONZERO_EXIT",
                          error_message="" if ok else f"exited with status {result.exit_code}")
