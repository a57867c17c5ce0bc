"""Flag tables: every option and operand of a covered command is checked."""
from __future__ import annotations

import pytest

from services.policy.core.argv_specs import ArgvReport, TableError, check_argv, parse_table
from services.policy.core.embedded_programs import judge_program
from services.policy.core.shell_parser import parse_script


def check(table_text, command: str) -> ArgvReport:
    table = parse_table(table_text)
    simple = parse_script(command).commands[0]
    return check_argv(table, simple.argv, simple.dynamic_args, judge_program, fixed=simple.fixed_args)


LS = "-alh -w= --all --color=? --sort= --block-size="


@pytest.mark.parametrize("command", [
    "ls", "ls -la src", "ls -hal", "ls -w 80 x", "ls -w80", "ls --all", "ls --color", "ls --color=never",
    "ls --sort size", "ls --sort=size", "ls -- -not-an-option", "ls src -l",
])
def test_listed_options_fit(command: str) -> None:
    assert check(LS, command).problems == []


@pytest.mark.parametrize(("command", "words"), [
    ("ls -x", "-x"), ("ls -lax", "-x"), ("ls --dired", "--dired"), ("ls --all=yes", "--all=yes"),
    ("ls --col", "--col"),  # getopt would take the abbreviation; the table does not
])
def test_unlisted_options_are_problems(command: str, words: str) -> None:
    problems = check(LS, command).problems
    assert len(problems) == 1 and words in problems[0]


def test_any_option_table_still_refuses_denied_options_and_their_abbreviations() -> None:
    table = "* !-O !--output"
    assert check(table, "git-log --oneline -p --stat").problems == []
    for command in ("x --output=f", "x --out=f", "x --o", "x -O", "x -pO", "x -Ocmd"):
        assert check(table, command).problems, command
    assert check(table, "x --output-indicator-new=+").problems == []


def test_values_of_the_write_kind_are_reported_as_writes() -> None:
    table = "-r -o=write --output=write"
    assert check(table, "sort -ro out.txt in").writes == [("out.txt", False)]
    assert check(table, "sort -o/etc/x in").writes == [("/etc/x", False)]
    assert check(table, "sort --output ../x in").writes == [("../x", False)]


def test_operand_kinds_by_position() -> None:
    table = {"flags": "-c", "operands": ["any", "write"]}
    assert check(table, "uniq -c in").writes == []
    assert check(table, "uniq in out").writes == [("out", False)]
    assert check(table, "uniq a b c").problems  # more operands than the table names
    assert check({"flags": "", "operands": "none"}, "hostname evil").problems
    assert check({"flags": "-u", "operands": ["plus"]}, "date -u +%s").problems == []
    assert check({"flags": "-u", "operands": ["plus"]}, "date 0101").problems


def test_assign_operands_must_be_plain_names() -> None:
    table = {"flags": "-n", "operands": ["assign..."]}
    assert check(table, "export A=1 B").assigned == ["A", "B"]
    assert check(table, "export 'a[$(id)]=1'").problems


def test_run_time_words_may_be_options_unless_their_start_is_fixed() -> None:
    assert check("-l", "rg foo $ARGS").problems
    assert check("-l", "rg foo *").problems  # a file could be named --pre=x
    assert check("-l", "rg foo src/*.py ./$f \"x$y\" <(ls)").problems == []
    assert check("-l", "rg foo src/$f").problems  # unquoted: may split into an option
    assert check("-l $", "ls $ARGS *").problems == []
    assert check("-l", "rg -- $ARGS").problems == []  # after --, only operands


def test_programs_in_operands_and_option_values_are_judged() -> None:
    awk = {"flags": "-F= -e=awk", "program": "awk"}
    assert check(awk, "awk -F, '{print $1}' f").problems == []
    assert check(awk, "awk 'BEGIN{system(\"id\")}'").problems
    assert check(awk, "awk -e 'BEGIN{system(\"id\")}' f").problems
    assert check(awk, "awk -e '{print}' 'BEGIN{system(1)}'").problems == []  # a file name, not a program
    assert check(awk, "awk \"$P\" f").problems


def test_subcommands_and_operands_that_need_an_option() -> None:
    git = {"flags": "-C=", "bare": True,
           "subcommands": {"status": "*", "config": {"flags": "--get --list", "operands_need": ["--get"]},
                           "stash": {"subcommands": {"list": "*"}}}}
    assert check(git, "git -C sub status -s").problems == []
    assert check(git, "git --version").problems  # not in the table
    assert check(git, "git").problems == []
    assert check(git, "git push").problems
    assert check(git, "git config --get user.name").problems == []
    assert check(git, "git config core.pager x").problems
    assert check(git, "git stash").problems  # stash alone pushes
    assert check(git, "git stash list").problems == []
    assert check(git, "git $SUB").problems


def test_whole_word_options_and_commands_up_to_the_terminator() -> None:
    find = {"whole_word_options": True, "flags": "-name= -print -exec=command -fprint=write"}
    assert check(find, "find . -name x -exec rm {} ; -print").problems == []
    assert check(find, "find . -fprint out").writes == [("out", False)]
    assert check(find, "find . -delete").problems


@pytest.mark.parametrize(("raw", "words"), [
    ("-ab=", "one letter"), ("--x=bogus", "unknown kind"), ("x", "not an option item"),
    ({"flags": "-a", "colour": 1}, "unknown key"), ({"operands": ["file"]}, "unknown kind"),
    ({"program": "perl"}, "program"), ({"subcommands": {}}, "subcommands"), (3, "string or a mapping"),
])
def test_malformed_tables_say_what_is_wrong(raw, words: str) -> None:
    with pytest.raises(TableError) as err:
        parse_table(raw)
    assert words in str(err.value)
