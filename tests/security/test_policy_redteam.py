"""Every red-team row gets its expected decision from the real default policy."""
from __future__ import annotations

import pytest

from services.policy.core.evaluator import PolicyEvaluator, ToolCall
from services.policy.core.rules import RiskLevel
from tests.security.redteam_commands import (
    ROWS,
    WORKSPACE,
    Row,
    _evaluator,
    decide,
    redteam_commands_allowed_wrongly,
)

EVALUATOR: PolicyEvaluator = _evaluator()


def _why(row: Row) -> list[tuple[str, str, str]]:
    arguments = {"command": row.call} if isinstance(row.call, str) else dict(row.call)
    try:
        verdict = EVALUATOR.evaluate(ToolCall("redteam", "s1", "", "shell_exec", arguments, WORKSPACE,
                                              RiskLevel.DANGEROUS))
    except Exception as exc:
        return [("error", type(exc).__name__, str(exc))]
    return [(m.rule_id, m.decision.name, m.justification) for m in verdict.matches]


def test_the_table_has_one_row_per_class_and_all_three_decisions() -> None:
    assert len(ROWS) >= 150
    escapes = [row.escape for row in ROWS]
    assert len(set(escapes)) == len(escapes), "each row stands for its own class of escape"
    counts = {d: sum(1 for row in ROWS if row.expected == d) for d in ("ALLOW", "PROMPT", "FORBIDDEN")}
    assert all(n >= 25 for n in counts.values()), counts


@pytest.mark.parametrize("row", ROWS, ids=[f"{k:03d}-{row.escape}" for k, row in enumerate(ROWS)])
def test_redteam_row_gets_its_decision(row: Row) -> None:
    assert decide(row, EVALUATOR) == row.expected, _why(row)


def test_no_row_that_must_be_stopped_is_allowed() -> None:
    assert redteam_commands_allowed_wrongly(EVALUATOR) == 0


def test_the_count_sees_a_policy_that_allows_too_much() -> None:
    # The same count over an allow-everything policy finds every blocked row.
    from services.policy.core.policy_loader import load_policy

    allow_all = load_policy("""\
version: 1
default_role: dev
roles: {dev: {tools: ["*"]}}
tools: {shell: [shell_exec]}
defaults: {unknown_command: allow, dynamic_command: allow, unparseable: allow, unresolved_path: allow,
           unsafe_argv: allow, risk_levels: {dangerous: allow}}
""", "allow-all.yaml")
    blocked = sum(1 for row in ROWS if row.expected != "ALLOW")
    refused = sum(1 for row in ROWS if row.expected != "ALLOW" and decide(row, PolicyEvaluator(allow_all)) != "ALLOW")
    assert redteam_commands_allowed_wrongly(PolicyEvaluator(allow_all)) == blocked - refused > 100
