"""Compiled policy rules and how each kind matches its subject."""
from __future__ import annotations

import enum
import posixpath
import re
from dataclasses import dataclass, field
from functools import lru_cache

from services.policy.core.argv_specs import ArgvReport, FlagTable, ProgramJudge, check_argv
from services.policy.core.shell_parser import SimpleCommand


class Decision(enum.IntEnum):
    """Ordered so that ``max()`` is the strictest decision."""

    ALLOW = 1
    PROMPT = 2
    FORBIDDEN = 3

    @classmethod
    def parse(cls, text: str) -> Decision:
        return cls[text.upper()]


class RiskLevel(enum.IntEnum):
    """Mirrors llmesh.tools.v1.RiskLevel numbers."""

    UNSPECIFIED = 0
    READ_ONLY = 1
    WRITE = 2
    DANGEROUS = 3


@lru_cache(maxsize=4096)
def compile_glob(pattern: str) -> re.Pattern[str]:
    """Path glob: ``**`` crosses directories, ``*`` and ``?`` do not."""
    out, i, n = [], 0, len(pattern)
    while i < n:
        c = pattern[i]
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif c == "*":
            out.append("[^/]*")
            i += 1
        elif c == "?":
            out.append("[^/]")
            i += 1
        elif c == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                out.append(re.escape(c))
                i += 1
            else:
                body = pattern[i + 1:end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = end + 1
        else:
            out.append(re.escape(c))
            i += 1
    return re.compile("".join(out) + r"\Z", re.DOTALL)


@lru_cache(maxsize=4096)
def compile_token_glob(pattern: str) -> re.Pattern[str]:
    """Token glob for argv words: ``*`` matches anything, slashes included."""
    return compile_glob(pattern.replace("**", "*").replace("*", "**"))


def combine_globs(patterns: list[str]) -> re.Pattern[str] | None:
    """One regex matching any of the token globs; None for no patterns."""
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{compile_token_glob(p).pattern})" for p in patterns), re.DOTALL)


@dataclass(frozen=True)
class TokenPattern:
    """One argv position: exact alternatives plus glob alternatives."""

    exact: frozenset[str]
    globs: tuple[re.Pattern[str], ...] = ()

    def matches(self, token: str) -> bool:
        return token in self.exact or any(g.match(token) for g in self.globs)


@dataclass(frozen=True)
class Rule:
    rule_id: str
    decision: Decision
    justification: str
    line: int


@dataclass(frozen=True)
class PrefixRule(Rule):
    prefix: tuple[TokenPattern, ...] = ()
    # When set, at least one argument after the prefix must match this
    # (the rule's args_any globs joined into one alternation).
    args_any: re.Pattern[str] | None = None
    # Only when the command reads a pipe (``curl ... | sh``).
    stdin_piped: bool = False
    # argv must be exactly as long as the prefix.
    exact: bool = False

    def matches(self, command: SimpleCommand) -> bool:
        argv = command.argv
        if len(argv) < len(self.prefix) or (self.exact and (len(argv) != len(self.prefix) or command.wraps)):
            return False
        if self.stdin_piped and not command.stdin_piped:
            return False
        for k, pattern in enumerate(self.prefix):
            if k in command.dynamic_args or not pattern.matches(argv[k]):
                return False
        if self.args_any is not None:
            match = self.args_any.match
            # Files read through ``<`` count as arguments too.
            read = (r.target for r in command.redirects if r.op in ("<", "<>"))
            return any(match(arg) for arg in argv[len(self.prefix):]) or any(match(arg) for arg in read)
        return True


@dataclass(frozen=True)
class ArgvRule(Rule):
    """Commands whose every option and operand must fit a flag table."""

    tables: dict[str, FlagTable] = field(default_factory=dict)

    def check(self, command: SimpleCommand, judge: ProgramJudge) -> ArgvReport:
        return check_argv(self.tables[command.name], command.argv, command.dynamic_args, judge,
                          fixed=command.fixed_args)


class EnvSource(enum.Enum):
    CALL = "call"          # the tool call's ``env`` argument
    COMMAND = "command"    # NAME=value inside the command: prefixes, export, env NAME=value
    ANY = "any"


@dataclass(frozen=True)
class EnvRule(Rule):
    """Environment variable names, from the call's env or set inside the command."""

    names: re.Pattern[str] | None = None
    excepted: re.Pattern[str] | None = None
    source: EnvSource = EnvSource.ANY

    def matches(self, name: str, source: EnvSource) -> bool:
        if self.source is not EnvSource.ANY and self.source is not source:
            return False
        if self.names is None or not self.names.match(name):
            return False
        return self.excepted is None or not self.excepted.match(name)


