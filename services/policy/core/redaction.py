"""Removes secrets from anything about to be written to the audit trail."""
from __future__ import annotations

import re
from typing import Any

REDACTED = "[REDACTED]"
_SECRET_NAME = re.compile(
    r"(pass(word|wd|phrase)?|pwd|secret|token|api[_-]?key|apikey|access[_-]?key|private[_-]?key|credential|"
    r"auth|session[_-]?key|client[_-]?secret|signature|cookie)", re.IGNORECASE)
# Values that are secrets whatever they are called.
_SECRET_VALUES = [
    re.compile(r"\bsk-[A-Za-z0-9_-]{16,}"),                       # OpenAI-style keys
    re.compile(r"\bgh[pousr]_[A-Za-z0-9]{20,}"),                  # GitHub tokens
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}"),
    re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),                # Slack tokens
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),                           # AWS access key ids
    re.compile(r"\bAIza[0-9A-Za-z_-]{35}"),                        # Google API keys
    re.compile(r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),  # JWTs
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL),
]
# NAME=value (env prefixes, --flag=value) where NAME looks secret.
_ASSIGNMENT = re.compile(r"(?P<name>[A-Za-z0-9_.-]*)(?P<sep>=)(?P<value>'[^']*'|\"[^\"]*\"|[^\s'\";&|]+)")
# --password value, -H 'Authorization: Bearer x'
_FLAG_THEN_VALUE = re.compile(r"(?P<flag>--?[A-Za-z0-9-]*(?:pass(?:word)?|token|secret|api-?key|auth)"
                              r"[A-Za-z0-9-]*)(?P<space>\s+)(?P<value>'[^']*'|\"[^\"]*\"|\S+)", re.IGNORECASE)
_SECRET_FLAG = re.compile(r"--?[A-Za-z0-9-]*(?:pass(?:word)?|token|secret|api-?key|auth)[A-Za-z0-9-]*",
                          re.IGNORECASE)
_AUTH_HEADER = re.compile(r"(?P<head>(?:authorization|proxy-authorization|x-api-key|cookie)\s*:\s*"
                          r"(?:(?:bearer|basic|token)\s+)?)(?P<value>[^'\"\s]+)", re.IGNORECASE)
_URL_CREDENTIALS = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]+:)(?P<value>[^@\s/]+)(?P<at>@)",
                              re.IGNORECASE)
_MYSQL_PASSWORD = re.compile(r"(?P<head>(?:^|\s)-p)(?P<value>[^\s'\"]{3,})")


def redact_text(text: str) -> str:
    """``text`` with every recognisable secret replaced by [REDACTED]."""
    for pattern in _SECRET_VALUES:
        text = pattern.sub(REDACTED, text)
    text = _URL_CREDENTIALS.sub(lambda m: m["head"] + REDACTED + m["at"], text)
    text = _AUTH_HEADER.sub(lambda m: m["head"] + REDACTED, text)
    text = _FLAG_THEN_VALUE.sub(lambda m: m["flag"] + m["space"] + REDACTED, text)
    text = _ASSIGNMENT.sub(_redact_assignment, text)
    if "mysql" in text or "mariadb" in text:
        text = _MYSQL_PASSWORD.sub(lambda m: m["head"] + REDACTED, text)
    return text


def _redact_assignment(match: re.Match[str]) -> str:
    if _SECRET_NAME.search(match["name"]):
        return match["name"] + match["sep"] + REDACTED
    return match[0]


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
            if isinstance(value[k], str) and _SECRET_FLAG.fullmatch(value[k]) and isinstance(out[k + 1], str):
                out[k + 1] = REDACTED
        return out
    return value
