"""The layout rules, checked on every import statement of services/.

- A ``core/`` package is pure logic: no grpc, generated ``*_pb2`` code,
  sqlalchemy, llama_cpp or prometheus_client.
- A service imports ``services.common``, ``services.gemma`` and other
  services' ``client`` packages only, never another service's internals.
"""
from __future__ import annotations

import ast
from pathlib import Path

SERVICES = Path(__file__).resolve().parents[2] / "services"
CORE_FORBIDDEN = ("grpc", "sqlalchemy", "llama_cpp", "prometheus_client", "grpc_health", "grpc_reflection")
SHARED = ("common", "gemma")


def _imports(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _sources() -> list[Path]:
    return sorted(p for p in SERVICES.rglob("*.py") if "__pycache__" not in p.parts)


def test_core_packages_import_no_transport_database_model_or_metrics_library() -> None:
    offenders = []
    for path in _sources():
        if "core" not in path.relative_to(SERVICES).parts:
            continue
        for line, name in _imports(path):
            top = name.split(".")[0]
            if top in CORE_FORBIDDEN or name.endswith("_pb2") or name.endswith("_pb2_grpc"):
                offenders.append(f"{path.relative_to(SERVICES.parent)}:{line} imports {name}")
    assert offenders == []


def test_services_import_only_common_and_other_services_clients() -> None:
    offenders = []
    for path in _sources():
        parts = path.relative_to(SERVICES).parts
        if len(parts) < 2:
            continue  # services/launcher.py starts every service: it may name them all
        own = parts[0]
        for line, name in _imports(path):
            pieces = name.split(".")
            if pieces[0] != "services" or len(pieces) < 2 or pieces[1] in (own, *SHARED, "launcher"):
                continue
            if len(pieces) >= 3 and pieces[2] == "client":
                continue
            offenders.append(f"{path.relative_to(SERVICES.parent)}:{line} imports {name}")
    assert offenders == []


def test_the_rules_see_every_service() -> None:
    names = {p.relative_to(SERVICES).parts[0] for p in _sources() if len(p.relative_to(SERVICES).parts) > 1}
    assert {"common", "inference", "orchestrator", "tools", "policy", "store", "gateway"} <= names
