"""Flag tables: which options and operands of a command are known to be safe.

A table is written in the policy file as a string of items (or a mapping
with ``flags`` and more keys) and judged word by word against a parsed argv:

``-abc``      short boolean options a, b and c (bundled as ``-ab`` too)
``-n=``       a short option with a value (``-n5`` or ``-n 5``); ``-o=write``
              says the value is a file the command writes
``--all``     a long boolean option
``--sort=``   a long option with a value (``--sort=x`` or ``--sort x``)
``--color=?`` a long option whose value is optional (only as ``--color=x``)
``-#``        numeric options (``head -20``)
``+#``        words starting with ``+`` are options; numeric ones are allowed
``*``         any option not denied is allowed (as a boolean)
``!-O``       deny a short option; ``!--output`` denies a long one and every
              abbreviation of it (getopt accepts unique prefixes)
``$``         words only known at run time (``$x``, globs) may be options too:
              no option of this command runs programs or writes files

Value and operand kinds: ``any``, ``write`` (a path that goes through the
path rules), ``awk`` / ``sed`` (program text, judged by what it does),
``assign`` (``NAME=value``: NAME goes through the env rules), ``plus`` (must
start with ``+``) and ``command`` (words up to ``;`` or ``+``, judged as a
command of their own).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

KINDS = frozenset({"any", "write", "awk", "sed", "assign", "plus", "command"})
PROGRAM_KINDS = frozenset({"awk", "sed"})
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_TABLE_KEYS = frozenset({"flags", "operands", "program", "options_first", "operands_need", "subcommands",
                         "whole_word_options", "bare"})


class TableError(ValueError):
    """A flag table in the policy file is malformed."""


@dataclass(frozen=True)
class FlagTable:
    any_option: bool = False
    run_time_words: bool = False
    numeric: bool = False
    plus_options: bool = False
    # Every ``-word`` is one option (find's ``-name``), never a bundle.
    whole_word_options: bool = False
    short_flags: frozenset[str] = frozenset()
    short_values: dict[str, str] = field(default_factory=dict)
    long_flags: frozenset[str] = frozenset()
    long_values: dict[str, str] = field(default_factory=dict)
    long_optional: dict[str, str] = field(default_factory=dict)
    denied_short: frozenset[str] = frozenset()
    denied_long: tuple[str, ...] = ()
    # Kinds of the operands by position; ``rest`` applies to the ones after.
    operands: tuple[str, ...] = ()
    rest: str | None = "any"
    # The first operand is a program in this language unless an option gave one.
    program: str = ""
    options_first: bool = False
    # Operands are only allowed when one of these options is present.
    operands_need: frozenset[str] = frozenset()
    subcommands: dict[str, FlagTable] | None = None
    # With subcommands: the command may also run without one (``git --version``).
    bare: bool = False


@dataclass
class ArgvReport:
    """What a flag table found in one argv."""

    problems: list[str] = field(default_factory=list)
    writes: list[tuple[str, bool]] = field(default_factory=list)
    assigned: list[str] = field(default_factory=list)

    def merge(self, other: ArgvReport) -> None:
        self.problems.extend(other.problems)
        self.writes.extend(other.writes)
        self.assigned.extend(other.assigned)


# Judges embedded program text: (language, text) -> report.
ProgramJudge = Callable[[str, str], ArgvReport]


def parse_table(raw: Any) -> FlagTable:
    """A FlagTable from its policy-file form; raises TableError."""
    if isinstance(raw, str):
        return _parse_flags(raw, {})
    if not isinstance(raw, dict):
        raise TableError("a flag table must be a string or a mapping")
    unknown = set(raw) - _TABLE_KEYS
    if unknown:
        raise TableError(f"unknown key {min(unknown)!r} in a flag table")
    extra: dict[str, Any] = {}
    if "operands" in raw:
        extra.update(_parse_operands(raw["operands"]))
    program = raw.get("program", "")
    if program and program not in PROGRAM_KINDS:
        raise TableError(f"program must be one of {sorted(PROGRAM_KINDS)}")
    extra["program"] = program
    for key in ("options_first", "whole_word_options", "bare"):
        if not isinstance(raw.get(key, False), bool):
            raise TableError(f"{key} must be true or false")
        extra[key] = raw.get(key, False)
    need = raw.get("operands_need", [])
    if not isinstance(need, list) or not all(isinstance(n, str) for n in need):
        raise TableError("operands_need must be a list of options")
    extra["operands_need"] = frozenset(need)
    if "subcommands" in raw:
        subs = raw["subcommands"]
        if not isinstance(subs, dict) or not subs:
            raise TableError("subcommands must be a mapping of subcommand to flag table")
        extra["subcommands"] = {str(name): parse_table(body) for name, body in subs.items()}
        extra["options_first"] = True
    flags = raw.get("flags", "")
    if not isinstance(flags, str):
        raise TableError("flags must be a string")
    return _parse_flags(flags, extra)


def _parse_operands(raw: Any) -> dict[str, Any]:
    if raw == "none" or raw == []:
        return {"operands": (), "rest": None}
    if not isinstance(raw, list) or not all(isinstance(k, str) for k in raw):
        raise TableError("operands must be a list of kinds (the last may end with '...') or 'none'")
    kinds, rest = list(raw), None
    if kinds and kinds[-1].endswith("..."):
        rest = kinds.pop()[:-3]
        _check_kind(rest)
    for kind in kinds:
        _check_kind(kind)
    return {"operands": tuple(kinds), "rest": rest}


def _check_kind(kind: str) -> str:
    if kind not in KINDS:
        raise TableError(f"unknown kind {kind!r}; known: {sorted(KINDS)}")
    return kind


def _parse_flags(text: str, extra: dict[str, Any]) -> FlagTable:
    values: dict[str, Any] = {"short_flags": set(), "short_values": {}, "long_flags": set(), "long_values": {},
                              "long_optional": {}, "denied_short": set(), "denied_long": []}
    whole_word = extra.get("whole_word_options", False)
    for item in text.split():
        if item == "*":
            values["any_option"] = True
        elif item == "$":
            values["run_time_words"] = True
        elif item == "-#":
            values["numeric"] = True
        elif item == "+#":
            values["plus_options"] = True
        elif item.startswith("!--") and len(item) > 3:
            values["denied_long"].append(item[3:])
        elif item.startswith("!-") and len(item) == 3:
            values["denied_short"].add(item[2])
        elif item.startswith("--") and len(item) > 2 or whole_word and item.startswith("-") and len(item) > 1:
            name, eq, kind = item.lstrip("-").partition("=")
            if whole_word:
                name = item.partition("=")[0]
            if not eq:
                values["long_flags"].add(name)
            elif kind.startswith("?"):
                values["long_optional"][name] = _check_kind(kind[1:] or "any")
            else:
                values["long_values"][name] = _check_kind(kind or "any")
        elif item.startswith("-") and len(item) > 1:
            letters, eq, kind = item[1:].partition("=")
            if eq:
                if len(letters) != 1:
                    raise TableError(f"{item!r}: an option with a value is one letter, like -n=")
                values["short_values"][letters] = _check_kind(kind or "any")
            else:
                values["short_flags"].update(letters)
        else:
            raise TableError(f"{item!r} is not an option item (-x, -x=, --name, --name=, *, $, -#, +#, !-x)")
    values["short_flags"] = frozenset(values["short_flags"])
    values["long_flags"] = frozenset(values["long_flags"])
    values["denied_short"] = frozenset(values["denied_short"])
    values["denied_long"] = tuple(values["denied_long"])
    return FlagTable(**values, **extra)


def check_argv(table: FlagTable, argv: tuple[str, ...], dynamic: frozenset[int], judge: ProgramJudge,
               start: int = 1, fixed: frozenset[int] = frozenset()) -> ArgvReport:
    """Every word of ``argv[start:]`` against ``table``; ``fixed`` run-time words never become options."""
    return _Checker(table, argv, dynamic, judge, fixed).run(start)


class _Checker:
    def __init__(self, table: FlagTable, argv: tuple[str, ...], dynamic: frozenset[int], judge: ProgramJudge,
                 fixed: frozenset[int]) -> None:
        self.table, self.argv, self.dynamic, self.judge, self.fixed = table, argv, dynamic, judge, fixed
        self.report = ArgvReport()
        self.seen: set[str] = set()
        self.program_given = False

    def problem(self, text: str) -> None:
        self.report.problems.append(text)

    def run(self, start: int) -> ArgvReport:
        table, argv = self.table, self.argv
        operands: list[int] = []
        k, options_done = start, False
        while k < len(argv):
            word = argv[k]
            if not options_done and word == "--" and not table.whole_word_options:
                options_done = True
                k += 1
                continue
            if not options_done and k in self.dynamic and k not in self.fixed and not table.run_time_words:
                self.problem(f"{word!r} is only known at run time and could be any option")
                k += 1
                continue
            if not options_done and self._is_option(word):
                k = self._option(k)
                continue
            operands.append(k)
            if table.options_first:
                options_done = True
            k += 1
        if table.subcommands is not None:
            return self._subcommand(operands)
        self._operands(operands)
        return self.report

    def _is_option(self, word: str) -> bool:
        if word.startswith("-") and len(word) > 1:
            return True
        return self.table.plus_options and word.startswith("+") and len(word) > 1

    def _option(self, k: int) -> int:
        word, table = self.argv[k], self.table
        if word.startswith("+"):
            if not word[1:].isdigit():
                self.problem(f"option {word!r} is not known to be read-only")
            return k + 1
        if table.whole_word_options:
            return self._long(k, word, word, "", False)
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            return self._long(k, word, name, value, bool(eq))
        if table.numeric and word[1:].isdigit():
            return k + 1
        for i, letter in enumerate(word[1:], start=1):
            if letter in table.denied_short:
                self.problem(f"option -{letter} (in {word!r}) is not allowed")
                return k + 1
            if letter in table.short_values:
                self.seen.add("-" + letter)
                if i + 1 < len(word):
                    self._value(table.short_values[letter], word[i + 1:], k in self.dynamic)
                    return k + 1
                return self._next_value(k, table.short_values[letter])
            if letter in table.short_flags:
                self.seen.add("-" + letter)
            elif not table.any_option:
                self.problem(f"option -{letter} (in {word!r}) is not known to be read-only")
                return k + 1
        return k + 1

    def _long(self, k: int, word: str, name: str, value: str, attached: bool) -> int:
        table = self.table
        key = name if table.whole_word_options else "--" + name
        if any(denied.startswith(name) for denied in table.denied_long) and name:
            self.problem(f"option {word!r} is not allowed")
            return k + 1
        self.seen.add(key)
        if name in table.long_values:
            kind = table.long_values[name]
            if attached:
                self._value(kind, value, k in self.dynamic)
                return k + 1
            return self._next_value(k, kind)
        if name in table.long_optional:
            if attached:
                self._value(table.long_optional[name], value, k in self.dynamic)
            return k + 1
        if name in table.long_flags and not attached:
            return k + 1
        if not table.any_option or name in table.long_flags:
            self.problem(f"option {word!r} is not known to be read-only")
        return k + 1

    def _next_value(self, k: int, kind: str) -> int:
        if kind == "command":
            end = k + 1
            while end < len(self.argv) and self.argv[end] not in (";", "+"):
                end += 1
            return end + 1
        if k + 1 < len(self.argv):
            self._value(kind, self.argv[k + 1], k + 1 in self.dynamic)
        return k + 2

    def _value(self, kind: str, value: str, dynamic: bool) -> None:
        if kind == "write":
            self.report.writes.append((value, dynamic))
        elif kind in PROGRAM_KINDS:
            self.program_given = True
            self._program(kind, value, dynamic)
        elif kind == "assign":
            self._assignment(value, dynamic)
        elif kind == "plus" and not value.startswith("+"):
            self.problem(f"{value!r} must start with '+'")

    def _program(self, kind: str, text: str, dynamic: bool) -> None:
        if dynamic:
            self.problem(f"the {kind} program is only known at run time")
        else:
            self.report.merge(self.judge(kind, text))

    def _assignment(self, word: str, dynamic: bool) -> None:
        name = word.partition("=")[0]
        if not _NAME.fullmatch(name):
            self.problem(f"{word!r} is not a plain NAME=value")
        else:
            self.report.assigned.append(name)

    def _operands(self, positions: list[int]) -> None:
        table = self.table
        if table.program and not self.program_given:
            if not positions:
                return
            first, positions = positions[0], positions[1:]
            self._program(table.program, self.argv[first], first in self.dynamic)
        if positions and table.operands_need and not (self.seen & table.operands_need):
            self.problem(f"operands are only known to be read-only with one of {sorted(table.operands_need)}")
            return
        for n, k in enumerate(positions):
            kind = table.operands[n] if n < len(table.operands) else table.rest
            if kind is None:
                self.problem(f"operand {self.argv[k]!r} is not known to be read-only")
                return
            self._value(kind, self.argv[k], k in self.dynamic)

    def _subcommand(self, operands: list[int]) -> ArgvReport:
        subs = self.table.subcommands or {}
        if not operands:
            if not self.table.bare:
                self.problem(f"needs one of the subcommands {', '.join(sorted(subs))}")
            return self.report
        k = operands[0]
        name = self.argv[k]
        if k in self.dynamic:
            self.problem(f"the subcommand {name!r} is only known at run time")
        elif name not in subs:
            self.problem(f"subcommand {name!r} is not known to be read-only")
        else:
            self.report.merge(check_argv(subs[name], self.argv, self.dynamic, self.judge, k + 1, self.fixed))
        return self.report
