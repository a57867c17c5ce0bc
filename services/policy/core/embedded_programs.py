"""Judges programs embedded in a command line: awk programs and sed scripts.

Both languages can run commands and write files, so a "read-only" awk or sed
is only read-only when its program is. Each judge reads the program the way
its interpreter would, far enough to find every place that runs a command or
opens a file for writing; anything it cannot read with certainty is reported
as a problem (so the command is prompted), never guessed to be safe. When the
two readings could differ, the judge takes the one that sees more code.
"""
from __future__ import annotations

import re

from services.policy.core.argv_specs import ArgvReport

MAX_PROGRAM_CHARS = 16 * 1024
_AWK_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# After these tokens awk expects an operand, so '/' opens a regex literal.
_AWK_REGEX_AFTER = frozenset({"", "(", ",", "{", "}", ";", "\n", "!", "~", "&&", "||", "?", ":", "=", "==", "!=",
                              "<", "<=", ">", ">=", "+", "-", "*", "%", "^", "+=", "-=", "*=", "/=", "%=", "^=",
                              "print", "printf", "return", "in"})
_AWK_EXEC_WORDS = {"system": "calls system() to run a command"}
# Statement ends: a redirection target is the expression up to one of these.
_AWK_STATEMENT_END = frozenset({";", "}", "\n", "{"})


def judge_program(language: str, text: str) -> ArgvReport:
    if len(text) > MAX_PROGRAM_CHARS:
        report = ArgvReport()
        report.problems.append(f"the {language} program is longer than {MAX_PROGRAM_CHARS} characters")
        return report
    return judge_awk(text) if language == "awk" else judge_sed(text)


# --- awk -----------------------------------------------------------------

def _awk_tokens(text: str) -> list[tuple[str, str]] | str:
    """(kind, value) tokens with strings and regex literals as single tokens; a str is an error."""
    tokens: list[tuple[str, str]] = []
    i, n = 0, len(text)
    last = ""
    while i < n:
        c = text[i]
        if c in " \t\r":
            i += 1
        elif c == "\\" and text.startswith("\\\n", i):
            i += 2
        elif c == "#":
            while i < n and text[i] != "\n":
                i += 1
        elif c == '"':
            end = _quoted_end(text, i + 1, '"')
            if end < 0:
                return "an unterminated string"
            tokens.append(("string", text[i + 1:end]))
            i = end + 1
        elif c == "/" and last in _AWK_REGEX_AFTER:
            end = _quoted_end(text, i + 1, "/")
            if end < 0:
                return "an unterminated regular expression"
            tokens.append(("regex", text[i + 1:end]))
            i = end + 1
        elif c.isalpha() or c == "_":
            word = _AWK_WORD.match(text, i)
            assert word is not None
            tokens.append(("word", word[0]))
            i = word.end()
        else:
            op = next((o for o in ("&&", "||", "|&", ">>", "==", "!=", "<=", ">=", "+=", "-=", "*=", "/=", "%=",
                                   "^=", "++", "--") if text.startswith(o, i)), c)
            tokens.append(("op", op))
            i += len(op)
        if tokens:
            kind, value = tokens[-1]
            last = value if kind in ("op", "word") and (kind == "op" or value in _AWK_REGEX_AFTER) else "value"
            if kind in ("string", "regex"):
                last = "value"
    return tokens


def _quoted_end(text: str, i: int, quote: str) -> int:
    while i < len(text):
        if text[i] == "\\":
            i += 2
            continue
        if text[i] == quote:
            return i
        if text[i] == "\n":
            return -1
        i += 1
    return -1


def judge_awk(text: str) -> ArgvReport:
    report = ArgvReport()
    tokens = _awk_tokens(text)
    if isinstance(tokens, str):
        report.problems.append(f"the awk program has {tokens}")
        return report
    in_print, depth = False, 0
    for k, (kind, value) in enumerate(tokens):
        if kind == "string" and "/inet" in value:
            report.problems.append("the awk program opens a network connection (/inet)")
        if kind == "word" and value in _AWK_EXEC_WORDS:
            report.problems.append(f"the awk program {_AWK_EXEC_WORDS[value]}")
        if kind != "op" and kind != "word":
            continue
        if value in ("|", "|&"):
            report.problems.append("the awk program pipes to or from a command")
        elif value == "@":
            report.problems.append("the awk program uses a gawk directive or indirect call (@)")
        elif value in ("print", "printf"):
            in_print, depth = True, 0
        elif value == "(":
            depth += 1
        elif value == ")":
            depth -= 1
        elif value in _AWK_STATEMENT_END:
            in_print = False
        elif value in (">", ">>") and in_print and depth <= 0:
            _awk_output(tokens, k + 1, report)
    return report


def _awk_output(tokens: list[tuple[str, str]], k: int, report: ArgvReport) -> None:
    target = []
    while k < len(tokens) and tokens[k][1] not in _AWK_STATEMENT_END:
        target.append(tokens[k])
        k += 1
    if len(target) == 1 and target[0][0] == "string":
        report.writes.append((target[0][1], False))
    else:
        report.writes.append(("".join(v for _, v in target) or "?", True))


# --- sed -----------------------------------------------------------------

_SED_SIMPLE = frozenset("=dDgGhHlnNpPxzFqQLl")
_SED_WITH_NUMBER = frozenset("qQlL")
_SED_S_FLAGS = frozenset("gpiImM0123456789")