class Where(enum.Enum):
    INSIDE = "inside"
    OUTSIDE = "outside"
    ANY = "any"


class Access(enum.Enum):
    WRITE = "write"    # a file a command writes, deletes or changes
    CWD = "cwd"        # the directory the call starts in


@dataclass(frozen=True)
class PathRule(Rule):
    where: Where = Where.ANY
    # Globs starting with "/" match the absolute path; others the path
    # relative to the workspace (so they only match inside it).
    globs: tuple[str, ...] = ()
    excludes: tuple[str, ...] = ()
    access: frozenset[Access] = frozenset({Access.WRITE})

    def matches(self, path: str, workspace: str, access: Access = Access.WRITE) -> bool:
        if access not in self.access:
            return False
        inside = is_inside(path, workspace)
        if self.where is Where.INSIDE and not inside:
            return False
        if self.where is Where.OUTSIDE and inside:
            return False
        if any(_glob_hits(g, path, workspace, inside) for g in self.excludes):
            return False
        return not self.globs or any(_glob_hits(g, path, workspace, inside) for g in self.globs)


def _glob_hits(pattern: str, path: str, workspace: str, inside: bool) -> bool:
    if pattern.startswith("/"):
        return compile_glob(pattern).match(path) is not None
    if not inside:
        return False
    relative = path[len(workspace):].lstrip("/") if workspace != "/" else path.lstrip("/")
    return compile_glob(pattern).match(relative) is not None


def is_inside(path: str, workspace: str) -> bool:
    if not workspace:
        return False
    return path == workspace or path.startswith(workspace.rstrip("/") + "/")


def resolve_path(path: str, cwd: str) -> str | None:
    """Absolute, normalised form of ``path``; None when it cannot be known."""
    if path.startswith("~"):
        # Home is never inside a workspace we can name; judge it as outside.
        return "/~home" + posixpath.normpath("/" + path[1:].lstrip("/")).rstrip("/")
    if not path.startswith("/"):
        if not cwd:
            return None
        path = cwd.rstrip("/") + "/" + path
    normalised = posixpath.normpath(path)
    # posixpath keeps a leading "//"; the kernel treats it as "/".
    return "/" + normalised.lstrip("/")


@dataclass(frozen=True)
class ToolRule(Rule):
    tools: tuple[re.Pattern[str], ...] = ()

    def matches(self, tool_name: str) -> bool:
        return any(p.match(tool_name) for p in self.tools)


@dataclass(frozen=True)
class ConstructRule(Rule):
    construct: str = ""


KNOWN_CONSTRUCTS = frozenset({"recursive_function", "arithmetic_expansion"})


@dataclass(frozen=True)
class WriteTargetSpec:
    """Which words of a command name files it writes."""

    # "all", "last", "all_but_first", "leading" (the operands before the first
    # option, like find's roots) or "" (only option values below).
    targets: str = ""
    option_values: frozenset[str] = frozenset()
    option_prefixes: tuple[str, ...] = ()
    # Only when one of these arguments is present (``sed -i``).
    when_args: tuple[re.Pattern[str], ...] = ()

    def paths(self, argv: tuple[str, ...], dynamic: frozenset[int]) -> list[tuple[str, bool]]:
        if self.when_args and not any(g.match(a) for a in argv[1:] for g in self.when_args):
            return []
        found: list[tuple[str, bool]] = []
        operands: list[tuple[str, bool]] = []
        k, options_done = 1, False
        while k < len(argv):
            arg = argv[k]
            if not options_done and arg == "--":
                options_done = True
            elif not options_done and arg in self.option_values and k + 1 < len(argv):
                found.append((argv[k + 1], k + 1 in dynamic))
                k += 1
            elif not options_done and arg.startswith("--") and arg.split("=", 1)[0] in self.option_values:
                found.append((arg.split("=", 1)[1], k in dynamic))
            elif any(arg.startswith(p) for p in self.option_prefixes):
                prefix = next(p for p in self.option_prefixes if arg.startswith(p))
                found.append((arg[len(prefix):], k in dynamic))
            elif options_done or not arg.startswith("-") or arg == "-":
                operands.append((arg, k in dynamic))
            k += 1
        if self.targets == "all":
            found.extend(operands)
        elif self.targets == "last" and operands:
            found.append(operands[-1])
        elif self.targets == "all_but_first":
            found.extend(operands[1:])
        elif self.targets == "leading":
            found.extend(_leading_operands(argv, dynamic))
        return found


def _leading_operands(argv: tuple[str, ...], dynamic: frozenset[int]) -> list[tuple[str, bool]]:
    leading = []
    for k, arg in enumerate(argv[1:], start=1):
        if arg.startswith(("-", "(", "!")):
            break
        leading.append((arg, k in dynamic))
    return leading or [(".", False)]


