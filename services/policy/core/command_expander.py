"""Looks through wrappers to the commands that really run.

``env A=1 nice -n 5 /usr/bin/rm x`` runs ``rm x``; ``bash -lc "a; b"`` runs
``a`` and ``b``; ``sudo rm x`` runs ``rm x`` as root. A transparent wrapper
leaves its own words (``env A=1``, ``nice -n 5``) as a command marked
``wraps``, so its options are judged too, followed by the command it runs;
privilege wrappers (sudo, doas, su) stay whole so rules can see them, and
their inner command is judged as well. ``xargs`` adds words read from its
input, so the command it runs gets a word only known at run time.
"""
from __future__ import annotations

from dataclasses import replace

from services.policy.core.shell_lexer import ShellSyntaxError
from services.policy.core.shell_parser import MAX_NESTING, ParsedScript, SimpleCommand, parse_script

# Binaries in these directories are judged by their base name; anything else
# with a slash (./ls, /tmp/x/ls) stays a path, hence unknown.
SYSTEM_BIN_DIRS = ("/bin/", "/usr/bin/", "/usr/local/bin/", "/sbin/", "/usr/sbin/", "/usr/local/sbin/",
                   "/opt/homebrew/bin/", "/run/current-system/sw/bin/")
SHELLS = frozenset({"sh", "bash", "zsh", "dash", "ksh", "mksh", "ash", "busybox-sh"})
# Options of each wrapper that consume the next word as their value.
_OPTIONS_WITH_VALUE = {
    "env": {"-u", "--unset", "-C", "--chdir", "-S", "--split-string"},
    "nice": {"-n", "--adjustment"},
    "ionice": {"-c", "-n", "-p", "-t"},
    "timeout": {"-s", "--signal", "-k", "--kill-after"},
    "stdbuf": {"-i", "-o", "-e"},
    "xargs": {"-I", "-n", "-P", "-d", "-L", "-s", "-E", "-a", "--max-args", "--max-procs", "--delimiter",
              "--max-lines", "--arg-file"},
    "exec": {"-a"},
    "sudo": {"-u", "-g", "-C", "-D", "-h", "-p", "-r", "-t", "-U", "--user", "--group", "--host", "--prompt"},
    "doas": {"-u", "-C"},
    "nohup": set(),
    "command": set(),
    "builtin": set(),
    "time": {"-f", "-o", "--format", "--output"},
    "watch": {"-n", "-d", "--interval"},
    "setsid": set(),
    "chronic": set(),
}
TRANSPARENT_WRAPPERS = frozenset({"env", "nice", "ionice", "timeout", "stdbuf", "xargs", "exec", "nohup",
                                  "command", "builtin", "time", "setsid", "chronic"})
PRIVILEGE_WRAPPERS = frozenset({"sudo", "doas"})
# Wrappers whose arguments are joined into shell text, like ``sh -c``.
_STRING_WRAPPERS = frozenset({"eval", "watch"})
_FIND_EXEC = frozenset({"-exec", "-execdir", "-ok", "-okdir"})
# Options of a shell that still read the script from standard input.
_STDIN_SHELL_OPTIONS = frozenset({"-s", "-", "--", "-e", "-x", "-u", "-v", "-ex", "-xe", "-eu", "-eux", "-l",
                                  "--login", "--norc", "--noprofile", "-i", "-o", "pipefail", "errexit", "nounset"})
XARGS_INPUT = "{xargs-input}"


def normalise_name(name: str) -> str:
    for prefix in SYSTEM_BIN_DIRS:
        if name.startswith(prefix) and "/" not in name[len(prefix):]:
            return name[len(prefix):]
    return name


def expand_script(script: ParsedScript, depth: int = 0) -> ParsedScript:
    """The script with every command replaced by what it effectively runs."""
    result = ParsedScript(constructs=set(script.constructs))
    for command in script.commands:
        _expand(command, depth, result)
    return result


