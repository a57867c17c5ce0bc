"""Reads a YAML policy file into a Policy, or says exactly which line is wrong.

Validation is strict: unknown keys, bad decisions and rules whose own
``match`` / ``not_match`` examples disagree with them all fail the load with
``<source>:<line>: <problem>``, so a broken edit never replaces working rules.
"""
from __future__ import annotations

import hashlib
import re
from typing import Any, TypedDict

import yaml

from services.policy.core.argv_specs import TableError, parse_table
from services.policy.core.command_expander import expand_script
from services.policy.core.embedded_programs import judge_program
from services.policy.core.rules import (
    KNOWN_CONSTRUCTS,
    Access,
    ArgvRule,
    ConstructRule,
    Decision,
    Defaults,
    EnvRule,
    EnvSource,
    PathRule,
    Policy,
    PrefixRule,
    RiskLevel,
    RoleGrant,
    Rule,
    RuleSet,
    TenantPolicy,
    TokenPattern,
    ToolRule,
    Where,
    WriteTargetSpec,
    combine_globs,
    compile_token_glob,
    resolve_path,
)
from services.policy.core.shell_lexer import ShellSyntaxError
from services.policy.core.shell_parser import parse_script

# Relative path examples of path rules are resolved inside this workspace.
EXAMPLE_WORKSPACE = "/workspace"
_RULE_KINDS = ("prefix", "path", "tool", "construct", "argv", "env")
_RULE_KEYS = frozenset({"id", "decision", "justification", "match", "not_match", "args_any", "stdin", "exact",
                        *_RULE_KINDS})
_GLOB_CHARS = frozenset("*?[")
_RULE_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class PolicyLoadError(ValueError):
    def __init__(self, source: str, line: int, problem: str) -> None:
        super().__init__(f"{source}:{line}: {problem}")
        self.source = source
        self.line = line
        self.problem = problem


class _Map(dict[Any, Any]):
    line = 0
    # Class-level empties serve missing sections; loaded nodes get their own.
    key_lines: dict[Any, int] = {}


class _Seq(list[Any]):
    line = 0
    item_lines: list[int] = []