@dataclass(frozen=True)
class Defaults:
    unknown_command: Decision = Decision.PROMPT
    dynamic_command: Decision = Decision.PROMPT
    unparseable: Decision = Decision.PROMPT
    unresolved_path: Decision = Decision.PROMPT
    # A command an argv rule covers, with an option, operand or embedded
    # program its flag table does not list as safe.
    unsafe_argv: Decision = Decision.PROMPT
    risk_levels: dict[RiskLevel, Decision] = field(default_factory=lambda: {
        RiskLevel.UNSPECIFIED: Decision.PROMPT,
        RiskLevel.READ_ONLY: Decision.ALLOW,
        RiskLevel.WRITE: Decision.PROMPT,
        RiskLevel.DANGEROUS: Decision.PROMPT,
    })


@dataclass(frozen=True)
class RuleSet:
    """Rules in force for one tenant, indexed for fast lookup."""

    prefix_by_name: dict[str, tuple[PrefixRule, ...]]
    # Prefix rules whose first token is a glob; tried for every command.
    prefix_wildcards: tuple[PrefixRule, ...]
    path_rules: tuple[PathRule, ...]
    tool_rules: tuple[ToolRule, ...]
    construct_rules: tuple[ConstructRule, ...]
    argv_by_name: dict[str, tuple[ArgvRule, ...]] = field(default_factory=dict)
    env_rules: tuple[EnvRule, ...] = ()
    # One regex over the arguments tells whether any wildcard rule with
    # args_any can match at all.
    wildcard_filter: re.Pattern[str] | None = None

    @classmethod
    def build(cls, rules: list[Rule]) -> RuleSet:
        by_name: dict[str, list[PrefixRule]] = {}
        wildcards: list[PrefixRule] = []
        argv_by_name: dict[str, list[ArgvRule]] = {}
        for rule in rules:
            if isinstance(rule, ArgvRule):
                for name in rule.tables:
                    argv_by_name.setdefault(name, []).append(rule)
            if isinstance(rule, PrefixRule):
                first = rule.prefix[0]
                if first.globs:
                    wildcards.append(rule)
                for name in first.exact:
                    by_name.setdefault(name, []).append(rule)
        return cls(
            prefix_by_name={name: tuple(found) for name, found in by_name.items()},
            prefix_wildcards=tuple(wildcards),
            path_rules=tuple(r for r in rules if isinstance(r, PathRule)),
            tool_rules=tuple(r for r in rules if isinstance(r, ToolRule)),
            construct_rules=tuple(r for r in rules if isinstance(r, ConstructRule)),
            argv_by_name={name: tuple(found) for name, found in argv_by_name.items()},
            env_rules=tuple(r for r in rules if isinstance(r, EnvRule)),
            wildcard_filter=_wildcard_filter(wildcards),
        )

    def prefix_rules_for(self, command: SimpleCommand) -> list[PrefixRule]:
        candidates = self.prefix_by_name.get(command.name, ())
        found = [r for r in candidates if r.matches(command)]
        if self.prefix_wildcards:
            args_may_match = self._wildcards_may_match(command)
            # A wildcard rule also listed under this exact name was tried above.
            found.extend(r for r in self.prefix_wildcards
                         if (args_may_match or r.args_any is None) and command.name not in r.prefix[0].exact
                         and r.matches(command))
        return found

    def _wildcards_may_match(self, command: SimpleCommand) -> bool:
        match = self.wildcard_filter.match if self.wildcard_filter is not None else None
        if match is None:
            return True
        return any(match(a) for a in command.argv[1:]) or any(match(r.target) for r in command.redirects)


def _wildcard_filter(wildcards: list[PrefixRule]) -> re.Pattern[str] | None:
    patterns = [r.args_any.pattern for r in wildcards if r.args_any is not None]
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p})" for p in patterns), re.DOTALL)


@dataclass(frozen=True)
class RoleGrant:
    role: str
    tools: tuple[re.Pattern[str], ...]

    def permits(self, tool_name: str) -> bool:
        return any(p.match(tool_name) for p in self.tools)


@dataclass(frozen=True)
class TenantPolicy:
    rules: RuleSet
    roles: dict[str, RoleGrant]
    default_role: str


@dataclass(frozen=True)
class Policy:
    """Everything one policy file says, ready to evaluate."""

    version: str
    source: str
    defaults: Defaults
    shell_tools: frozenset[str]
    file_write_tools: frozenset[str]
    write_targets: dict[str, tuple[WriteTargetSpec, ...]]
    base: TenantPolicy
    tenants: dict[str, TenantPolicy]

    def for_tenant(self, tenant_id: str) -> TenantPolicy:
        return self.tenants.get(tenant_id, self.base)
