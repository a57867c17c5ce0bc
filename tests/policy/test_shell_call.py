"""A shell call's env, cwd and stdin are judged, and are part of the approval key."""
from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.policy.core.approvals import ApprovalChoice
from services.policy.core.evaluator import ToolCall
from services.policy.core.rules import Decision, RiskLevel
from services.policy.core.shell_lexer import tokenize
from services.policy.core.shell_parser import parse_script
from tests.policy.builders import WORKSPACE, make_evaluator, make_service


def call(**arguments) -> ToolCall:
    return ToolCall("acme", "s1", "", "shell_exec", arguments, WORKSPACE, RiskLevel.DANGEROUS)


def decide(**arguments):
    return make_evaluator().evaluate(call(**arguments))


@pytest.mark.parametrize("name", ["PATH", "LD_PRELOAD", "LD_AUDIT", "BASH_ENV", "PYTHONPATH", "GIT_SSH_COMMAND",
                                  "GIT_CONFIG_GLOBAL", "LESSOPEN", "PAGER", "NODE_OPTIONS", "IFS", "HOME"])
def test_hook_variables_in_the_call_env_are_forbidden_and_named(name: str) -> None:
    verdict = decide(command="echo hello", env={name: "x", "LANG": "C"})
    assert verdict.decision is Decision.FORBIDDEN
    assert name in verdict.justification


def test_ordinary_variables_in_the_call_env_are_fine() -> None:
    verdict = decide(command="ls", env={"LANG": "C", "CI": "1", "GIT_AUTHOR_NAME": "bot"})
    assert verdict.decision is Decision.ALLOW


@pytest.mark.parametrize(("cwd", "expected"), [
    ("src", Decision.ALLOW), (f"{WORKSPACE}/docs", Decision.ALLOW), ("/etc", Decision.FORBIDDEN),
    ("../other", Decision.FORBIDDEN), ("src/../..", Decision.FORBIDDEN), ("~", Decision.FORBIDDEN),
])
def test_the_cwd_must_be_inside_the_workspace(cwd: str, expected: Decision) -> None:
    assert decide(command="ls", cwd=cwd).decision is expected


def test_relative_paths_resolve_against_the_call_cwd() -> None:
    assert decide(command="rm -f x", cwd="a/b").decision is Decision.PROMPT
    assert decide(command="rm -f ../../../x", cwd="a/b").decision is Decision.FORBIDDEN


@pytest.mark.parametrize(("command", "stdin", "expected"), [
    ("sh", "ls -la\n", Decision.ALLOW), ("bash -s", "git status", Decision.ALLOW),
    ("sh", "rm -rf /", Decision.FORBIDDEN), ("sh -e", "curl x | sh", Decision.FORBIDDEN),
    ("sh", "make", Decision.PROMPT), ("sh", "echo 'open", Decision.PROMPT),
    ("python3", "print(1)", Decision.PROMPT), ("cat", "rm -rf /", Decision.ALLOW),
    ("cat | sh", "rm -rf /", Decision.FORBIDDEN), ("sh < script.sh", "rm -rf /", Decision.PROMPT),
])
def test_stdin_read_by_a_shell_is_judged_as_its_script(command: str, stdin: str, expected: Decision) -> None:
    assert decide(command=command, stdin=stdin).decision is expected


def test_a_stdin_script_longer_than_the_cap_is_left_to_a_person() -> None:
    verdict = decide(command="sh", stdin="ls\n" * 30000)
    assert verdict.decision is Decision.PROMPT and "longer" in verdict.justification


@pytest.mark.parametrize(("arguments", "field"), [
    ({"command": "ls", "cwd": ""}, "arguments_json.cwd"),
    ({"command": "ls", "cwd": 3}, "arguments_json.cwd"),
    ({"command": "ls", "env": ["PATH=x"]}, "arguments_json.env"),
    ({"command": "ls", "env": {"A B": "x"}}, "arguments_json.env"),
    ({"command": "ls", "env": {"A": 1}}, "arguments_json.env"),
    ({"command": "ls", "stdin": ["x"]}, "arguments_json.stdin"),
    ({"argv": ["echo", "a" * 70000]}, "arguments_json.argv"),
])
def test_malformed_shell_arguments_name_their_field(arguments: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        make_evaluator().evaluate(call(**arguments))
    assert err.value.field == field


async def test_an_approval_covers_only_the_same_env_cwd_and_stdin() -> None:
    service, _ = make_service()
    asked = await service.evaluate(call(command="sh", stdin="make build"))
    assert asked.verdict.decision is Decision.PROMPT
    await service.record_approval("acme", "s1", asked.approval_id, ApprovalChoice.APPROVE_SESSION, "ana", "")
    assert (await service.evaluate(call(command="sh", stdin="make build"))).verdict.decision is Decision.ALLOW
    for other in (call(command="sh", stdin="make deploy"), call(command="sh", stdin="make build", cwd="sub"),
                  call(command="sh", stdin="make build", env={"CI": "1"})):
        assert (await service.evaluate(other)).verdict.decision is Decision.PROMPT
    service.close()


def test_arithmetic_expansions_parse_and_globs_are_run_time_words() -> None:
    script = parse_script("echo $((1 + 2)) *.py src/[ab].txt {a,b} '*' plain")
    words = script.commands[0]
    assert words.dynamic_args == frozenset({1, 2, 3, 4})
    # Only src/[ab].txt cannot start with '-': the expansion, *.py and {a,b} can.
    assert words.fixed_args == frozenset({3})
    assert not script.constructs
    assert "arithmetic_expansion" in parse_script("echo $((n + 1))").constructs
    assert [t.value for t in tokenize(r"a\ b 'c d' \$x")] == ["a b", "c d", "$x"]


def test_huge_scripts_are_not_judged_word_by_word() -> None:
    for command in ("ls;" * 2000, "echo " + "a " * 5000, "echo " + "$(ls)" * 300):
        verdict = decide(command=command)
        assert verdict.decision is Decision.PROMPT
        assert verdict.matches[0].rule_id == "default:unparseable"
