"""The settings tables in docs/ are the ones the settings dataclasses generate."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "settings_docs.py"


def _generator():
    spec = importlib.util.spec_from_file_location("settings_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("settings_docs", module)
    spec.loader.exec_module(module)
    return module


def test_every_settings_table_matches_its_dataclass() -> None:
    generator = _generator()
    stale = [doc.name for doc in sorted((ROOT / "docs").glob("*.md"))
             if generator.update(doc.read_text()) != doc.read_text()]
    assert stale == [], "run python scripts/settings_docs.py"


def test_every_service_has_a_generated_table_with_a_meaning_for_each_row() -> None:
    generator = _generator()
    targets = set()
    for doc in (ROOT / "docs").glob("*.md"):
        for match in generator.BLOCK.finditer(doc.read_text()):
            targets.add(match.group("target"))
            rows = [line for line in match.group("body").splitlines()[2:] if line.startswith("|")]
            assert rows, f"{doc.name}: empty table for {match.group('target')}"
            empty = [row for row in rows if re.search(r"\|\s*\|$", row)]
            assert empty == [], f"{doc.name}: rows without a meaning (comment the field): {empty}"
    services = {f"services.{name}.config.Settings" for name in
                ("store", "tools", "gateway", "orchestrator", "inference", "policy")}
    assert services | {"services.common.settings.ServerSettings"} <= targets