def _expand(command: SimpleCommand, depth: int, out: ParsedScript) -> None:
    if depth > MAX_NESTING:
        raise ShellSyntaxError("wrappers nested too deeply")
    if not command.argv or command.name_is_dynamic:
        out.commands.append(command)
        return
    name = normalise_name(command.name)
    if name != command.name:
        command = replace(command, argv=(name, *command.argv[1:]))
    if name == "busybox" and len(command.argv) > 1:
        _expand(_shift(command, 1), depth + 1, out)
        return
    if name in SHELLS:
        found = _shell_script(command.argv)
        if found is None:
            out.commands.append(command)
            return
        _keep_assignments(command, out)
        index, script = found
        if index in command.dynamic_args:
            # ``bash -c "$X"``: the script itself is unknown until run time.
            out.commands.append(replace(command, argv=("$dynamic-script",), dynamic_args=frozenset({0}),
                                        fixed_args=frozenset()))
        _expand_text(script, command, depth, out)
        return
    if name in _STRING_WRAPPERS:
        _keep_assignments(command, out)
        start = _after_options(command.argv, 1, _OPTIONS_WITH_VALUE.get(name, set()))
        text = " ".join(command.argv[start:])
        if any(k >= start for k in command.dynamic_args):
            out.commands.append(replace(command, argv=("$dynamic-script",), dynamic_args=frozenset({0}),
                                        fixed_args=frozenset()))
        _expand_text(text, command, depth, out)
        return
    if name == "su":
        out.commands.append(command)
        if "-c" in command.argv[:-1]:
            _expand_text(command.argv[command.argv.index("-c") + 1], command, depth, out)
        return
    if name in TRANSPARENT_WRAPPERS or name in PRIVILEGE_WRAPPERS:
        if name in PRIVILEGE_WRAPPERS:
            out.commands.append(command)
        if name == "command" and any(a in ("-v", "-V") for a in command.argv[1:2]):
            out.commands.append(command)
            return
        start = _after_options(command.argv, 1, _OPTIONS_WITH_VALUE[name])
        assignments = list(command.assignments)
        chdir = _env_chdir(command.argv[1:start]) if name == "env" else None
        if name == "env":
            while start < len(command.argv) and "=" in command.argv[start]:
                key, _, value = command.argv[start].partition("=")
                assignments.append((key, value))
                start += 1
        elif name == "timeout" and start < len(command.argv):
            start += 1  # the duration
        if start >= len(command.argv):
            out.commands.append(command)
            return
        if name in TRANSPARENT_WRAPPERS:
            out.commands.append(replace(_keep(command, start), wraps=True))
        inner = _shift(command, start)
        if name == "xargs":
            inner = _xargs_inner(command.argv[1:start], inner)
        if chdir is not None:
            # The inner command runs in that directory; afterwards the shell's own is unknown here.
            out.commands.append(SimpleCommand(argv=("cd", chdir)))
        _expand(replace(inner, assignments=tuple(assignments)), depth + 1, out)
        if chdir is not None:
            out.commands.append(SimpleCommand(argv=("popd",)))
        return
    out.commands.append(command)
    if name == "find":
        for inner in _find_exec_commands(command):
            _expand(inner, depth + 1, out)


def _expand_text(text: str, outer: SimpleCommand, depth: int, out: ParsedScript) -> None:
    nested = parse_script(text, depth + 1)
    out.constructs |= nested.constructs
    for k, inner in enumerate(nested.commands):
        if k == 0 and outer.stdin_piped:
            inner = replace(inner, stdin_piped=True)
        if outer.redirects:
            inner = replace(inner, redirects=inner.redirects + outer.redirects)
        _expand(inner, depth + 1, out)


def _shell_script(argv: tuple[str, ...]) -> tuple[int, str] | None:
    """Index and text of SCRIPT in ``sh [options] -c SCRIPT``; None without -c."""
    k, c_mode = 1, False
    while k < len(argv):
        arg = argv[k]
        if arg == "--":
            k += 1
            break
        if arg in ("-o", "+o", "-O", "+O"):
            k += 2
            continue
        if arg.startswith("--"):
            k += 1
            continue
        if arg.startswith(("-", "+")) and len(arg) > 1:
            c_mode = c_mode or "c" in arg[1:]
            k += 1
            continue
        break
    if c_mode and k < len(argv):
        return k, argv[k]
    return None


def _after_options(argv: tuple[str, ...], start: int, with_value: set[str]) -> int:
    k = start
    while k < len(argv):
        arg = argv[k]
        if arg == "--":
            return k + 1
        if not arg.startswith("-") or arg == "-":
            return k
        k += 2 if arg in with_value else 1
    return k