class _RuleCommon(TypedDict):
    """The fields every Rule takes, read before its kind."""

    rule_id: str
    decision: Decision
    justification: str
    line: int


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings and sequences remember their line numbers."""


def _construct_map(loader: _LineLoader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    data = _Map()
    data.line = node.start_mark.line + 1
    data.key_lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in data:
            raise PolicyLoadError("", key_node.start_mark.line + 1, f"duplicate key {key!r}")
        data[key] = loader.construct_object(value_node, deep=True)
        data.key_lines[key] = key_node.start_mark.line + 1
    return data


def _construct_seq(loader: _LineLoader, node: yaml.SequenceNode) -> _Seq:
    data = _Seq(loader.construct_object(child, deep=True) for child in node.value)
    data.line = node.start_mark.line + 1
    data.item_lines = [child.start_mark.line + 1 for child in node.value]
    return data


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def load_policy(text: str, source: str = "policy.yaml") -> Policy:
    """Parse, validate and compile ``text``; raises PolicyLoadError."""
    try:
        data = yaml.load(text, Loader=_LineLoader)
    except PolicyLoadError as exc:
        raise PolicyLoadError(source, exc.line, exc.problem) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise PolicyLoadError(source, line, f"invalid YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise PolicyLoadError(source, 1, f"invalid YAML: {exc}") from None
    return _Compiler(source).policy(data, hashlib.sha256(text.encode()).hexdigest()[:16])


class _Compiler:
    def __init__(self, source: str) -> None:
        self.source = source
        # Each rule with the mapping it came from, for checking its examples.
        self.rule_bodies: list[tuple[Rule, _Map]] = []

    def fail(self, line: int, problem: str) -> PolicyLoadError:
        return PolicyLoadError(self.source, line, problem)

    def mapping(self, value: Any, line: int, what: str, allowed: frozenset[str] | set[str]) -> _Map:
        if not isinstance(value, _Map):
            raise self.fail(line, f"{what} must be a mapping")
        for key in value:
            if key not in allowed:
                raise self.fail(value.key_lines[key], f"unknown key {key!r} in {what}")
        return value

    def strings(self, value: Any, line: int, what: str) -> list[str]:
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise self.fail(line, f"{what} must be a string or a list of non-empty strings")
        return list(value)

    def decision(self, value: Any, line: int) -> Decision:
        if not isinstance(value, str) or value.upper() not in Decision.__members__:
            raise self.fail(line, f"decision must be allow, prompt or forbidden, not {value!r}")
        return Decision.parse(value)

    def policy(self, data: Any, version: str) -> Policy:
        top = self.mapping(data, 1, "the policy file",
                           {"version", "defaults", "tools", "write_commands", "roles", "default_role", "rules",
                            "tenants"})
        if top.get("version") != 1:
            raise self.fail(top.key_lines.get("version", 1), "version must be 1")
        defaults = self.defaults(top.get("defaults", _Map()), top.key_lines.get("defaults", 1))
        tools = self.mapping(top.get("tools", _Map()), top.key_lines.get("tools", 1), "tools",
                             {"shell", "file_write"})
        shell_tools = frozenset(self.strings(tools.get("shell", []), tools.line, "tools.shell"))
        file_tools = frozenset(self.strings(tools.get("file_write", []), tools.line, "tools.file_write"))
        write_targets = self.write_commands(top.get("write_commands", _Seq()), top.key_lines.get("write_commands", 1))
        base_rules = self.rules(top.get("rules", _Seq()), top.key_lines.get("rules", 1), set())
        roles = self.roles(top.get("roles", _Map()), top.key_lines.get("roles", 1))
        default_role = top.get("default_role", "")
        if default_role and default_role not in roles:
            raise self.fail(top.key_lines["default_role"], f"default_role {default_role!r} is not a defined role")
        policy = Policy(version=version, source=self.source, defaults=defaults, shell_tools=shell_tools,
                        file_write_tools=file_tools, write_targets=write_targets,
                        base=TenantPolicy(RuleSet.build(base_rules), roles, default_role), tenants={})
        tenants_raw = self.mapping(top.get("tenants", _Map()), top.key_lines.get("tenants", 1), "tenants",
                                   set(top.get("tenants", {}) or {}))
        for tenant_id, raw in tenants_raw.items():
            policy.tenants[tenant_id] = self.tenant(tenant_id, raw, tenants_raw.key_lines[tenant_id], base_rules,
                                                    roles, default_role)
        self.check_examples()
        return policy

    def defaults(self, raw: Any, line: int) -> Defaults:
        section = self.mapping(raw, line, "defaults",
                               {"unknown_command", "dynamic_command", "unparseable", "unresolved_path",
                                "unsafe_argv", "risk_levels"})
        values: dict[str, Any] = {}
        for key in ("unknown_command", "dynamic_command", "unparseable", "unresolved_path", "unsafe_argv"):
            if key in section:
                values[key] = self.decision(section[key], section.key_lines[key])
        if "risk_levels" in section:
            levels = self.mapping(section["risk_levels"], section.key_lines["risk_levels"], "defaults.risk_levels",
                                  {level.name.lower() for level in RiskLevel})
            risk = dict(Defaults().risk_levels)
            for name, decision in levels.items():
                risk[RiskLevel[name.upper()]] = self.decision(decision, levels.key_lines[name])
            values["risk_levels"] = risk
        return Defaults(**values)

    def write_commands(self, raw: Any, line: int) -> dict[str, tuple[WriteTargetSpec, ...]]:
        if not isinstance(raw, _Seq):
            raise self.fail(line, "write_commands must be a list")
        found: dict[str, list[WriteTargetSpec]] = {}
        for item, item_line in zip(raw, raw.item_lines, strict=True):
            entry = self.mapping(item, item_line, "a write_commands entry",
                                 {"commands", "targets", "option_values", "option_prefixes", "when_args"})
            targets = entry.get("targets", "")
            if targets not in ("", "all", "last", "all_but_first", "leading"):
                raise self.fail(entry.key_lines["targets"], "targets must be all, last, all_but_first or leading")
            spec = WriteTargetSpec(
                targets=targets,
                option_values=frozenset(self.strings(entry.get("option_values", []), item_line, "option_values")),
                option_prefixes=tuple(self.strings(entry.get("option_prefixes", []), item_line, "option_prefixes")),
                when_args=tuple(compile_token_glob(g) for g in self.strings(entry.get("when_args", []), item_line,
                                                                            "when_args")),
            )
            if "commands" not in entry:
                raise self.fail(item_line, "a write_commands entry needs commands")
            for name in self.strings(entry["commands"], entry.key_lines["commands"], "commands"):
                found.setdefault(name, []).append(spec)
        return {name: tuple(specs) for name, specs in found.items()}

    def roles(self, raw: Any, line: int) -> dict[str, RoleGrant]:
        section = self.mapping(raw, line, "roles", set(raw) if isinstance(raw, dict) else set())
        grants = {}
        for role, body in section.items():
            body = self.mapping(body, section.key_lines[role], f"role {role!r}", {"tools"})
            patterns = self.strings(body.get("tools", []), body.line, f"role {role!r} tools")
            grants[role] = RoleGrant(role, tuple(compile_token_glob(p) for p in patterns))
        return grants

    def tenant(self, tenant_id: str, raw: Any, line: int, base_rules: list[Rule], base_roles: dict[str, RoleGrant],
               base_default_role: str) -> TenantPolicy:
        body = self.mapping(raw, line, f"tenant {tenant_id!r}", {"inherit_rules", "rules", "roles", "default_role"})
        inherit = body.get("inherit_rules", True)
        if not isinstance(inherit, bool):
            raise self.fail(body.key_lines["inherit_rules"], "inherit_rules must be true or false")
        own = self.rules(body.get("rules", _Seq()), body.key_lines.get("rules", line),
                         {r.rule_id for r in base_rules} if inherit else set())
        roles = self.roles(body["roles"], body.key_lines["roles"]) if "roles" in body else base_roles
        default_role = body.get("default_role", base_default_role)
        if default_role and default_role not in roles:
            raise self.fail(body.key_lines.get("default_role", line),
                            f"default_role {default_role!r} is not a role of tenant {tenant_id!r}")
        rules = (base_rules if inherit else []) + own
        return TenantPolicy(RuleSet.build(rules), roles, default_role)

    def rules(self, raw: Any, line: int, taken_ids: set[str]) -> list[Rule]:
        if not isinstance(raw, _Seq):
            raise self.fail(line, "rules must be a list")
        ids = set(taken_ids)
        compiled = []
        for item, item_line in zip(raw, raw.item_lines, strict=True):
            rule = self.rule(item, item_line)
            if rule.rule_id in ids:
                raise self.fail(item_line, f"duplicate rule id {rule.rule_id!r}")
            ids.add(rule.rule_id)
            compiled.append(rule)
            self.rule_bodies.append((rule, item))
        return compiled

    def rule(self, raw: Any, line: int) -> Rule:
        body = self.mapping(raw, line, "a rule", _RULE_KEYS)
        rule_id = body.get("id")
        if not isinstance(rule_id, str) or not _RULE_ID.match(rule_id):
            raise self.fail(line, "a rule needs an id of lower-case letters, digits, '.', '_' or '-'")
        kinds = [k for k in _RULE_KINDS if k in body]
        if len(kinds) != 1:
            raise self.fail(line, f"rule {rule_id!r} needs exactly one of {', '.join(_RULE_KINDS)}")
        if "decision" not in body:
            raise self.fail(line, f"rule {rule_id!r} needs a decision")
        justification = body.get("justification")
        if not isinstance(justification, str) or not justification.strip():
            raise self.fail(line, f"rule {rule_id!r} needs a justification")
        common = _RuleCommon(rule_id=rule_id, decision=self.decision(body["decision"], body.key_lines["decision"]),
                             justification=justification.strip(), line=line)
        kind = kinds[0]
        kind_line = body.key_lines[kind]
        if kind != "prefix" and any(k in body for k in ("args_any", "stdin", "exact")):
            raise self.fail(line, f"rule {rule_id!r}: args_any, stdin and exact only apply to prefix rules")
        if kind == "prefix":
            return self.prefix_rule(body, kind_line, common)
        if kind == "path":
            spec = self.mapping(body["path"], kind_line, f"rule {rule_id!r} path",
                                {"where", "glob", "exclude", "access"})
            where = spec.get("where", "any")
            if where not in ("inside", "outside", "any"):
                raise self.fail(spec.key_lines.get("where", kind_line), "where must be inside, outside or any")
            globs = tuple(self.strings(spec.get("glob", []), kind_line, "glob"))
            excludes = tuple(self.strings(spec.get("exclude", []), kind_line, "exclude"))
            access = self.strings(spec.get("access", "write"), kind_line, "access")
            if not set(access) <= {a.value for a in Access}:
                raise self.fail(spec.key_lines.get("access", kind_line), "access must be write, cwd or a list of them")
            return PathRule(**common, where=Where(where), globs=globs, excludes=excludes,
                            access=frozenset(Access(a) for a in access))
        if kind == "argv":
            return self.argv_rule(body["argv"], kind_line, common)
        if kind == "env":
            spec = self.mapping(body["env"], kind_line, f"rule {rule_id!r} env", {"names", "except", "source"})
            source = spec.get("source", "any")
            if source not in {s.value for s in EnvSource}:
                raise self.fail(spec.key_lines.get("source", kind_line), "source must be call, command or any")
            if "names" not in spec:
                raise self.fail(kind_line, f"rule {rule_id!r}: env needs names")
            return EnvRule(**common, names=combine_globs(self.strings(spec["names"], kind_line, "names")),
                           excepted=combine_globs(self.strings(spec.get("except", []), kind_line, "except")),
                           source=EnvSource(source))
        if kind == "tool":
            names = self.strings(body["tool"], kind_line, "tool")
            return ToolRule(**common, tools=tuple(compile_token_glob(n) for n in names))
        construct = body["construct"]
        if construct not in KNOWN_CONSTRUCTS:
            raise self.fail(kind_line, f"unknown construct {construct!r}; known: {sorted(KNOWN_CONSTRUCTS)}")
        return ConstructRule(**common, construct=construct)

    def argv_rule(self, raw: Any, line: int, common: _RuleCommon) -> ArgvRule:
        tables = self.mapping(raw, line, f"rule {common['rule_id']!r} argv",
                              set(raw) if isinstance(raw, dict) else set())
        compiled = {}
        # A key may name several commands that share one table: "whoami id uname".
        for names, table in tables.items():
            try:
                parsed = parse_table(table)
            except TableError as exc:
                raise self.fail(tables.key_lines[names], f"flag table of {names!r}: {exc}") from None
            for name in str(names).split():
                if name in compiled:
                    raise self.fail(tables.key_lines[names], f"{name!r} has two flag tables in one rule")
                compiled[name] = parsed
        if not compiled:
            raise self.fail(line, f"rule {common['rule_id']!r}: argv needs at least one command")
        return ArgvRule(**common, tables=compiled)

    def prefix_rule(self, body: _Map, line: int, common: _RuleCommon) -> PrefixRule:
        raw = body["prefix"]
        if not isinstance(raw, _Seq) or not raw:
            raise self.fail(line, "prefix must be a non-empty list of tokens (a token may be a list of alternatives)")
        positions = []
        for token, token_line in zip(raw, raw.item_lines, strict=True):
            alternatives = self.strings(token, token_line, "a prefix token")
            exact = frozenset(a for a in alternatives if not (_GLOB_CHARS & set(a)))
            globs = tuple(compile_token_glob(a) for a in alternatives if _GLOB_CHARS & set(a))
            positions.append(TokenPattern(exact, globs))
        args_any = combine_globs(self.strings(body.get("args_any", []), line, "args_any"))
        stdin = body.get("stdin", "any")
        if stdin not in ("any", "piped"):
            raise self.fail(body.key_lines.get("stdin", line), "stdin must be any or piped")
        exact_len = body.get("exact", False)
        if not isinstance(exact_len, bool):
            raise self.fail(body.key_lines["exact"], "exact must be true or false")
        return PrefixRule(**common, prefix=tuple(positions), args_any=args_any, stdin_piped=stdin == "piped",
                          exact=exact_len)

    def check_examples(self) -> None:
        for rule, raw in self.rule_bodies:
            for key, expected in (("match", True), ("not_match", False)):
                if key not in raw:
                    continue
                examples = raw[key]
                if not isinstance(examples, _Seq):
                    raise self.fail(raw.key_lines[key], f"rule {rule.rule_id!r}: {key} must be a list")
                for example, line in zip(examples, examples.item_lines, strict=True):
                    if not isinstance(example, str) or not example:
                        raise self.fail(line, f"rule {rule.rule_id!r}: {key} examples must be non-empty strings")
                    if self.example_matches(rule, example, line) != expected:
                        verb = "does not match" if expected else "matches"
                        raise self.fail(line, f"rule {rule.rule_id!r} {verb} its {key} example {example!r}")

    def example_matches(self, rule: Rule, example: str, line: int) -> bool:
        if isinstance(rule, ToolRule):
            return rule.matches(example)
        if isinstance(rule, EnvRule):
            return any(rule.matches(example, source) for source in EnvSource)
        if isinstance(rule, PathRule):
            path = resolve_path(example, EXAMPLE_WORKSPACE)
            return path is not None and any(rule.matches(path, EXAMPLE_WORKSPACE, a) for a in rule.access)
        try:
            script = expand_script(parse_script(example))
        except ShellSyntaxError as exc:
            raise self.fail(line, f"rule {rule.rule_id!r}: example {example!r} does not parse: {exc}") from None
        if isinstance(rule, ConstructRule):
            return rule.construct in script.constructs
        if isinstance(rule, ArgvRule):
            # Matches when every command it covers fits its table with nothing to report.
            covered = [c for c in script.commands if c.name in rule.tables and not c.name_is_dynamic]
            return bool(covered) and all(not _report_findings(rule.check(c, judge_program)) for c in covered)
        assert isinstance(rule, PrefixRule)
        return any(rule.matches(command) for command in script.commands)


def _report_findings(report: Any) -> bool:
    return bool(report.problems or report.writes)
