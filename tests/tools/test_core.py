"""Pure pieces: names, truncation, breaker, cache, schema validation, workspace confinement."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from services.common.errors import InvalidArgument, PermissionDenied
from services.common.paging import encode_token
from services.tools.core import names
from services.tools.core.breaker import BreakerState, CircuitBreaker
from services.tools.core.cache import ResultCache, cache_key
from services.tools.core.executor import backoff_delay_s
from services.tools.core.model import ToolOutput, ToolSpec
from services.tools.core.output import CapturedText
from services.tools.core.registry import PAGE_SCOPE, ToolRegistry
from services.tools.core.workspace import Workspace, WorkspaceRoots


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _noop(args: dict, ctx: object) -> ToolOutput:
    return ToolOutput(ok=True)


def spec(name: str, source: str = "builtin", schema: dict | None = None) -> ToolSpec:
    return ToolSpec(name=name, description="", parameters_schema=schema or {"type": "object"}, handler=_noop,
                    source=source)


# names -----------------------------------------------------------------------

def test_mcp_names_are_qualified_and_sanitised() -> None:
    registry = ToolRegistry()
    added = registry.add(spec("read.file", source="mcp:git hub"), names.mcp_qualified("git hub", "read.file"))
    assert added.name == "mcp__git_hub__read_file"
    assert added.original_name == "read.file"
    assert names.VALID_NAME.match(added.name)


def test_colliding_and_overlong_names_get_a_stable_hash_suffix() -> None:
    registry = ToolRegistry()
    first = registry.add(spec("a.b", source="mcp:x"), "a_b")
    second = registry.add(spec("a_b", source="mcp:y"), "a_b")
    assert first.name == "a_b" and second.name != "a_b"
    assert names.VALID_NAME.match(second.name) and second.name.startswith("a_b_")
    long_name = "t" * 100
    long = registry.add(spec(long_name, source="mcp:z"), long_name)
    assert len(long.name) == 64 and names.VALID_NAME.match(long.name)
    assert long.original_name == long_name
    # A refresh of the same server keeps every name.
    again = registry.replace_source("mcp:y", [(spec("a_b", source="mcp:y"), "a_b")])
    assert again[0].name == second.name


# truncation ------------------------------------------------------------------

def test_truncation_keeps_head_and_tail_and_reports_original_size() -> None:
    data = b"HEAD-" + b"m" * 10_000 + b"-TAIL"
    captured = CapturedText.of(data, 100)
    assert captured.truncated and captured.original_bytes == len(data)
    assert captured.text.startswith("HEAD-") and captured.text.endswith("-TAIL")
    assert "bytes omitted" in captured.text
    assert len(captured.text.encode()) < 200


def test_small_output_is_kept_whole() -> None:
    captured = CapturedText.of("hello\n", 100)
    assert captured == CapturedText("hello\n", 6, False)


# breaker ---------------------------------------------------------------------

def test_breaker_opens_after_failures_in_window_and_recovers_through_a_probe() -> None:
    clock = Clock()
    breaker = CircuitBreaker(failure_threshold=3, window_s=10, reset_timeout_s=5, clock=clock)
    breaker.record_failure()
    clock.now += 11  # the first failure leaves the window
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is BreakerState.CLOSED and breaker.allow()
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.now += 5
    assert breaker.allow()  # the half-open probe
    assert not breaker.allow()  # only one probe at a time
    breaker.record_failure()
    assert breaker.state is BreakerState.OPEN and not breaker.allow()
    clock.now += 5
    assert breaker.allow()
    breaker.record_success()
    assert breaker.state is BreakerState.CLOSED and breaker.allow() and breaker.allow()


# cache -----------------------------------------------------------------------

def test_cache_key_is_canonical_and_covers_state() -> None:
    a = cache_key("fs_read", "1", {"path": "x", "offset": 0}, "/ws", "1:2:3")
    b = cache_key("fs_read", "1", {"offset": 0, "path": "x"}, "/ws", "1:2:3")
    assert a == b
    assert a != cache_key("fs_read", "2", {"path": "x", "offset": 0}, "/ws", "1:2:3")
    assert a != cache_key("fs_read", "1", {"path": "x", "offset": 0}, "/ws", "1:2:4")
    assert a != cache_key("fs_read", "1", {"path": "x", "offset": 0}, "/other", "1:2:3")


def test_cache_expires_after_ttl_and_evicts_least_recent() -> None:
    clock = Clock()
    cache: ResultCache[str] = ResultCache(ttl_s=10, max_entries=2, clock=clock)
    cache.put("a", "A")
    cache.put("b", "B")
    assert cache.get("a") == "A"
    cache.put("c", "C")  # evicts b, the least recently used
    assert cache.get("b") is None and cache.get("a") == "A"
    clock.now += 10
    assert cache.get("a") is None


def test_backoff_grows_exponentially_with_jitter_and_a_cap() -> None:
    assert backoff_delay_s(1, 100, 1000, lambda: 0.5) == pytest.approx(0.1)
    assert backoff_delay_s(3, 100, 1000, lambda: 0.5) == pytest.approx(0.4)
    assert backoff_delay_s(10, 100, 1000, lambda: 0.5) == pytest.approx(1.0)
    assert backoff_delay_s(2, 100, 1000, lambda: 0.0) == pytest.approx(0.1)
    assert backoff_delay_s(2, 100, 1000, lambda: 0.999) == pytest.approx(0.2998, rel=1e-3)


# schema validation -----------------------------------------------------------

def test_bad_arguments_name_every_failing_path() -> None:
    registry = ToolRegistry()
    registry.add(spec("t", schema={"type": "object", "required": ["path"], "properties": {
        "path": {"type": "string"}, "opts": {"type": "object", "properties": {"n": {"type": "integer"}}}}}))
    registry.validate("t", {"path": "ok", "opts": {"n": 3}})
    with pytest.raises(InvalidArgument) as err:
        registry.validate("t", {"opts": {"n": "three"}})
    assert err.value.field == "call.arguments_json"
    assert "$.opts.n" in err.value.message and "'path' is a required property" in err.value.message
    assert err.value.metadata["paths"] == "$,$.opts.n"


def test_a_broken_schema_is_refused_at_registration() -> None:
    with pytest.raises(InvalidArgument):
        ToolRegistry().add(spec("t", schema={"type": "no-such-type"}))


# listing ---------------------------------------------------------------------

def test_listing_pages_in_name_order_and_refuses_foreign_tokens() -> None:
    registry = ToolRegistry()
    for name in ("d", "a", "c", "b", "e"):
        registry.add(spec(name))
    seen, token = [], ""
    while True:
        page, token = registry.page(2, token)
        seen.append([s.name for s in page])
        if not token:
            break
    assert seen == [["a", "b"], ["c", "d"], ["e"]]
    assert [s.name for s in registry.page(0, "")[0]] == ["a", "b", "c", "d", "e"]
    for bad in ("garbage!", encode_token("sessions:acme", "b"), encode_token(PAGE_SCOPE, 7)):
        with pytest.raises(InvalidArgument) as err:
            registry.page(2, bad)
        assert err.value.field == "page_token"
    with pytest.raises(InvalidArgument) as err:
        registry.page(-1, "")
    assert err.value.field == "page_size"


# workspace -------------------------------------------------------------------

@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    root = tmp_path / "ws"
    (root / "src").mkdir(parents=True)
    (root / "src" / "a.py").write_text("x = 1\n")
    (tmp_path / "secret.txt").write_text("secret")
    os.symlink(tmp_path / "secret.txt", root / "link_out")
    os.symlink("src/a.py", root / "link_in")
    return Workspace(Path(os.path.realpath(root)))


@pytest.mark.parametrize("path", ["../secret.txt", "src/../../secret.txt", "/etc/passwd", "/proc/self/environ",
                                  "link_out", "~/x"])
def test_escapes_are_permission_denied(workspace: Workspace, path: str) -> None:
    with pytest.raises(PermissionDenied) as err:
        workspace.resolve(path)
    assert err.value.reason == "PATH_OUTSIDE_WORKSPACE"


def test_paths_inside_resolve(workspace: Workspace) -> None:
    assert workspace.resolve("src/../src/a.py") == workspace.root / "src" / "a.py"
    assert workspace.resolve("link_in") == workspace.root / "src" / "a.py"
    assert workspace.resolve(".") == workspace.root


def test_session_roots_are_created_per_tenant_and_session(tmp_path: Path) -> None:
    roots = WorkspaceRoots(tmp_path / "base")
    ws = roots.for_session("acme", "s-1")
    assert ws.root == (tmp_path / "base" / "acme" / "s-1").resolve() and ws.root.is_dir()
    for bad in ("..", "a/b", "", "."):
        with pytest.raises(InvalidArgument):
            roots.for_session("acme", bad)
