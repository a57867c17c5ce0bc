"""http_fetch against a real HTTP server on loopback (off by default in the service)."""
from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.tools.adapters.http_fetch import HttpFetchTool
from services.tools.config import Settings
from services.tools.core.model import ToolStatus
from services.tools.server import build_app
from tests.support.ports import free_port
from tests.tools.conftest import CTX, call, make_executor

BIG = b"x" * 20_000


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        routes = {"/hello": (200, b"hello from loopback"), "/big": (200, BIG),
                  "/echo-header": (200, self.headers.get("X-Probe", "").encode())}
        status, body = routes.get(self.path, (404, b"no such page"))
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _executor(base: Path, max_bytes: int = 1 << 20):
    executor = make_executor(base)
    executor.registry.add(HttpFetchTool(max_bytes, 5_000).spec())
    return executor


async def test_fetch_returns_status_and_body(workspace_base: Path, server_url: str) -> None:
    outcome = await _executor(workspace_base).execute(CTX, call("http_fetch", url=server_url + "/hello"))
    assert outcome.status is ToolStatus.OK and outcome.exit_code == 0
    assert outcome.content.text == "hello from loopback"


async def test_request_headers_are_sent(workspace_base: Path, server_url: str) -> None:
    outcome = await _executor(workspace_base).execute(
        CTX, call("http_fetch", url=server_url + "/echo-header", headers={"X-Probe": "p-42"}))
    assert outcome.content.text == "p-42"


async def test_http_error_status_is_a_tool_error_with_the_body(workspace_base: Path, server_url: str) -> None:
    outcome = await _executor(workspace_base).execute(CTX, call("http_fetch", url=server_url + "/missing"))
    assert outcome.status is ToolStatus.ERROR and outcome.exit_code == 404
    assert outcome.error_reason == "HTTP_STATUS" and outcome.content.text == "no such page"


async def test_body_is_capped_at_max_bytes(workspace_base: Path, server_url: str) -> None:
    outcome = await _executor(workspace_base, max_bytes=1000).execute(CTX, call("http_fetch", url=server_url + "/big"))
    assert outcome.status is ToolStatus.OK
    assert len(outcome.content.text.encode()) <= 1000


async def test_refused_connection_fails_cleanly(workspace_base: Path) -> None:
    port = free_port()  # reserved, and nothing listens on it
    outcome = await _executor(workspace_base).execute(CTX, call("http_fetch", url=f"http://127.0.0.1:{port}/"))
    assert outcome.status is ToolStatus.ERROR and outcome.error_reason == "FETCH_FAILED"


async def test_non_http_scheme_is_rejected_before_running(workspace_base: Path) -> None:
    outcome = await _executor(workspace_base).execute(CTX, call("http_fetch", url="file:///etc/passwd"))
    assert outcome.status is ToolStatus.INVALID


def test_http_fetch_is_off_unless_enabled(tmp_path: Path) -> None:
    def names(settings: Settings) -> set[str]:
        return {spec.name for spec in build_app(settings).registry.list()}

    assert "http_fetch" not in names(Settings(port=0, data_dir=str(tmp_path)))
    assert "http_fetch" in names(Settings(port=0, data_dir=str(tmp_path), http_fetch_enabled=True))
