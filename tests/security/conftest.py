"""Fixtures of the security tests: the tool tests' own workspace base, named for what it is here."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.tools.conftest import workspace_base  # noqa: F401 - a fixture


@pytest.fixture
def base(workspace_base: Path) -> Path:  # noqa: F811 - the fixture above
    """A fresh 0755 folder outside pytest's 0700 tmp_path, as a deployment lays workspaces out."""
    return workspace_base
