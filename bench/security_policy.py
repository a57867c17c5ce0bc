"""The policy service against hostile input: time per 64 KiB command, red-team misses.

policy_evaluate_p99_ms_64k: p99 of PolicyService.evaluate (parse, judge,
redact, audit append in memory) over commands of 64 KiB built to be worst
cases for the secret-redaction patterns and for the shell parser.
redteam_commands_allowed_wrongly: rows of the red-team table that expect
prompt or forbidden but the default policy allows.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

from services.policy.adapters.memory_audit_log import MemoryAuditLog
from services.policy.core.approvals import ApprovalBook
from services.policy.core.audit import AuditChain
from services.policy.core.evaluator import MAX_COMMAND_CHARS, ToolCall
from services.policy.core.policy_holder import PolicyHolder
from services.policy.core.policy_loader import load_policy
from services.policy.core.policy_service import PolicyService
from services.policy.core.rules import RiskLevel
from tests.security.redteam_commands import ROWS, redteam_commands_allowed_wrongly

POLICY_FILE = Path(__file__).resolve().parents[1] / "services" / "policy" / "default_policy.yaml"
WORKSPACE = "/srv/work/project"
SIZE = MAX_COMMAND_CHARS


def _fill(prefix: str, unit: str, suffix: str = "") -> str:
    room = SIZE - len(prefix) - len(suffix)
    return prefix + (unit * (room // len(unit) + 1))[:room] + suffix


def hostile_commands() -> dict[str, str]:
    """64 KiB commands, each the worst case of one redaction pattern or parser path."""
    return {
        # Secret redaction: a run a pattern could start at everywhere, and near misses.
        "assignment-name-run": _fill("echo ", "a"),
        "dash-run": _fill("echo ", "-"),
        "secret-flag-no-value": _fill("echo --password", " "),
        "secret-flag-parts": _fill("echo --", "pass-"),
        "auth-header-no-colon": _fill("echo ", "cookie"),
        "auth-header-spaces": _fill("echo 'authorization:", " ", "'"),
        "url-scheme-run": _fill("echo ", "a", ":"),
        "url-no-at": _fill("echo a://b:", "c"),
        "url-repeated": _fill("echo ", "a://b:"),
        "jwt-no-dots": _fill("echo eyJ", "a"),
        "jwt-repeated": _fill("echo ", "eyJ-"),
        "pem-unterminated": _fill("echo '", "-----BEGIN PRIVATE KEY-----", "'"),
        "mysql-p": _fill("mysql", " -p"),
        "quotes-unclosed": _fill("echo ", "x=\\'"),
        "token-prefixes": _fill("echo ", "sk-ghp_xoxa-"),
        "equals-run": _fill("echo ", "a="),
        # Parser and judge: many words, commands, substitutions and redirections.
        "many-words": _fill("echo", " a"),
        "many-commands": _fill("", "ls;"),
        "many-pipes": _fill("ls", " | wc"),
        "many-substitutions": _fill("echo ", "$(ls)"),
        "many-redirections": _fill("ls", " >/dev/null"),
        "nested-quotes": _fill("echo ", '"$(', ""),
        "long-awk-program": _fill("awk '", "{print $1} ", "' f"),
        "long-sed-script": _fill("sed '", "s/a/b/;", "' f"),
        "many-options": _fill("ls", " -la"),
        "glob-run": _fill("ls ", "*"),
        "double-quoted": _fill('echo "', "a", '"'),
        "ansi-c-quoted": _fill("echo $'", "\\x41", "'"),
        "escapes": _fill("echo ", "\\;"),
    }


def _service() -> PolicyService:
    holder = PolicyHolder(load_policy(POLICY_FILE.read_text(), str(POLICY_FILE)))
    return PolicyService(holder, ApprovalBook(), AuditChain(MemoryAuditLog(), b"bench-key-0123456789abcdef"))


async def _timings(n: int) -> list[float]:
    service = _service()
    calls = [ToolCall("acme", f"s{k}", "", "shell_exec", {"command": c}, WORKSPACE, RiskLevel.DANGEROUS)
             for k, c in enumerate(hostile_commands().values())]
    await service.evaluate(calls[0])  # warm caches
    seconds = []
    try:
        for k in range(n):
            started = time.perf_counter()
            await service.evaluate(calls[k % len(calls)])
            seconds.append(time.perf_counter() - started)
    finally:
        service.close()
    return seconds


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def measure_policy(n: int) -> dict:
    """p99 Evaluate time on hostile 64 KiB commands (n calls) and the red-team misses."""
    seconds = asyncio.run(_timings(max(n, 1)))
    return {
        "policy_evaluate_p99_ms_64k": round(p99(seconds) * 1000, 2),
        "redteam_commands_allowed_wrongly": redteam_commands_allowed_wrongly(),
        "redteam_commands": len(ROWS),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    result = measure_policy(args.n)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
