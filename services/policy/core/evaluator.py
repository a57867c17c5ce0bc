"""Judges one tool call against a compiled policy; pure and synchronous."""
from __future__ import annotations

import json
import shlex
import time
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import InvalidArgument
from services.policy.core.embedded_programs import judge_program
from services.policy.core.rules import (
    Access,
    Decision,
    EnvSource,
    Policy,
    RiskLevel,
    RuleSet,
    TenantPolicy,
    resolve_path,
)
from services.policy.core.shell_call import MAX_COMMAND_CHARS, parse_shell, shell_input
from services.policy.core.shell_parser import ParsedScript, SimpleCommand

__all__ = ["MAX_COMMAND_CHARS", "PolicyEvaluator", "RuleMatch", "ToolCall", "Verdict"]
# Problems reported per command: enough to say why, bounded for huge argv.
MAX_PROBLEMS_PER_COMMAND = 3


@dataclass(frozen=True)
class ToolCall:
    tenant_id: str
    session_id: str
    role: str
    tool_name: str
    arguments: dict[str, Any]
    workspace_root: str
    risk_level: RiskLevel = RiskLevel.UNSPECIFIED


@dataclass(frozen=True)
class RuleMatch:
    rule_id: str
    decision: Decision
    justification: str
    # The part of the command, or the path, the rule matched.
    subject: str


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    justification: str
    matches: tuple[RuleMatch, ...]
    # Normalised description of the call: the approval cache key.
    subject_key: str
    policy_version: str


@dataclass
class _Collector:
    matches: list[RuleMatch] = field(default_factory=list)

    def add(self, rule_id: str, decision: Decision, justification: str, subject: str) -> None:
        self.matches.append(RuleMatch(rule_id, decision, justification, subject))


