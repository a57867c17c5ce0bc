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


ARGV_AND_ENV = GOOD + """\
  - id: readers
    argv:
      cat: "-n $"
      sort: "-r -o=write"
    decision: allow
    justification: reads files
    match: ["cat -n a b", "sort -r names"]
    not_match: ["cat -v a", "sort -o out names"]
  - id: hooks
    env: {names: ["LD_*", PATH], except: [LD_BIND_NOW], source: call}
    decision: forbidden
    justification: loader hooks
    match: ["LD_PRELOAD", "PATH"]
    not_match: ["LD_BIND_NOW", "LANG"]
  - id: start-outside
    path: {where: outside, access: cwd}
    decision: forbidden
    justification: starts outside
    match: ["/etc"]
    not_match: ["src"]
  - id: writes-outside
    path: {where: outside}
    decision: forbidden
    justification: writes outside
"""


def test_argv_env_and_cwd_rules_load_and_decide() -> None:
    evaluator = make_evaluator(load_policy(ARGV_AND_ENV, "rules.yaml"))
    assert evaluator.evaluate(shell_call("cat -n README.md")).decision is Decision.ALLOW
    assert evaluator.evaluate(shell_call("cat -v README.md")).decision is Decision.PROMPT
    # The table's write values go through the path rules.
    assert evaluator.evaluate(shell_call("sort -ro /etc/x names")).decision is Decision.FORBIDDEN
    assert evaluator.evaluate(shell_call("sort -ro out names")).decision is Decision.ALLOW
    with_env = shell_call("cat a")
    env_call = type(with_env)(**{**with_env.__dict__, "arguments": {"command": "cat a", "env": {"LD_AUDIT": "x"}}})
    assert evaluator.evaluate(env_call).decision is Decision.FORBIDDEN
    cwd_call = type(with_env)(**{**with_env.__dict__, "arguments": {"command": "cat a", "cwd": "/tmp"}})
    assert evaluator.evaluate(cwd_call).decision is Decision.FORBIDDEN


@pytest.mark.parametrize(("edit", "words"), [
    (('cat: "-n $"', 'cat: "-nn= x"'), "flag table of 'cat'"),
    (('cat: "-n $"', 'cat: {flags: "-n", colour: red}'), "unknown key 'colour'"),
    (('not_match: ["cat -v a", "sort -o out names"]', 'not_match: ["cat -n a"]'), "matches its not_match"),
    (("source: call}", "source: shell}"), "source must be"),
    (('not_match: ["LD_BIND_NOW", "LANG"]', 'not_match: ["LD_PRELOAD"]'), "matches its not_match"),
    (("access: cwd}", "access: read}"), "access must be"),
])
def test_invalid_argv_env_and_path_rules_are_rejected(edit: tuple[str, str], words: str) -> None:
    assert edit[0] in ARGV_AND_ENV
    with pytest.raises(PolicyLoadError) as err:
        load_policy(ARGV_AND_ENV.replace(*edit), "rules.yaml")
    assert words in str(err.value)
    assert err.value.line > 14


def test_the_default_policy_checks_every_example_at_load() -> None:
    from tests.policy.builders import DEFAULT_POLICY_PATH

    text = DEFAULT_POLICY_PATH.read_text()
    broken = text.replace('"awk \'BEGIN{system(\\"id\\")}\'", ', "", 1).replace(
        'not_match: ["rm -rf build", "make",', 'not_match: ["rm -rf build", "make", "awk \'{print $1}\' f",', 1)
    assert broken != text
    with pytest.raises(PolicyLoadError) as err:
        load_policy(broken, "default_policy.yaml")
    assert "read-only-commands" in str(err.value) and "not_match" in str(err.value)
