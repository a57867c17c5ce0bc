"""Removes secrets from anything about to be written to the audit trail.

Every pattern here runs in time linear in its input. A pattern that can
start at many positions of one run of characters (``aaaa...``) is anchored
with a look-behind to the start of that run, and quantifiers whose
backtracking could only fail again are possessive (``*+``, ``++``). The
parts that a regex would have to search for across the whole text (the end
of a PEM block) are found with ``str.find`` instead.
"""
from __future__ import annotations

import re
from typing import Any

REDACTED = "[REDACTED]"
_SECRET_NAME = re.compile(
    r"pass(?:word|wd|phrase)?|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key|credential|"
    r"auth|session[_-]?key|client[_-]?secret|signature|cookie", re.IGNORECASE)
_SECRET_FLAG_WORD = re.compile(r"pass(?:word)?|token|secret|api-?key|auth", re.IGNORECASE)
# Values that are secrets whatever they are called, in one pass. Each body is
# bounded or possessive, so a failed attempt costs at most the length of its own run.
_SECRET_TOKENS = re.compile(
    r"\b(?:sk-[A-Za-z0-9_-]{16,}+"                   # OpenAI-style keys
    r"|gh[pousr]_[A-Za-z0-9]{20,}+"                   # GitHub tokens
    r"|github_pat_[A-Za-z0-9_]{20,}+"
    r"|xox[abprs]-[A-Za-z0-9-]{10,}+"                 # Slack tokens
    r"|AKIA[0-9A-Z]{16}\b"                            # AWS access key ids
    r"|AIza[0-9A-Za-z_-]{35})")                       # Google API keys
# JWTs: three dot-separated segments, starting where a run of token characters starts.
_JWT = re.compile(r"eyJ(?<![A-Za-z0-9_-]eyJ)[A-Za-z0-9_-]{8,}+\.[A-Za-z0-9_-]{8,}+\.[A-Za-z0-9_-]{8,}+")
_PEM_BEGIN = re.compile(r"-----BEGIN [A-Z ]{0,40}PRIVATE KEY-----")
_PEM_END = "PRIVATE KEY-----"
# NAME=value (env prefixes, --flag=value); NAME starts where its run of name characters starts.
_ASSIGNMENT = re.compile(r"(?<![A-Za-z0-9_.-])(?P<name>[A-Za-z0-9_.-]*+)(?P<sep>=)"
                         r"(?P<value>'[^']*+'|\"[^\"]*+\"|[^\s'\";&|]++)")
# A flag word followed by white space; whether it names a secret is checked on the word alone.
_FLAG_THEN_SPACE = re.compile(r"(?<![A-Za-z0-9-])(?P<flag>--?[A-Za-z0-9-]*+)(?P<space>\s++)")
_FLAG_WORD = re.compile(r"--?[A-Za-z0-9-]*+")
_VALUE = re.compile(r"'[^']*+'|\"[^\"]*+\"|\S++")
_AUTH_HEADER = re.compile(r"(?P<head>(?:authorization|proxy-authorization|x-api-key|cookie)\s*+:\s*+"
                          r"(?:(?:bearer|basic|token)\s++)?)(?P<value>[^'\"\s]++)", re.IGNORECASE)
_HEADER_WORDS = ("authorization", "x-api-key", "cookie")
_URL_CREDENTIALS = re.compile(r"(?<![a-z0-9+.-])(?P<head>[a-z][a-z0-9+.-]*+://[^/\s:@]++:)(?P<value>[^@\s/]++)"
                              r"(?P<at>@)", re.IGNORECASE)
_MYSQL_PASSWORD = re.compile(r"(?P<head>(?:^|\s)-p)(?P<value>[^\s'\"]{3,}+)")


def redact_text(text: str) -> str:
    """``text`` with every recognisable secret replaced by [REDACTED]."""
    # Each pass runs only when the text holds the characters it looks for.
    text = _SECRET_TOKENS.sub(REDACTED, text)
    if "eyJ" in text:
        text = _JWT.sub(REDACTED, text)
    text = _redact_pem_blocks(text)
    if "://" in text:
        text = _URL_CREDENTIALS.sub(lambda m: m["head"] + REDACTED + m["at"], text)
    lowered = text.lower()
    if any(word in lowered for word in _HEADER_WORDS):
        text = _AUTH_HEADER.sub(lambda m: m["head"] + REDACTED, text)
    if "-" in text:
        text = _redact_flag_values(text)
    if "=" in text:
        text = _ASSIGNMENT.sub(_redact_assignment, text)
    if "mysql" in text or "mariadb" in text:
        text = _MYSQL_PASSWORD.sub(lambda m: m["head"] + REDACTED, text)
    return text


def _redact_pem_blocks(text: str) -> str:
    if "-----BEGIN " not in text:
        return text
    out, last = [], 0
    while True:
        begin = _PEM_BEGIN.search(text, last)
        if begin is None:
            break
        end = text.find(_PEM_END, begin.end())
        out.append(text[last:begin.start()])
        out.append(REDACTED)
        # A block cut off before its END line is still a key: hide the rest.
        last = len(text) if end < 0 else end + len(_PEM_END)
    out.append(text[last:])
    return "".join(out)


def _redact_flag_values(text: str) -> str:
    """``--password x`` / ``-H token x``: the word after a secret-looking flag."""
    out, last = [], 0
    for match in _FLAG_THEN_SPACE.finditer(text):
        if match.start() < last or not _SECRET_FLAG_WORD.search(match["flag"]):
            continue
        value = _VALUE.match(text, match.end())
        if value is None:
            continue
        out.append(text[last:match.end()])
        out.append(REDACTED)
        last = value.end()
    out.append(text[last:])
    return "".join(out)


def _redact_assignment(match: re.Match[str]) -> str:
    if _SECRET_NAME.search(match["name"]):
        return match["name"] + match["sep"] + REDACTED
    return match[0]


def is_secret_flag(word: str) -> bool:
    return _FLAG_WORD.fullmatch(word) is not None and _SECRET_FLAG_WORD.search(word) is not None


def redact_value(value: Any, key: str = "") -> Any:
    """Deep copy of a JSON-like value with secrets removed."""
    if key and _SECRET_NAME.search(key) and isinstance(value, (str, int, float)) and value != "":
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_value(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        out = [redact_value(v, key) for v in value]
        # argv arrays: ["--token", "abc"] hides the word after a secret flag.
        for k in range(len(out) - 1):
            if isinstance(value[k], str) and is_secret_flag(value[k]) and isinstance(out[k + 1], str):
                out[k + 1] = REDACTED
        return out
    return value
