"""The arguments of a shell tool call, checked, and the script they run.

A shell call is more than its command: ``cwd`` decides where relative paths
land, ``env`` reaches every program the call starts (and the launcher that
starts them), and ``stdin`` is the program itself when it feeds a shell.
Every one of these is part of what the policy judges, and of the approval
key, so an approval for one stdin or env never covers another.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import InvalidArgument
from services.policy.core.command_expander import expand_script, expand_stdin_scripts, reads_script_from_stdin
from services.policy.core.shell_lexer import ShellSyntaxError
from services.policy.core.shell_parser import ParsedScript, SimpleCommand, parse_script

MAX_COMMAND_CHARS = 64 * 1024
MAX_ENV_VARS = 256
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass(frozen=True)
class ShellInput:
    command: str = ""
    argv: tuple[str, ...] = ()
    cwd: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    stdin: str | None = None

    def approval_suffix(self) -> str:
        """What besides the commands makes two calls different for an approval."""
        extra: dict[str, Any] = {}
        if self.cwd is not None:
            extra["cwd"] = self.cwd
        if self.env:
            extra["env"] = self.env
        if self.stdin is not None:
            extra["stdin_sha256"] = hashlib.sha256(self.stdin.encode("utf-8", "surrogatepass")).hexdigest()
        if not extra:
            return ""
        return " " + json.dumps(extra, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def shell_input(arguments: dict[str, Any]) -> ShellInput:
    """The call's shell arguments; raises InvalidArgument naming the field that is wrong."""
    command, argv = arguments.get("command"), arguments.get("argv")
    if isinstance(command, str) and command.strip():
        if len(command) > MAX_COMMAND_CHARS:
            raise InvalidArgument(f"arguments_json.command: longer than {MAX_COMMAND_CHARS} characters",
                                  field="arguments_json.command")
        found = ShellInput(command=command)
    elif isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv):
        if sum(len(a) + 1 for a in argv) > MAX_COMMAND_CHARS:
            raise InvalidArgument(f"arguments_json.argv: longer than {MAX_COMMAND_CHARS} characters in all",
                                  field="arguments_json.argv")
        found = ShellInput(argv=tuple(argv))
    else:
        raise InvalidArgument(
            "arguments_json.command: a shell tool needs a non-empty string 'command' or a string array 'argv'",
            field="arguments_json.command")
    cwd = arguments.get("cwd")
    if cwd is not None and (not isinstance(cwd, str) or not cwd or "\0" in cwd):
        raise InvalidArgument("arguments_json.cwd: must be a non-empty path", field="arguments_json.cwd")
    env = arguments.get("env", {})
    if not isinstance(env, dict) or len(env) > MAX_ENV_VARS:
        raise InvalidArgument(f"arguments_json.env: must be an object of at most {MAX_ENV_VARS} variables",
                              field="arguments_json.env")
    for name, value in env.items():
        if not _ENV_NAME.fullmatch(name) or not isinstance(value, str):
            raise InvalidArgument(f"arguments_json.env: {name[:64]!r} must be a variable name with a string value",
                                  field="arguments_json.env")
    stdin = arguments.get("stdin")
    if stdin is not None and not isinstance(stdin, str):
        raise InvalidArgument("arguments_json.stdin: must be a string", field="arguments_json.stdin")
    return ShellInput(found.command, found.argv, cwd, dict(env), stdin)


def parse_shell(call: ShellInput) -> ParsedScript | str:
    """The commands the call runs (stdin scripts included), or why they cannot be known."""
    try:
        if call.command:
            script = expand_script(parse_script(call.command))
        else:
            script = expand_script(ParsedScript(commands=[SimpleCommand(argv=call.argv)]))
    except ShellSyntaxError as exc:
        return str(exc)
    if call.stdin is None or not any(reads_script_from_stdin(c) for c in script.commands):
        return script
    if len(call.stdin) > MAX_COMMAND_CHARS:
        return f"the script a shell reads from stdin is longer than {MAX_COMMAND_CHARS} characters"
    try:
        return expand_stdin_scripts(script, call.stdin)
    except ShellSyntaxError as exc:
        return f"the script a shell reads from stdin: {exc}"