def _shift(command: SimpleCommand, start: int) -> SimpleCommand:
    return replace(
        command,
        argv=command.argv[start:],
        dynamic_args=frozenset(k - start for k in command.dynamic_args if k >= start),
        fixed_args=frozenset(k - start for k in command.fixed_args if k >= start),
    )


def _keep_assignments(command: SimpleCommand, out: ParsedScript) -> None:
    """``A=1 bash -c ...``: the assignments apply to the script, so they are judged as a command of their own."""
    if command.assignments:
        out.commands.append(SimpleCommand(argv=(), assignments=command.assignments))


def _env_chdir(options: tuple[str, ...]) -> str | None:
    for k, option in enumerate(options):
        if option in ("-C", "--chdir") and k + 1 < len(options):
            return options[k + 1]
        if option.startswith("--chdir="):
            return option.partition("=")[2]
        if option.startswith("-C") and not option.startswith("--") and len(option) > 2:
            return option[2:]
    return None


def _keep(command: SimpleCommand, end: int) -> SimpleCommand:
    """The first ``end`` words of ``command``: a wrapper's own part."""
    return replace(command, argv=command.argv[:end], dynamic_args=frozenset(k for k in command.dynamic_args if k < end),
                   fixed_args=frozenset(k for k in command.fixed_args if k < end), redirects=())


def _xargs_inner(options: tuple[str, ...], inner: SimpleCommand) -> SimpleCommand:
    """The command xargs runs, with the words it will read from its input marked run-time."""
    replace_str = ""
    for k, option in enumerate(options):
        if option == "-I" and k + 1 < len(options):
            replace_str = options[k + 1]
        elif option.startswith("-I") and len(option) > 2:
            replace_str = option[2:]
        elif option.startswith(("-i", "--replace")):
            replace_str = option.partition("=")[2] or option[2:] or "{}"
    if replace_str:
        dynamic = {k for k, word in enumerate(inner.argv) if replace_str in word}
        return replace(inner, dynamic_args=inner.dynamic_args | frozenset(dynamic),
                       fixed_args=inner.fixed_args - frozenset(dynamic))
    return replace(inner, argv=inner.argv + (XARGS_INPUT,),
                   dynamic_args=inner.dynamic_args | frozenset({len(inner.argv)}))


def reads_script_from_stdin(command: SimpleCommand) -> bool:
    """A shell (after expansion, so without -c) whose script is its standard input."""
    if command.name not in SHELLS or command.stdin_piped or command.reads_stdin_redirect:
        return False
    return all(arg in _STDIN_SHELL_OPTIONS for arg in command.argv[1:])


def expand_stdin_scripts(script: ParsedScript, stdin_text: str) -> ParsedScript:
    """``script`` with each shell that reads the call's stdin replaced by what that stdin runs."""
    result = ParsedScript(constructs=set(script.constructs))
    for command in script.commands:
        if not reads_script_from_stdin(command):
            result.commands.append(command)
            continue
        nested = expand_script(parse_script(stdin_text, 1), 1)
        result.constructs |= nested.constructs
        result.commands.extend(nested.commands)
    return result


def _find_exec_commands(command: SimpleCommand) -> list[SimpleCommand]:
    """Commands of ``find ROOTS... -exec CMD {} ;``, with ``{}`` placed under each root."""
    argv = command.argv
    roots = []
    for arg in argv[1:]:
        if arg.startswith(("-", "(", "!")):
            break
        roots.append(arg)
    found: list[SimpleCommand] = []
    k = 0
    while k < len(argv):
        if argv[k] in _FIND_EXEC:
            end = k + 1
            while end < len(argv) and argv[end] not in (";", "+"):
                end += 1
            if end > k + 1:
                inner = argv[k + 1:end]
                dynamic = frozenset(i - k - 1 for i in command.dynamic_args if k < i < end)
                for root in roots or ["."]:
                    placed = tuple(root.rstrip("/") + "/{}" if a == "{}" else a for a in inner)
                    found.append(SimpleCommand(argv=placed, dynamic_args=dynamic))
            k = end
        k += 1
    return found
