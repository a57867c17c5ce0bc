"""Turns shell text into the flat list of simple commands it would run.

Lists (``;``, ``&&``, ``||``, ``&``, newlines), pipelines, subshells, brace
groups, control-flow keywords and function bodies are flattened: policy
judges every command that could run, whatever the control flow. Command and
process substitutions are parsed recursively and their commands added.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from services.policy.core.shell_lexer import REDIRECTIONS, Operator, ShellSyntaxError, Word, tokenize

MAX_NESTING = 8
# More simple commands than this in one call are not judged one by one.
MAX_SIMPLE_COMMANDS = 1024
# Redirections that open a file for writing (``>&`` with a file name too).
WRITE_REDIRECTIONS = frozenset({">", ">>", ">|", "&>", "&>>", "<>", ">&"})
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[[^\]]*\])?\+?=")
# Words that open or close compound commands; they run nothing themselves.
_SKIPPED_KEYWORDS = frozenset({"{", "}", "!", "if", "then", "elif", "else", "fi", "do", "done",
                               "while", "until", "time", "coproc"})
# Keywords followed by names or word lists rather than commands.
_HEADER_KEYWORDS = frozenset({"for", "select"})
_SEPARATORS = frozenset({";", "&", "&&", "||", "\n", ";;"})


@dataclass(frozen=True)
class Redirect:
    op: str
    target: str
    dynamic: bool = False

    @property
    def writes(self) -> bool:
        if self.op in (">&", "<&") and (self.target.isdigit() or self.target == "-"):
            return False
        return self.op in WRITE_REDIRECTIONS


@dataclass(frozen=True)
class SimpleCommand:
    argv: tuple[str, ...]
    # Positions in argv whose value is only known at run time.
    dynamic_args: frozenset[int] = frozenset()
    # Those of them that can never become an option word (see Word.fixed_start).
    fixed_args: frozenset[int] = frozenset()
    assignments: tuple[tuple[str, str], ...] = ()
    redirects: tuple[Redirect, ...] = ()
    # True when the command reads the output of the previous pipeline stage.
    stdin_piped: bool = False
    # A wrapper's own words (``nice -n 5`` of ``nice -n 5 ls``): the command it
    # runs follows as a command of its own.
    wraps: bool = False

    @property
    def name(self) -> str:
        return self.argv[0] if self.argv else ""

    @property
    def name_is_dynamic(self) -> bool:
        return 0 in self.dynamic_args

    @property
    def reads_stdin_redirect(self) -> bool:
        return any(r.op in ("<", "<>", "<&") for r in self.redirects)


@dataclass
class ParsedScript:
    commands: list[SimpleCommand] = field(default_factory=list)
    # Structural findings that rules may match, e.g. "recursive_function".
    constructs: set[str] = field(default_factory=set)


@dataclass
class _Builder:
    words: list[Word] = field(default_factory=list)
    assignments: list[tuple[str, str]] = field(default_factory=list)
    redirects: list[Redirect] = field(default_factory=list)
    stdin_piped: bool = False
    skipping_header: bool = False

    def empty(self) -> bool:
        return not (self.words or self.assignments or self.redirects)


@dataclass
class _FunctionScope:
    name: str
    brace_depth: int


def parse_script(text: str, depth: int = 0) -> ParsedScript:
    """Parse ``text``; raises ShellSyntaxError when it cannot be understood."""
    if depth > MAX_NESTING:
        raise ShellSyntaxError("command substitutions nested too deeply")
    try:
        tokens = tokenize(text)
    except RecursionError:
        raise ShellSyntaxError("quotes and substitutions nested too deeply") from None
    return _Parser(depth).run(tokens)


class _Parser:
    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.out = ParsedScript()
        self.current = _Builder()
        self.paren_depth = 0
        self.brace_depth = 0
        self.functions: list[_FunctionScope] = []
        self.pending_function = ""

    def run(self, tokens: list[Word | Operator]) -> ParsedScript:
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if isinstance(token, Word):
                self._word(token)
                i += 1
                continue
            op = token.op
            if op in REDIRECTIONS:
                i = self._redirect(token, tokens, i)
                continue
            if op in _SEPARATORS:
                self._finish(piped_next=False)
            elif op in ("|", "|&"):
                if self.current.empty():
                    raise ShellSyntaxError("pipe without a command before it")
                self._finish(piped_next=True)
            elif op == "(":
                i = self._open_paren(tokens, i)
                continue
            elif op == ")":
                if self.paren_depth == 0:
                    raise ShellSyntaxError("unbalanced ')'")
                self.paren_depth -= 1
                self._finish(piped_next=False)
            i += 1
        self._finish(piped_next=False)
        if self.paren_depth:
            raise ShellSyntaxError("unbalanced '('")
        return self.out

    def _word(self, word: Word) -> None:
        cur = self.current
        self._nested(word)
        if cur.skipping_header:
            return
        if not cur.words:
            if word.raw == "{" or word.raw == "}":
                self._brace(word.raw)
                return
            if word.raw in _SKIPPED_KEYWORDS:
                return
            if word.raw in _HEADER_KEYWORDS:
                cur.skipping_header = True
                return
            if word.raw == "case":
                raise ShellSyntaxError("case statements are not supported")
            if word.raw == "function":
                cur.words.append(word)
                return
            if _ASSIGNMENT.match(word.raw):
                name, _, value = word.value.partition("=")
                cur.assignments.append((name.rstrip("+"), value))
                return
        if len(cur.words) == 1 and cur.words[0].raw == "function":
            # ``function name { ... }``: a definition, not a command.
            cur.words.clear()
            self.pending_function = word.value
            return
        cur.words.append(word)

    def _nested(self, word: Word) -> None:
        if word.arithmetic:
            self.out.constructs.add("arithmetic_expansion")
        for source in word.substitutions:
            nested = parse_script(source, self.depth + 1)
            self.out.commands.extend(nested.commands)
            self.out.constructs |= nested.constructs
        self._check_size()

    def _check_size(self) -> None:
        if len(self.out.commands) > MAX_SIMPLE_COMMANDS:
            raise ShellSyntaxError(f"more than {MAX_SIMPLE_COMMANDS} simple commands")

    def _brace(self, brace: str) -> None:
        if brace == "{":
            self.brace_depth += 1
            if self.pending_function:
                self.functions.append(_FunctionScope(self.pending_function, self.brace_depth))
                self.pending_function = ""
            return
        if self.functions and self.functions[-1].brace_depth == self.brace_depth:
            self.functions.pop()
        self.brace_depth = max(0, self.brace_depth - 1)

    def _open_paren(self, tokens: list[Word | Operator], i: int) -> int:
        nxt = tokens[i + 1] if i + 1 < len(tokens) else None
        cur = self.current
        if len(cur.words) == 1 and isinstance(nxt, Operator) and nxt.op == ")":
            # ``name() { body }`` defines a function.
            self.pending_function = cur.words[0].value
            self.current = _Builder()
            return i + 2
        if cur.words:
            raise ShellSyntaxError(f"unexpected '(' after {cur.words[-1].value!r}")
        self.paren_depth += 1
        return i + 1

    def _redirect(self, token: Operator, tokens: list[Word | Operator], i: int) -> int:
        target = tokens[i + 1] if i + 1 < len(tokens) else None
        if not isinstance(target, Word):
            raise ShellSyntaxError(f"redirection {token.op!r} without a target")
        self._nested(target)
        if token.op not in ("<<", "<<-", "<<<"):
            self.current.redirects.append(Redirect(token.op, target.value, target.dynamic))
        return i + 2

    def _finish(self, piped_next: bool) -> None:
        cur = self.current
        if cur.words or cur.assignments or cur.redirects:
            command = SimpleCommand(
                argv=tuple(w.value for w in cur.words),
                dynamic_args=frozenset(k for k, w in enumerate(cur.words) if w.dynamic),
                fixed_args=frozenset(k for k, w in enumerate(cur.words) if w.dynamic and w.fixed_start),
                assignments=tuple(cur.assignments),
                redirects=tuple(cur.redirects),
                stdin_piped=cur.stdin_piped,
            )
            self.out.commands.append(command)
            self._check_size()
            if command.argv and any(scope.name == command.name for scope in self.functions):
                self.out.constructs.add("recursive_function")
        elif piped_next and not cur.skipping_header:
            raise ShellSyntaxError("pipe without a command before it")
        # A pipe into a subshell or group feeds its first command.
        self.current = _Builder(stdin_piped=piped_next or (cur.empty() and cur.stdin_piped))
