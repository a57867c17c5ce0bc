"""Writes the settings tables of docs/ from the settings dataclasses, so they cannot drift.

A table stands in a doc between ``<!-- settings: module.Class -->`` and
``<!-- /settings -->``. Its rows are the class's own fields (those it adds or
overrides, not the inherited ones) grouped as the source groups them: the
comment lines just above a field are its meaning, and the fields right
below it with no comment of their own and a name that starts the same
(``pool_size``, ``pool_max_overflow``) share its row. ``--check`` exits 1, naming the doc, when a table is out of date.

    python scripts/settings_docs.py          # rewrite the tables
    python scripts/settings_docs.py --check  # the test suite runs this
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"(<!-- settings: (?P<target>[\w.]+) -->\n)(?P<body>.*?)(<!-- /settings -->)", re.S)


@dataclass
class Row:
    names: list[str]
    meaning: str


def _groups(cls: type) -> list[Row]:
    """The class body's fields in source order, grouped under their comments."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    tree = ast.parse(source)
    body = tree.body[0]
    assert isinstance(body, ast.ClassDef)
    own = {f.name for f in dataclasses.fields(cls)}
    rows: list[Row] = []
    previous_end = None
    for node in body.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            previous_end = None
            continue
        name = node.target.id
        if name not in own:
            continue
        start = node.lineno - 1  # 0-based index of the field's line
        comment: list[str] = []
        index = start - 1
        while index >= 0 and lines[index].strip().startswith("#"):
            comment.insert(0, lines[index].strip().lstrip("#").removeprefix(":").strip())
            index -= 1
        trailing = lines[node.end_lineno - 1].split("#", 1)[1].strip() if "#" in lines[node.end_lineno - 1] \
            and not lines[node.end_lineno - 1].strip().startswith("#") and _outside_string(
                lines[node.end_lineno - 1]) else ""
        # A field with no comment of its own shares the row above when it
        # follows it directly and its name starts the same (pool_size, pool_max_overflow).
        joins_previous = (not comment and previous_end is not None and start == previous_end + 1 and rows
                          and name.split("_")[0] == rows[-1].names[0].split("_")[0])
        if joins_previous and not trailing:
            rows[-1].names.append(name)
        else:
            rows.append(Row([name], " ".join(comment + ([trailing] if trailing else []))))
        previous_end = node.end_lineno - 1
    return rows


def _outside_string(line: str) -> bool:
    code = line.split("#", 1)[0]
    return code.count('"') % 2 == 0 and code.count("'") % 2 == 0


def _default(cls: type, name: str) -> str:
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    value: Any = field.default
    if value is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = field.default_factory()  # type: ignore[misc]
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ", ".join(f"`{item}`" for item in value) if value else "empty"
    if isinstance(value, str):
        return f"`{value}`" if value else "empty"
    return str(value)


def _own_fields(cls: type) -> set[str]:
    """Fields the class declares itself (new or with a new default)."""
    return set(cls.__dict__.get("__annotations__", {}))


def render(target: str) -> str:
    module_name, class_name = target.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    own = _own_fields(cls)
    out = ["| field | default | meaning |", "| --- | --- | --- |"]
    for row in _groups(cls):
        names = [n for n in row.names if n in own]
        if not names:
            continue
        fields = ", ".join(f"`{n}`" for n in names)
        defaults = "; ".join(_default(cls, n) for n in names)
        out.append(f"| {fields} | {defaults} | {row.meaning.replace('|', '/')} |")
    return "\n".join(out) + "\n"


def update(text: str) -> str:
    return BLOCK.sub(lambda m: m.group(1) + render(m.group("target")) + m.group(4), text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a table is out of date")
    args = parser.parse_args(argv)
    stale = []
    for doc in sorted((ROOT / "docs").glob("*.md")):
        text = doc.read_text()
        fresh = update(text)
        if fresh != text:
            stale.append(doc.relative_to(ROOT))
            if not args.check:
                doc.write_text(fresh)
    if args.check and stale:
        print("settings tables out of date (run python scripts/settings_docs.py):",
              ", ".join(map(str, stale)), file=sys.stderr)
        return 1
    if not args.check:
        print(f"rewrote {len(stale)} doc(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
