"""The programs that start a sandbox, and the one environment they run in.

The launcher chain (prlimit, bwrap or unshare, setpriv, env) runs as root
before any sandbox exists, so nothing a caller sends may reach it: each
program is resolved once, at start-up, to an absolute path that root owns
and nobody else can write, and all of them start with ``LAUNCHER_ENV``. The
caller's variables are applied by the last link, ``env -i``, after
privileges are dropped, and only names that are not loader or interpreter
hooks.
"""
from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass

from services.common.errors import InvalidArgument

TRUSTED_DIRS = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")
LAUNCHER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
# What a command sees unless the caller adds variables of its own.
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"

ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]{0,127}"
# Variables that make a loader, shell or interpreter run code or read files
# the command did not name, or that the sandbox sets itself.
_HOOK_NAMES = (
    "PATH", "HOME", "TMPDIR", "IFS", "ENV", "BASH_ENV", "SHELLOPTS", "BASHOPTS", "PS4", "PROMPT_COMMAND",
    "CDPATH", "GLOBIGNORE", "PERL5OPT", "PERL5LIB", "PERLLIB", "PERL5DB", "RUBYOPT", "RUBYLIB", "NODE_OPTIONS",
    "NODE_PATH", "LESSOPEN", "LESSCLOSE", "LESSKEY", "PAGER", "MANPAGER", "EDITOR", "VISUAL", "GCONV_PATH",
    "GLIBC_TUNABLES", "HOSTALIASES", "LOCPATH", "NLSPATH", "RESOLV_HOST_CONF", "TZDIR", "JAVA_TOOL_OPTIONS",
    "_JAVA_OPTIONS", "LUA_INIT", "TCLLIBPATH", "SSH_ASKPASS", "SUDO_ASKPASS", "BROWSER", "OPENSSL_CONF",
)
_HOOK_PREFIXES = ("LD_", "DYLD_", "PYTHON", "GIT_", "BASH_FUNC_", "MALLOC_", "LUA_INIT_", "npm_config_")
ENV_REFUSED = "^(?:" + "|".join(
    [re.escape(name) + "$" for name in _HOOK_NAMES] + [re.escape(prefix) for prefix in _HOOK_PREFIXES]) + ")"
MAX_ENV_VARS = 64
MAX_ENV_VALUE_BYTES = 32 * 1024
_NAME_RE = re.compile(ENV_NAME + r"\Z")
_REFUSED_RE = re.compile(ENV_REFUSED)


def check_env(extra: Mapping[str, str], field: str = "arguments.env") -> dict[str, str]:
    """``extra`` when every name and value may be handed to a command, else INVALID_ARGUMENT naming it."""
    if len(extra) > MAX_ENV_VARS:
        raise InvalidArgument(f"{field}: at most {MAX_ENV_VARS} variables, got {len(extra)}",
                              reason="ENV_NOT_ALLOWED", field=field)
    for name, value in extra.items():
        where = f"{field}.{name}"
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise InvalidArgument(f"{field}: {name!r} is not a variable name ({ENV_NAME})",
                                  reason="ENV_NOT_ALLOWED", field=field)
        if _REFUSED_RE.match(name):
            raise InvalidArgument(f"{where}: {name} is set by the sandbox or runs code in loaders and "
                                  "interpreters; it cannot be set by a call", reason="ENV_NOT_ALLOWED", field=where)
        if not isinstance(value, str) or "\x00" in value or len(value.encode("utf-8", "replace")) > MAX_ENV_VALUE_BYTES:
            raise InvalidArgument(f"{where}: must be a string without NUL of at most {MAX_ENV_VALUE_BYTES} bytes",
                                  reason="ENV_NOT_ALLOWED", field=where)
    return dict(extra)


def _check_trusted(path: str) -> None:
    """RuntimeError unless ``path`` and every directory above it are root's and no one else may write them."""
    current = path
    while True:
        info = os.stat(current)
        if info.st_uid != 0:
            raise RuntimeError(f"{current} is owned by uid {info.st_uid}, not root")
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise RuntimeError(f"{current} is writable by group or others")
        if current == "/":
            return
        current = os.path.dirname(current)


def trusted_program(name: str) -> str:
    """The absolute, verified path of the system program ``name``; RuntimeError when there is none."""
    problems = []
    for directory in TRUSTED_DIRS:
        candidate = os.path.join(directory, name)
        if not os.path.isfile(candidate):
            continue
        real = os.path.realpath(candidate)
        try:
            _check_trusted(real)
        except (OSError, RuntimeError) as exc:
            problems.append(str(exc))
            continue
        if os.access(real, os.X_OK):
            return real
    detail = f": {'; '.join(problems)}" if problems else ""
    raise RuntimeError(f"no trusted {name!r} in {', '.join(TRUSTED_DIRS)}{detail}")


@dataclass(frozen=True)
class Launchers:
    """Absolute paths of the launcher chain; empty where the program is absent."""

    prlimit: str
    env: str
    sh: str
    setpriv: str = ""
    bwrap: str = ""
    unshare: str = ""

    @classmethod
    def resolve(cls) -> Launchers:
        def optional(name: str) -> str:
            try:
                return trusted_program(name)
            except RuntimeError:
                return ""
        return cls(prlimit=trusted_program("prlimit"), env=trusted_program("env"), sh=trusted_program("sh"),
                   setpriv=optional("setpriv"), bwrap=optional("bwrap"), unshare=optional("unshare"))
