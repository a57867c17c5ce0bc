"""Loading rule files: validation, line-numbered errors, examples, hot reload."""
from __future__ import annotations

import pytest

from services.policy.core.policy_holder import PolicyHolder
from services.policy.core.policy_loader import PolicyLoadError, load_policy
from services.policy.core.rules import Decision
from tests.policy.builders import make_evaluator, shell_call

GOOD = """\
version: 1
default_role: dev
roles:
  dev: {tools: ["*"]}
tools:
  shell: [shell]
rules:
  - id: git-read
    prefix: [git, [status, log]]
    decision: allow
    justification: reads the repository
    match: ["git status"]
    not_match: ["git push"]
"""


def test_valid_file_loads_and_its_rules_decide() -> None:
    policy = load_policy(GOOD, "rules.yaml")
    evaluator = make_evaluator(policy)
    assert evaluator.evaluate(shell_call("git log -3")).decision is Decision.ALLOW
    assert evaluator.evaluate(shell_call("git push")).decision is Decision.PROMPT  # unknown -> default


def test_failing_match_example_is_rejected_with_its_line() -> None:
    broken = GOOD.replace('match: ["git status"]', 'match: ["git status", "git push"]')
    with pytest.raises(PolicyLoadError) as err:
        load_policy(broken, "rules.yaml")
    assert err.value.line == 12
    assert str(err.value).startswith("rules.yaml:12:")
    assert "git push" in str(err.value)


def test_failing_not_match_example_is_rejected_with_its_line() -> None:
    broken = GOOD.replace('not_match: ["git push"]', 'not_match:\n      - "git log"')
    with pytest.raises(PolicyLoadError) as err:
        load_policy(broken, "rules.yaml")
    assert err.value.line == 14
    assert "not_match" in err.value.problem


@pytest.mark.parametrize(("edit", "line", "words"), [
    (("decision: allow", "decision: maybe"), 10, "decision must be"),
    (("justification: reads the repository", "justification: ''"), 8, "justification"),
    (("    prefix: [git, [status, log]]", "    prefx: [git]"), 9, "unknown key 'prefx'"),
    (("version: 1", "version: 2"), 1, "version must be 1"),
    (("  - id: git-read", "  - id: Git Read"), 8, "id"),
    (("    match: [\"git status\"]", "    match: [\"git 'status\"]"), 12, "does not parse"),
    (("rules:", "rules: [\n"), 9, "invalid YAML"),
    (("default_role: dev", "default_role: boss"), 2, "default_role"),
])
def test_invalid_files_name_the_line(edit: tuple[str, str], line: int, words: str) -> None:
    with pytest.raises(PolicyLoadError) as err:
        load_policy(GOOD.replace(*edit), "rules.yaml")
    assert err.value.line == line, str(err.value)
    assert words in str(err.value)


def test_duplicate_rule_ids_are_rejected() -> None:
    doubled = GOOD + GOOD[GOOD.index("  - id: git-read"):]
    with pytest.raises(PolicyLoadError) as err:
        load_policy(doubled, "rules.yaml")
    assert "duplicate rule id 'git-read'" in str(err.value)
    assert err.value.line == 14


def test_broken_reload_keeps_the_old_rules_serving() -> None:
    holder = PolicyHolder(load_policy(GOOD, "rules.yaml"))
    old_version = holder.policy.version
    assert not holder.reload(GOOD.replace('match: ["git status"]', 'match: ["git push"]'), "rules.yaml")
    assert holder.last_error.startswith("rules.yaml:12:")
    assert holder.policy.version == old_version
    assert holder.evaluator.evaluate(shell_call("git status")).decision is Decision.ALLOW


def test_good_reload_swaps_rules() -> None:
    holder = PolicyHolder(load_policy(GOOD, "rules.yaml"))
    stricter = GOOD.replace("decision: allow", "decision: forbidden")
    assert holder.reload(stricter, "rules.yaml")
    assert holder.evaluator.evaluate(shell_call("git status")).decision is Decision.FORBIDDEN
    assert holder.last_error == ""


def test_tenants_can_tighten_or_replace_rules() -> None:
    text = GOOD + """\
tenants:
  strict:
    rules:
      - id: no-git
        prefix: [git]
        decision: forbidden
        justification: this tenant keeps agents out of git
  blank:
    inherit_rules: false
"""
    evaluator = make_evaluator(load_policy(text, "rules.yaml"))
    assert evaluator.evaluate(shell_call("git status", tenant="strict")).decision is Decision.FORBIDDEN
    assert evaluator.evaluate(shell_call("git status", tenant="other")).decision is Decision.ALLOW
    assert evaluator.evaluate(shell_call("git status", tenant="blank")).decision is Decision.PROMPT
