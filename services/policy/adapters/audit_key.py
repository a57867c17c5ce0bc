"""Loads the audit HMAC key from an env var or a file, never from the database."""
from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path

from services.common.errors import FailedPrecondition

log = logging.getLogger("llmesh.policy")
KEY_BYTES = 32
MIN_KEY_BYTES = 16


def load_audit_key(env_name: str, key_file: Path, environ: Mapping[str, str] | None = None) -> bytes:
    """The key from ``$env_name`` when set, else ``key_file`` (created 0600 if missing)."""
    environ = os.environ if environ is None else environ
    if env_name and environ.get(env_name):
        return _decode(environ[env_name], f"${env_name}")
    if not key_file.exists():
        key_file.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another process created it first; read theirs
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_hex(KEY_BYTES) + "\n")
            log.info("generated audit key", extra={"event": "audit_key_generated", "path": str(key_file)})
    if key_file.stat().st_mode & 0o077:
        log.warning("audit key file is readable by others", extra={"path": str(key_file)})
    return _decode(key_file.read_text(), str(key_file))


def _decode(text: str, where: str) -> bytes:
    text = text.strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = text.encode()
    if len(key) < MIN_KEY_BYTES:
        raise FailedPrecondition(f"audit key from {where} is shorter than {MIN_KEY_BYTES} bytes",
                                 reason="AUDIT_KEY_TOO_SHORT")
    return key
