"""The v1 contracts only grow: buf catches a breaking edit."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUF = Path(sys.executable).parent / "buf"
INFERENCE = Path("protos/llmesh/inference/v1/inference.proto")


def _workspace(tmp_path: Path) -> Path:
    work = tmp_path / "ws"
    work.mkdir()
    for name in ("protos", "descriptors", "build/third_party"):
        shutil.copytree(ROOT / name, work / name)
    shutil.copy2(ROOT / "buf.yaml", work / "buf.yaml")
    return work


def _breaking(work: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BUF), "breaking", "protos", "--against", "descriptors/llmesh-v1.binpb"],
                          cwd=work, capture_output=True, text=True, timeout=120)


@pytest.fixture()
def workspace(tmp_path: Path) -> Path:
    if not (ROOT / "build/third_party/google/api/annotations.proto").exists():
        pytest.fail("build/third_party is missing: run `make gen` first")
    return _workspace(tmp_path)


def test_current_protos_are_compatible_with_the_v1_image(workspace: Path) -> None:
    result = _breaking(workspace)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("old", "new", "expect"),
    [
        ("int32 queue_depth = 2;", "int32 queue_depth = 22;", "queue_depth"),  # renumbered
        ("int32 queue_depth = 2;", "string queue_depth = 2;", 'changed type from "int32" to "string"'),  # retyped
    ],
)
def test_breaking_edit_is_caught(workspace: Path, old: str, new: str, expect: str) -> None:
    proto = workspace / INFERENCE
    text = proto.read_text()
    assert old in text
    proto.write_text(text.replace(old, new))
    result = _breaking(workspace)
    assert result.returncode != 0
    assert expect in result.stdout + result.stderr


def test_lint_passes() -> None:
    result = subprocess.run([str(BUF), "lint"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
