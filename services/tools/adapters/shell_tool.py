"""shell_exec: a command in the sandbox, cwd inside the session workspace."""
from __future__ import annotations

from typing import Any

from services.common.errors import InvalidArgument
from services.tools.adapters.sandbox import Sandbox
from services.tools.core.model import RiskLevel, ToolContext, ToolOutput, ToolSpec

SHELL_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "command": {"type": "string", "minLength": 1, "description": "Run with /bin/sh -c"},
        "argv": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                 "description": "Run directly, without a shell"},
        "cwd": {"type": "string", "minLength": 1, "description": "Directory relative to the workspace"},
        "env": {"type": "object", "propertyNames": {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"},
                "additionalProperties": {"type": "string"}},
        "stdin": {"type": "string"},
    },
    "oneOf": [{"required": ["command"]}, {"required": ["argv"]}],
}


class ShellTool:
    def __init__(self, sandbox: Sandbox, timeout_ms: int) -> None:
        self.sandbox = sandbox
        self.timeout_ms = timeout_ms

    def spec(self) -> ToolSpec:
        return ToolSpec(
            name="shell_exec", handler=self.run, risk_level=RiskLevel.DANGEROUS, timeout_ms=self.timeout_ms,
            version=f"1+{self.sandbox.mode}",
            description="Run a shell command in the session workspace, sandboxed without network. "
                        "Returns exit code, stdout and stderr.",
            parameters_schema=SHELL_SCHEMA)

    async def run(self, args: dict[str, Any], ctx: ToolContext) -> ToolOutput:
        root = ctx.workspace.root
        cwd = ctx.workspace.resolve(args.get("cwd", "."), "arguments.cwd")
        if not cwd.is_dir():
            raise InvalidArgument(f"arguments.cwd: {args['cwd']!r} is not a directory", field="arguments.cwd")
        inner = ["/bin/sh", "-c", args["command"]] if "command" in args else list(args["argv"])
        stdin = args["stdin"].encode("utf-8") if "stdin" in args else None
        result = await self.sandbox.run(inner, root, cwd, env=self.sandbox.environment(root, args.get("env", {})),
                                        stdin=stdin, output_cap_bytes=ctx.output_cap_bytes)
        ok = result.exit_code == 0
        return ToolOutput(ok=ok, exit_code=result.exit_code, stdout=result.stdout, stderr=result.stderr,
                          error_reason="" if ok else "NONZERO_EXIT",
                          error_message="" if ok else f"exited with status {result.exit_code}")
