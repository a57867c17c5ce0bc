"""Tokenises shell text the way bash splits it, without running anything.

Quote removal happens here (so ``'r'm`` and ``r\\m`` both become ``rm``), and
every command substitution, backtick and process substitution is kept as
source text for the parser to evaluate on its own. Words whose value depends
on run-time expansion are marked ``dynamic`` so the policy never trusts them.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

# Longest first, so ``&&`` wins over ``&`` and ``>>`` over ``>``.
OPERATORS = (
    "&>>", "<<<", "<<-", "&&", "||", ";;", "|&", "&>", ">>", ">|", ">&", "<&", "<>", "<<",
    ">", "<", "|", "&", ";", "(", ")", "\n",
)
_OPERATOR = re.compile("|".join(re.escape(o) for o in OPERATORS))
REDIRECTIONS = frozenset({"&>>", "<<<", "<<-", "&>", ">>", ">|", ">&", "<&", "<>", "<<", ">", "<"})
_METACHARS = frozenset(" \t\n;&|()<>")
# Words and operators in one text, and substitutions ($(...), `...`, <(...)) in
# one text; beyond these the command is not judged word by word.
MAX_TOKENS = 4096
MAX_SUBSTITUTIONS = 256
# A whole word made of characters that need no unquoting, expansion or glob
# handling, ending where an operator or blank starts.
_SIMPLE_WORD = re.compile(r"[^ \t\n;&|()<>\\'\"$`*?\[{#]++(?=[ \t\n;&|()]|[<>](?!\()|\Z)")
# Characters with no special meaning outside quotes, read as one run.
_QUOTED_PLAIN_RUN = re.compile(r"[^\"\\$`]++|[\\$`]")
_ANSI_PLAIN_RUN = re.compile(r"[^'\\]++")
_GLOB_RUN = re.compile(r"[*?]++")
_PLAIN_RUN = re.compile(r"(?:[^\s;&|()<>\\'\"$`*?\[\]{},.]++|\\[^\n])++")
# First characters of a word's value that may come from an expansion or a glob.
_EXPANSION_STARTS = frozenset("-$`*?[{~\\")
_IDENTIFIER_CHAR = re.compile(r"[A-Za-z_]")
_ANSI_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "e": "\x1b", "E": "\x1b",
                 "f": "\f", "v": "\v", "\\": "\\", "'": "'", '"': '"', "?": "?"}


class ShellSyntaxError(ValueError):
    """The text is not a shell command this parser understands."""


@dataclass(frozen=True)
class Word:
    value: str
    # Source text as written; needed to tell ``A=1 cmd`` from ``"A=1" cmd``.
    raw: str
    dynamic: bool = False
    substitutions: tuple[str, ...] = ()
    # Holds an arithmetic context that reads variables (``$((x))``, ``${a[i]}``):
    # bash evaluates array subscripts in their values, which can run commands.
    arithmetic: bool = False
    # An unquoted $x or $(...) whose value bash splits into several words.
    splits: bool = False

    @property
    def fixed_start(self) -> bool:
        """A run-time word that can never turn into an option: one word, and its
        first character is written literally and is not '-' (``src/$f``,
        ``./*.txt``, ``<(sort a)``, which becomes /dev/fd/N)."""
        if self.splits or not self.value:
            return False
        if self.value.startswith(("<(", ">(")):
            return True
        return self.value[0] not in _EXPANSION_STARTS


@dataclass(frozen=True)
class Operator:
    op: str
    # File descriptor written before a redirection, e.g. the 2 of ``2>``.
    fd: str = ""


Token = Word | Operator


@dataclass
class _WordBuilder:
    value: list[str] = field(default_factory=list)
    dynamic: bool = False
    substitutions: list[str] = field(default_factory=list)
    arithmetic: bool = False
    splits: bool = False
    # An unquoted '[' seen: a later ']' makes the word a glob.
    open_bracket: bool = False
    open_brace: bool = False


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into words and operators; heredoc bodies are dropped."""
    tokens: list[Token] = []
    pending_heredocs: list[tuple[str, bool]] = []
    i, n = 0, len(text)
    num_substitutions = 0
    while i < n:
        if len(tokens) > MAX_TOKENS:
            raise ShellSyntaxError(f"more than {MAX_TOKENS} words and operators")
        if tokens and isinstance(tokens[-1], Word) and tokens[-1].substitutions:
            num_substitutions += len(tokens[-1].substitutions)
            _check_substitutions(num_substitutions)
        c = text[i]
        if c in " \t":
            i += 1
            continue
        simple = _SIMPLE_WORD.match(text, i)
        if simple is not None and not (simple[0].isdigit() and text.startswith(("<", ">"), simple.end())):
            # A word with nothing to expand or unquote: the common case, read in one step.
            tokens.append(Word(simple[0], simple[0]))
            i = simple.end()
            continue
        if c == "\\" and text.startswith("\\\n", i):
            i += 2
            continue
        if c == "#":
            while i < n and text[i] != "\n":
                i += 1
            continue
        if c == "\n":
            tokens.append(Operator("\n"))
            i += 1
            if pending_heredocs:
                i = _skip_heredoc_bodies(text, i, pending_heredocs)
                pending_heredocs = []
            continue
        if c in "<>" and text.startswith("(", i + 1):
            word, i = _read_word(text, i)
            tokens.append(word)
            continue
        if c in _METACHARS:
            op = _operator_at(text, i)
            tokens.append(Operator(op))
            i += len(op)
            if op in ("<<", "<<-"):
                i = _note_heredoc(text, i, op, tokens, pending_heredocs)
            continue
        word, i = _read_word(text, i)
        if word.raw.isdigit() and i < n and text[i] in "<>":
            op = _operator_at(text, i)
            tokens.append(Operator(op, fd=word.raw))
            i += len(op)
            if op in ("<<", "<<-"):
                i = _note_heredoc(text, i, op, tokens, pending_heredocs)
            continue
        tokens.append(word)
    return tokens


def _check_substitutions(count: int) -> None:
    if count > MAX_SUBSTITUTIONS:
        raise ShellSyntaxError(f"more than {MAX_SUBSTITUTIONS} command substitutions")


def _operator_at(text: str, i: int) -> str:
    found = _OPERATOR.match(text, i)
    assert found is not None, "called at a metacharacter"
    return found[0]


def _note_heredoc(text: str, i: int, op: str, tokens: list[Token], pending: list[tuple[str, bool]]) -> int:
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i >= n or text[i] in _METACHARS:
        raise ShellSyntaxError("here-document without a delimiter")
    word, i = _read_word(text, i)
    tokens.append(Word(word.value, word.raw))
    pending.append((word.value, op == "<<-"))
    return i


def _skip_heredoc_bodies(text: str, i: int, pending: list[tuple[str, bool]]) -> int:
    for delimiter, strip_tabs in pending:
        while True:
            end = text.find("\n", i)
            line = text[i:] if end < 0 else text[i:end]
            i = len(text) if end < 0 else end + 1
            if (line.lstrip("\t") if strip_tabs else line) == delimiter:
                break
            if end < 0:
                raise ShellSyntaxError(f"here-document delimited by {delimiter!r} is not closed")
    return i


def _read_word(text: str, i: int) -> tuple[Word, int]:
    start, n = i, len(text)
    out = _WordBuilder()
    while i < n:
        c = text[i]
        if c in _METACHARS:
            if c in "<>" and text.startswith("(", i + 1):
                end = _matching_paren(text, i + 2)
                out.substitutions.append(text[i + 2:end])
                _check_substitutions(len(out.substitutions))
                out.value.append(text[i:end + 1])
                out.dynamic = True
                i = end + 1
                continue
            break
        if c == "\\" and text.startswith("\\\n", i):
            i += 2  # a backslash-newline joins lines
        elif c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise ShellSyntaxError("unterminated single quote")
            out.value.append(text[i + 1:end])
            i = end + 1
        elif c == "$" and text.startswith("'", i + 1):
            i = _read_ansi_c(text, i + 2, out)
        elif c == '"':
            i = _read_double_quoted(text, i + 1, out)
        elif c == "$" or c == "`":
            out.splits = True
            i = _read_expansion(text, i, out)
        else:
            plain = _PLAIN_RUN.match(text, i)
            if plain is not None:
                # A backslash quotes the character after it.
                run = plain[0]
                out.value.append(_unescape(run) if "\\" in run else run)
                i = plain.end()
                continue
            glob = _GLOB_RUN.match(text, i)
            if glob is not None:
                out.value.append(glob[0])
                out.dynamic = True
                i = glob.end()
                continue
            _note_pattern_char(c, out)
            out.value.append(c)
            i += 1
    raw = text[start:i]
    return Word("".join(out.value), raw, out.dynamic, tuple(out.substitutions), out.arithmetic, out.splits), i


def _unescape(run: str) -> str:
    """``run`` with each backslash pair ``\\x`` read as ``x`` (every backslash in it starts a pair)."""
    return "\\".join(part.replace("\\", "") for part in run.split("\\\\"))


def _note_pattern_char(c: str, out: _WordBuilder) -> None:
    """Unquoted glob and brace characters make a word's value a run-time expansion."""
    if c in "*?":
        out.dynamic = True
    elif c == "[":
        out.open_bracket = True
    elif c == "]" and out.open_bracket:
        out.dynamic = True
    elif c == "{":
        out.open_brace = True
    elif c == "}":
        out.open_brace = False
    elif c in ",." and out.open_brace:
        # {a,b} and {1..3} expand to several words.
        out.dynamic = True


def _read_ansi_c(text: str, i: int, out: _WordBuilder) -> int:
    n = len(text)
    while i < n and text[i] != "'":
        plain = _ANSI_PLAIN_RUN.match(text, i)
        if plain is not None:
            out.value.append(plain[0])
            i = plain.end()
            continue
        c = text[i]
        if c != "\\" or i + 1 >= n:
            out.value.append(c)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt in _ANSI_ESCAPES:
            out.value.append(_ANSI_ESCAPES[nxt])
            i += 2
        elif nxt == "x":
            digits = _take(text, i + 2, "0123456789abcdefABCDEF", 2)
            out.value.append(chr(int(digits, 16)) if digits else "\\x")
            i += 2 + len(digits)
        elif nxt in "uU":
            digits = _take(text, i + 2, "0123456789abcdefABCDEF", 4 if nxt == "u" else 8)
            out.value.append(chr(int(digits, 16)) if digits else "\\" + nxt)
            i += 2 + len(digits)
        elif nxt in "01234567":
            digits = _take(text, i + 1, "01234567", 3)
            out.value.append(chr(int(digits, 8)))
            i += 1 + len(digits)
        else:
            out.value.append("\\" + nxt)
            i += 2
    if i >= n:
        raise ShellSyntaxError("unterminated $'...' string")
    return i + 1


def _take(text: str, i: int, allowed: str, limit: int) -> str:
    end = i
    while end < len(text) and end - i < limit and text[end] in allowed:
        end += 1
    return text[i:end]


def _read_double_quoted(text: str, i: int, out: _WordBuilder) -> int:
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            return i + 1
        if c == "\\" and i + 1 < n:
            nxt = text[i + 1]
            if nxt in '$`"\\':
                out.value.append(nxt)
            elif nxt != "\n":
                out.value.append(c + nxt)
            i += 2
        elif c == "$" or c == "`":
            i = _read_expansion(text, i, out)
        else:
            plain = _QUOTED_PLAIN_RUN.match(text, i)
            assert plain is not None
            out.value.append(plain[0])
            i = plain.end()
    raise ShellSyntaxError("unterminated double quote")


def _read_expansion(text: str, i: int, out: _WordBuilder) -> int:
    """``$name``, ``${...}``, ``$(...)``, ``$((...))`` or a backtick command."""
    n = len(text)
    was_dynamic, out.dynamic = out.dynamic, True
    if text[i] == "`":
        j = i + 1
        while j < n and text[j] != "`":
            j += 2 if text[j] == "\\" else 1
        if j >= n:
            raise ShellSyntaxError("unterminated backtick")
        # Inside backticks a backslash only escapes $, ` and \.
        inner = text[i + 1:j].replace("\\`", "`").replace("\\$", "$").replace("\\\\", "\\")
        out.substitutions.append(inner)
        _check_substitutions(len(out.substitutions))
        out.value.append(text[i:j + 1])
        return j + 1
    nxt = text[i + 1] if i + 1 < n else ""
    if text.startswith("((", i + 1):
        end = _matching_paren(text, i + 3)
        if not text.startswith(")", end + 1):
            raise ShellSyntaxError("unterminated $((...))")
        # Arithmetic may itself hold command substitutions.
        out.substitutions.extend(_inner_substitutions(text[i + 3:end]))
        if _IDENTIFIER_CHAR.search(text, i + 3, end):
            out.arithmetic = True
        out.value.append(text[i:end + 2])
        return end + 2
    if nxt == "(":
        end = _matching_paren(text, i + 2)
        out.substitutions.append(text[i + 2:end])
        _check_substitutions(len(out.substitutions))
        out.value.append(text[i:end + 1])
        return end + 1
    if nxt == "{":
        end = text.find("}", i + 2)
        if end < 0:
            raise ShellSyntaxError("unterminated ${...}")
        out.substitutions.extend(_inner_substitutions(text[i + 2:end]))
        if _is_arithmetic_parameter(text[i + 2:end]):
            out.arithmetic = True
        out.value.append(text[i:end + 1])
        return end + 1
    j = i + 1
    if j < n and (text[j].isalpha() or text[j] == "_"):
        while j < n and (text[j].isalnum() or text[j] == "_"):
            j += 1
    elif j < n and text[j] in "@*#?-$!0123456789":
        j += 1
    else:
        # A lone ``$`` is a literal dollar sign.
        out.dynamic = was_dynamic
        out.value.append("$")
        return i + 1
    out.value.append(text[i:j])
    return j


def _is_arithmetic_parameter(body: str) -> bool:
    """``${!x}``, ``${a[i]}`` and ``${x:off:len}`` evaluate arithmetic on variable values."""
    if body.startswith("!") or "[" in body:
        return True
    colon = body.find(":")
    return colon >= 0 and body[colon + 1:colon + 2] not in ("-", "=", "+", "?")


def _inner_substitutions(fragment: str) -> list[str]:
    probe = _WordBuilder()
    i = 0
    while i < len(fragment):
        if fragment[i] in "$`":
            i = _read_expansion(fragment, i, probe)
        else:
            i += 1
    return probe.substitutions


def _matching_paren(text: str, i: int) -> int:
    """Index of the ``)`` closing a group whose body starts at ``i``."""
    depth, n = 1, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise ShellSyntaxError("unterminated single quote")
            i = end + 1
            continue
        if c == '"':
            i = _read_double_quoted(text, i + 1, _WordBuilder())
            continue
        if c == "`":
            i = _read_expansion(text, i, _WordBuilder())
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise ShellSyntaxError("unterminated $(...) or (...)")