class PolicyEvaluator:
    """Evaluates calls against one immutable Policy."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def evaluate(self, call: ToolCall, deadline: float | None = None) -> Verdict:
        """Judge ``call``; past ``deadline`` (time.monotonic) the rest is left to a person."""
        tenant = self.policy.for_tenant(call.tenant_id)
        found = _Collector()
        subject_key = self._role_check(call, tenant, found)
        if not found.matches:
            if call.tool_name in self.policy.shell_tools:
                subject_key = self._judge_shell(call, tenant.rules, found, deadline)
            elif call.tool_name in self.policy.file_write_tools:
                subject_key = self._judge_file_write(call, tenant.rules, found)
            else:
                subject_key = "tool:" + call.tool_name + ":" + _canonical_json(call.arguments)
            self._judge_tool(call, tenant.rules, found)
        strictest = max(found.matches, key=lambda m: m.decision)
        return Verdict(strictest.decision, strictest.justification, tuple(found.matches), subject_key,
                       self.policy.version)

    def _role_check(self, call: ToolCall, tenant: TenantPolicy, found: _Collector) -> str:
        role = call.role or tenant.default_role
        grant = tenant.roles.get(role)
        key = f"tool:{call.tool_name}"
        if grant is None:
            found.add(f"role:{role}", Decision.FORBIDDEN, f"role {role!r} is not defined for this tenant",
                      call.tool_name)
        elif not grant.permits(call.tool_name):
            found.add(f"role:{role}", Decision.FORBIDDEN, f"role {role!r} may not call tool {call.tool_name!r}",
                      call.tool_name)
        return key

    def _judge_tool(self, call: ToolCall, rules: RuleSet, found: _Collector) -> None:
        tool_matched = False
        for rule in rules.tool_rules:
            if rule.matches(call.tool_name):
                found.add(rule.rule_id, rule.decision, rule.justification, call.tool_name)
                tool_matched = True
        if not tool_matched and not found.matches:
            # Neither a command, a path nor a tool rule spoke: the risk level decides.
            decision = self.policy.defaults.risk_levels[call.risk_level]
            found.add(f"default:risk-{call.risk_level.name.lower().replace('_', '-')}", decision,
                      f"no rule covers tool {call.tool_name!r}; its risk level decides", call.tool_name)

    def _judge_file_write(self, call: ToolCall, rules: RuleSet, found: _Collector) -> str:
        raw = call.arguments.get("path")
        if not isinstance(raw, str) or not raw:
            raise InvalidArgument("arguments_json.path: a file tool needs a non-empty string path",
                                  field="arguments_json.path")
        path = self._judge_path(raw, False, call.workspace_root, call.workspace_root, rules, found)
        return f"file:{call.tool_name}:{path or raw}"

    def _judge_path(self, raw: str, dynamic: bool, cwd: str, workspace: str, rules: RuleSet,
                    found: _Collector, access: Access = Access.WRITE) -> str | None:
        path = None if dynamic else resolve_path(raw, cwd)
        if path is None:
            what = "the written path" if access is Access.WRITE else "the working directory"
            found.add("default:unresolved-path", self.policy.defaults.unresolved_path,
                      f"{what} is only known at run time", raw)
            return None
        for rule in rules.path_rules:
            if rule.matches(path, workspace, access):
                found.add(rule.rule_id, rule.decision, rule.justification, path)
        return path

    def _judge_env(self, names: list[str], source: EnvSource, rules: RuleSet, found: _Collector) -> None:
        for name in names:
            for rule in rules.env_rules:
                if rule.matches(name, source):
                    found.add(rule.rule_id, rule.decision, f"{rule.justification} ({name})", f"env {name}")

    def _judge_shell(self, call: ToolCall, rules: RuleSet, found: _Collector, deadline: float | None) -> str:
        shell = shell_input(call.arguments)
        workspace = call.workspace_root
        self._judge_env(sorted(shell.env), EnvSource.CALL, rules, found)
        cwd = workspace
        if shell.cwd is not None:
            cwd = self._judge_path(shell.cwd, False, workspace, workspace, rules, found, Access.CWD) or ""
        script = parse_shell(shell)
        if isinstance(script, str):
            found.add("default:unparseable", self.policy.defaults.unparseable,
                      f"the command could not be parsed: {script}", "")
            return "command:" + _canonical_json(call.arguments)
        # Each command's text is both a match subject and part of the cache key.
        texts = [_command_text(c) for c in script.commands]
        self._judge_script(script, texts, cwd, workspace, rules, found, deadline)
        key = " ; ".join(t + " <pipe" if c.stdin_piped else t for c, t in zip(script.commands, texts, strict=True))
        return "command:" + workspace + ":" + key + shell.approval_suffix()

    def _judge_script(self, script: ParsedScript, texts: list[str], cwd: str, workspace: str, rules: RuleSet,
                      found: _Collector, deadline: float | None) -> None:
        for rule in rules.construct_rules:
            if rule.construct in script.constructs:
                found.add(rule.rule_id, rule.decision, rule.justification, rule.construct)
        for command, subject in zip(script.commands, texts, strict=True):
            if deadline is not None and time.monotonic() > deadline:
                found.add("default:evaluation-budget", self.policy.defaults.unparseable,
                          "the command is too large to judge within the time allowed", subject)
                return
            writes = self._write_targets(command)
            assigned = [name for name, _ in command.assignments]
            if command.argv and command.name_is_dynamic:
                found.add("default:dynamic-command", self.policy.defaults.dynamic_command,
                          "the program to run is only known at run time", subject)
            elif command.argv:
                self._judge_command(command, subject, rules, found, writes, assigned)
            for raw, dynamic in writes:
                self._judge_path(raw, dynamic, cwd, workspace, rules, found)
            self._judge_env(assigned, EnvSource.COMMAND, rules, found)
            if command.name in ("cd", "pushd", "popd") and not command.wraps:
                cwd = _next_cwd(command, cwd)

    def _judge_command(self, command: SimpleCommand, subject: str, rules: RuleSet, found: _Collector,
                       writes: list[tuple[str, bool]], assigned: list[str]) -> None:
        matched = rules.prefix_rules_for(command)
        for rule in matched:
            found.add(rule.rule_id, rule.decision, rule.justification, subject)
        argv_rules = rules.argv_by_name.get(command.name, ())
        for argv_rule in argv_rules:
            report = argv_rule.check(command, judge_program)
            for problem in report.problems[:MAX_PROBLEMS_PER_COMMAND]:
                found.add("default:unsafe-argv", self.policy.defaults.unsafe_argv, f"{command.name}: {problem}",
                          subject)
            if not report.problems:
                found.add(argv_rule.rule_id, argv_rule.decision, argv_rule.justification, subject)
            writes.extend(report.writes)
            assigned.extend(report.assigned)
        if not matched and not argv_rules:
            found.add("default:unknown-command", self.policy.defaults.unknown_command,
                      f"no rule covers {command.name!r}", subject)

    def _write_targets(self, command: SimpleCommand) -> list[tuple[str, bool]]:
        targets = [(r.target, r.dynamic) for r in command.redirects if r.writes]
        # /dev/tcp and /dev/udp open sockets in either direction.
        targets.extend((r.target, r.dynamic) for r in command.redirects
                       if not r.writes and r.target.startswith(("/dev/tcp/", "/dev/udp/")))
        for spec in self.policy.write_targets.get(command.name, ()):
            targets.extend(spec.paths(command.argv, command.dynamic_args))
        return targets


def _next_cwd(command: SimpleCommand, cwd: str) -> str:
    """Where ``cd``/``pushd``/``popd`` leave the shell; "" when it cannot be known."""
    positions = [k for k, a in enumerate(command.argv) if k and not a.startswith(("-", "+"))]
    if command.name == "popd" or not positions:
        return ""  # home or the directory stack: outside any workspace we know
    if positions[0] in command.dynamic_args:
        return ""
    return resolve_path(command.argv[positions[0]], cwd) or ""


def _command_text(command: SimpleCommand) -> str:
    parts = [f"{k}={shlex.quote(v)}" for k, v in command.assignments]
    parts.extend(shlex.quote(a) for a in command.argv)
    parts.extend(f"{r.op}{shlex.quote(r.target)}" for r in command.redirects)
    return " ".join(parts)


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
