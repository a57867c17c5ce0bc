"""awk programs and sed scripts are judged by what they do."""
from __future__ import annotations

import pytest

from services.policy.core.embedded_programs import MAX_PROGRAM_CHARS, judge_awk, judge_program, judge_sed


@pytest.mark.parametrize("program", [
    "{print $1}", "$3 > 10 {print $1, $2}", "/a|b/ {n++} END {print n}", "{ if ($1 > $2) print $1 }",
    "{print ($1 > 2)}", "BEGIN { FS = \",\" } { sum += $2 } END { print sum / NR }", "{ x = a / b / c }",
    "{print > \"/dev/stderr\"}", "# system(\"id\") in a comment\n{print}", "{ print \"a|b\" }",
    "$1 ~ /x|y/ && $2 !~ /z/", "{ getline line < \"other.txt\"; print line }",
])
def test_read_only_awk_programs(program: str) -> None:
    report = judge_awk(program)
    assert report.problems == [] and all(path == "/dev/stderr" for path, _ in report.writes)


@pytest.mark.parametrize(("program", "words"), [
    ("BEGIN{system(\"id\")}", "system"), ("BEGIN { system (\"id\") }", "system"),
    ("{print | \"sh\"}", "pipes"), ("BEGIN{\"id\" | getline x}", "pipes"), ("BEGIN{print |& \"sh\"}", "pipes"),
    ("@load \"rwarray\"", "@"), ("BEGIN{f = \"system\"; @f(\"id\")}", "@"),
    ("BEGIN{getline < \"/inet/tcp/0/h/80\"}", "/inet"), ("{print \"unterminated}", "unterminated"),
    ("{ x = 1 / 2; system(\"id\"); y = 3 / 4 }", "system"),
])
def test_awk_programs_that_run_commands(program: str, words: str) -> None:
    problems = judge_awk(program).problems
    assert problems and any(words in p for p in problems), problems


@pytest.mark.parametrize(("program", "writes"), [
    ("{print > \"out.txt\"}", [("out.txt", False)]),
    ("{print $1 >> \"/etc/x\"; print}", [("/etc/x", False)]),
    ("{printf(\"%s\", $1) > \"f\"}", [("f", False)]),
    ("{print > $2}", [("$2", True)]),
])
def test_awk_output_redirections_are_writes(program: str, writes: list) -> None:
    assert judge_awk(program).writes == writes


@pytest.mark.parametrize("script", [
    "1,20p", "s/foo/bar/g", "/^#/d", "$!N;P;D", ":a;N;$!ba;s/\\n/ /g", "s|/usr|/opt|2", "y/abc/xyz/",
    "1i\\\nheader", "$a footer", "/x/{s/a/b/;p}", "s/a/b/w /dev/stdout", "r other.txt", "10q", "0~2d", "\\,x,d",
    "s/[/]/x/", "# comment\np",
])
def test_read_only_sed_scripts(script: str) -> None:
    report = judge_sed(script)
    assert report.problems == [] and all(path == "/dev/stdout" for path, _ in report.writes)


@pytest.mark.parametrize(("script", "words"), [
    ("s/x/id/e", "s///e"), ("1e id", "(e)"), ("e", "(e)"), ("p;e id", "(e)"), (":a;s/x/y/;ta;e id", "(e)"),
    ("{p;e id\n}", "(e)"), ("s/a/b/ge", "s///e"), ("k", "'k'"), ("s/a/b", "unterminated"),
    ("s/a/b/x", "where a command should end"),
])
def test_sed_scripts_that_run_commands_or_cannot_be_read(script: str, words: str) -> None:
    problems = judge_sed(script).problems
    assert problems and words in problems[0], problems


@pytest.mark.parametrize(("script", "writes"), [
    ("w out.txt", [("out.txt", False)]), ("W /etc/x", [("/etc/x", False)]),
    ("s/a/b/w ../x", [("../x", False)]), ("s/a/b/gw f\np", [("f", False)]),
])
def test_sed_write_commands_are_writes(script: str, writes: list) -> None:
    assert judge_sed(script).writes == writes


def test_programs_longer_than_the_cap_are_not_read() -> None:
    report = judge_program("awk", "{print}" * (MAX_PROGRAM_CHARS // 7 + 1))
    assert report.problems and "longer" in report.problems[0]


@pytest.mark.parametrize("script", ["s/[]/]/X/g", "s/[[:alpha:]/]/X/g", "s/[^/]/X/g", "/[/]/p", "y/[/]/"])
def test_sed_brackets_are_read_as_gnu_sed_reads_them(script: str) -> None:
    assert judge_sed(script).problems == []


def test_an_e_flag_after_a_bracket_holding_the_delimiter_is_seen() -> None:
    assert judge_sed("s/[/]/x/e").problems
    assert judge_sed("s/[/]/g;e id").problems