class _SedError(Exception):
    pass


def judge_sed(text: str) -> ArgvReport:
    report = ArgvReport()
    try:
        _SedReader(text, report).run()
    except _SedError as exc:
        report.problems.append(f"the sed script {exc}")
    return report


class _SedReader:
    """Reads a script the way GNU sed does, command by command.

    Where a reading is uncertain it ends a regex no later than sed would, so
    what sed runs as commands is read as commands here too.
    """

    def __init__(self, text: str, report: ArgvReport) -> None:
        self.text, self.i, self.report = text, 0, report

    def peek(self) -> str:
        return self.text[self.i] if self.i < len(self.text) else ""

    def skip(self, chars: str) -> None:
        while self.i < len(self.text) and self.text[self.i] in chars:
            self.i += 1

    def rest_of_line(self) -> str:
        end = self.text.find("\n", self.i)
        end = len(self.text) if end < 0 else end
        line, self.i = self.text[self.i:end], end
        return line

    def run(self) -> None:
        while True:
            self.skip(" \t\n;")
            if self.i >= len(self.text):
                return
            if self.peek() == "#":
                self.rest_of_line()
                continue
            self.address()
            self.skip(" \t")
            if self.peek() == ",":
                self.i += 1
                self.skip(" \t")
                self.address()
                self.skip(" \t")
            while self.peek() == "!":
                self.i += 1
                self.skip(" \t")
            self.command()

    def address(self) -> None:
        c = self.peek()
        if c.isdigit() or c in "+~":
            self.i += 1
            self.skip("0123456789~")
        elif c == "$":
            self.i += 1
        elif c == "/" or c == "\\":
            if c == "\\":
                self.i += 1
            delimiter = self.peek()
            if not delimiter or delimiter in "\n\\":
                raise _SedError("has a malformed address")
            self.i += 1
            self.delimited(delimiter, regex=True)
            self.skip("IM")

    def delimited(self, delimiter: str, regex: bool = False) -> str:
        """Text up to ``delimiter``; in a regex, as in GNU sed, a bracket expression may hold it."""
        start = self.i
        while self.i < len(self.text):
            c = self.text[self.i]
            if c == "\\":
                self.i += 2
                continue
            if c == "[" and regex:
                self.bracket()
                continue
            if c == delimiter:
                self.i += 1
                return self.text[start:self.i - 1]
            self.i += 1
        raise _SedError("has an unterminated regular expression or replacement")

    def bracket(self) -> None:
        text, i = self.text, self.i + 1
        if text.startswith("^", i):
            i += 1
        if text.startswith("]", i):
            i += 1  # a ']' first is a literal
        while i < len(text):
            if text[i] == "[" and text[i + 1:i + 2] in (":", ".", "="):
                end = text.find(text[i + 1] + "]", i + 2)
                if end < 0:
                    break
                i = end + 2
            elif text[i] == "]":
                self.i = i + 1
                return
            else:
                i += 1
        raise _SedError("has an unterminated bracket expression")

    def command(self) -> None:
        c = self.peek()
        if not c:
            raise _SedError("ends after an address")
        self.i += 1
        if c in "{}":
            return
        if c in _SED_SIMPLE:
            if c in _SED_WITH_NUMBER:
                self.skip(" \t")
                self.skip("0123456789")
            self.end_of_command()
        elif c in "aic":
            self.text_argument()
        elif c in ":btTv":
            self.skip(" \t")
            label_end = min((p for p in (self.text.find("\n", self.i), self.text.find(";", self.i)) if p >= 0),
                            default=len(self.text))
            self.i = label_end
        elif c in "rR":
            self.rest_of_line()
        elif c in "wW":
            self.write_target()
        elif c == "e":
            raise _SedError("runs a command (e)")
        elif c == "s":
            self.substitute()
        elif c == "y":
            delimiter = self.peek()
            if not delimiter or delimiter in "\n\\":
                raise _SedError("has a malformed y command")
            self.i += 1
            self.delimited(delimiter)
            self.delimited(delimiter)
            self.end_of_command()
        else:
            raise _SedError(f"has the command {c!r}, not known to be read-only")

    def end_of_command(self) -> None:
        self.skip(" \t")
        c = self.peek()
        if c and c not in ";\n}#":
            raise _SedError(f"has {c!r} where a command should end")

    def text_argument(self) -> None:
        # a\ text, a text; a backslash at the end of a line continues it.
        while True:
            line = self.rest_of_line()
            if not line.endswith("\\") or self.i >= len(self.text):
                return
            self.i += 1

    def write_target(self) -> None:
        self.skip(" \t")
        path = self.rest_of_line()
        if not path:
            raise _SedError("writes to a file without a name")
        self.report.writes.append((path, False))

    def substitute(self) -> None:
        delimiter = self.peek()
        if not delimiter or delimiter in "\n\\":
            raise _SedError("has a malformed s command")
        self.i += 1
        self.delimited(delimiter, regex=True)
        self.delimited(delimiter)
        while True:
            c = self.peek()
            if c == "e":
                raise _SedError("runs the result of a substitution as a command (s///e)")
            if c == "w":
                self.i += 1
                self.write_target()
                return
            if c not in _SED_S_FLAGS or not c:
                break
            self.i += 1
        self.end_of_command()
