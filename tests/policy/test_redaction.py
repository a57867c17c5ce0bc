"""Secrets never reach the audit trail."""
from __future__ import annotations

import pytest

from services.policy.core.redaction import REDACTED, redact_text, redact_value


@pytest.mark.parametrize(("text", "secret"), [
    ("API_KEY=abc123 curl https://x", "abc123"),
    ("curl -H 'Authorization: Bearer tok.en.value' https://x", "tok.en.value"),
    ("git clone https://user:pw123@github.com/x", "pw123"),
    ("tool --password hunter2 --user bob", "hunter2"),
    ("tool --api-key=zzz999", "zzz999"),
    ("echo ghp_abcdefghijklmnopqrstuvwxyz012345", "ghp_abcdefghijklmnopqrstuvwxyz012345"),
    ("export OPENAI_API_KEY=sk-abcdefghijklmnopqrstuvwx", "sk-abcdefghijklmnopqrstuvwx"),
    ("mysql -u root -psecret123 db", "secret123"),
    ("aws s3 ls # AKIAABCDEFGHIJKLMNOP", "AKIAABCDEFGHIJKLMNOP"),
])
def test_secrets_in_commands_are_redacted(text: str, secret: str) -> None:
    out = redact_text(text)
    assert secret not in out and REDACTED in out


def test_plain_commands_are_untouched() -> None:
    assert redact_text("FOO=bar make -j4 --output=dist") == "FOO=bar make -j4 --output=dist"


def test_secret_keys_and_argv_values_are_redacted() -> None:
    out = redact_value({"env": {"GITHUB_TOKEN": "abc", "PATH": "/bin"}, "argv": ["deploy", "--token", "t0k"]})
    assert out == {"env": {"GITHUB_TOKEN": REDACTED, "PATH": "/bin"}, "argv": ["deploy", "--token", REDACTED]}
