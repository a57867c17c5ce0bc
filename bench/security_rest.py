"""Server errors of the REST layer under hostile input: ``rest_5xx_under_fuzz`` (goal: 0).

Two sources of hostile requests, against every route of the gateway's
/openapi.json (annotated RPCs and the OpenAI endpoints):

1. schemathesis (its CLI, so its own phases run as designed): coverage,
   fuzzing (positive and negative data) and stateful (links inferred from
   the schema, e.g. a created session's id fed into the session routes);
   every exchange is read back from its HAR report.
2. A hostile corpus of our own, posted to every route with a body and sent
   as query, path and header values to the others: deep nesting, huge
   numbers, NUL, lone surrogates, wrong types, huge strings, duplicate keys,
   non-UTF-8 bytes, truncated JSON.

The gateway runs in process over fakes (tests/gateway/fakes.py): a fake
orchestrator with real session state, and empty replies from inference,
tools and policy, so this measures the translation layer, not the services.

    python bench/security_rest.py --out bench/results/security_rest.json
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from llmesh.inference.v1 import inference_pb2
from llmesh.orchestrator.v1 import orchestrator_pb2
from llmesh.policy.v1 import policy_pb2
from llmesh.tools.v1 import tools_pb2

from services.common import errors
from services.common.auth import ApiKeyAuthenticator, ApiKeyStore, FailedAttemptLimiter, generate_api_key
from services.common.runtime import running_service
from services.common.settings import ServerSettings
from services.gateway.config import Settings
from services.gateway.server import build_app, running_gateway
from tests.gateway.fakes import EmptyReplyApp, FakeAgentApp, FakeAgentService, ScriptedGenerator

EMPTY_REPLY_SERVICES = (inference_pb2.DESCRIPTOR.services_by_name["InferenceService"],
                        tools_pb2.DESCRIPTOR.services_by_name["ToolService"],
                        policy_pb2.DESCRIPTOR.services_by_name["PolicyService"])
MAX_EXAMPLES_LISTED = 20
# Lines of the schemathesis report worth keeping: phases, scenarios, links, case counts.
_SUMMARY_LINE = re.compile(r"(Coverage|Fuzzing|Stateful|Examples) \(|Scenarios:|API Links:|generated|Operations:")


class AgentServiceUnderTest(FakeAgentService):
    """The fake orchestrator, plus the task RPCs it leaves out, so no route hits an unimplemented method."""

    def __init__(self) -> None:
        super().__init__(step_s=0.0)
        self.tasks: dict[str, tuple[str, orchestrator_pb2.Task]] = {}

    async def EnqueueTask(self, request, context):
        errors.require(bool(request.tenant_id), "tenant_id", "must not be empty")
        task = orchestrator_pb2.Task(task_id=f"t{len(self.tasks) + 1}", session_id=request.session_id)
        self.tasks[task.task_id] = (request.tenant_id, task)
        return orchestrator_pb2.EnqueueTaskResponse(task=task)

    async def GetTask(self, request, context):
        tenant_id, task = self.tasks.get(request.task_id, ("", None))
        if task is None or tenant_id != request.tenant_id:
            raise errors.NotFound(f"task {request.task_id!r} not found", reason="TASK_NOT_FOUND")
        return orchestrator_pb2.GetTaskResponse(task=task)


class GatewayUnderTest:
    """The gateway and its fake backends on their own event loop, for synchronous clients."""

    def __init__(self) -> None:
        self.key, record = generate_api_key("acme", n=2**10)
        self.key_store = ApiKeyStore([record])
        self.url = ""
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        auth = ApiKeyAuthenticator(self.key_store, FailedAttemptLimiter(max_failures=10**9))
        try:
            agent = FakeAgentApp(AgentServiceUnderTest())
            async with running_service(agent, ServerSettings(port=0)) as orchestrator, \
                    running_service(EmptyReplyApp(EMPTY_REPLY_SERVICES), ServerSettings(port=0)) as others:
                target = f"127.0.0.1:{others.port}"
                settings = Settings(port=0, orchestrator_target=f"127.0.0.1:{orchestrator.port}",
                                    inference_target=target, tools_target=target, policy_target=target)
                app = build_app(settings, authenticator=auth, generator=ScriptedGenerator())
                async with running_gateway(app) as url:
                    self.url = url
                    self._ready.set()
                    await self._stop.wait()
        except BaseException as exc:  # surfaced to the caller's thread
            self.error = exc
        finally:
            auth.close()
            self._ready.set()

    def __enter__(self) -> GatewayUnderTest:
        self._thread.start()
        self._ready.wait(60)
        if self.error is not None or not self.url:
            raise RuntimeError(f"gateway did not start: {self.error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


# -- schemathesis ---------------------------------------------------------------

def run_schemathesis(url: str, key: str, *, phases: str, max_examples: int, max_time_s: int, seed: int,
                     workers: int) -> dict[str, Any]:
    """Run the schemathesis CLI against ``url``; every exchange's status, from its HAR report."""
    with tempfile.TemporaryDirectory(prefix="llmesh-schemathesis-") as tmp:
        har = Path(tmp) / "run.har"
        command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/openapi.json",
                   "--phases", phases, "--checks", "not_a_server_error", "--mode", "all",
                   "--max-examples", str(max_examples), "--max-time", str(max_time_s), "--seed", str(seed),
                   "--workers", str(workers), "--no-shrink", "--continue-on-failure", "--request-timeout", "30",
                   "--suppress-health-check", "all", "--header", f"Authorization: Bearer {key}",
                   "--report", "har", "--report-har-path", str(har), "--report-dir", tmp]
        started = time.monotonic()
        done = subprocess.run(command, capture_output=True, text=True, timeout=max_time_s + 300, cwd=tmp)
        entries = json.loads(har.read_text())["log"]["entries"] if har.exists() else []
    # A status of 0 is an exchange that got no answer (the connection dropped): a server error too.
    server_errors = [f"{e['request']['method']} {e['request']['url'][:200]} -> {e['response']['status']}"
                     for e in entries if e["response"]["status"] >= 500 or e["response"]["status"] == 0]
    operations = {re.sub(r"\?.*", "", e["request"]["url"]) for e in entries}
    summary = [line.strip() for line in done.stdout.splitlines()
               if _SUMMARY_LINE.search(line) and len(line.strip()) < 120]
    return {"phases": phases, "num_requests": len(entries), "num_5xx": len(server_errors),
            "num_urls": len(operations), "exit_code": done.returncode, "summary": summary,
            "seconds": round(time.monotonic() - started, 1), "examples": server_errors[:MAX_EXAMPLES_LISTED],
            "output_tail": done.stdout[-1500:] if done.returncode not in (0, 1) or not entries else ""}


# -- hostile corpus ---------------------------------------------------------------

def _nested(depth: int, opening: bytes, closing: bytes, inner: bytes = b"1") -> bytes:
    return opening * depth + inner + closing * depth


HOSTILE_BODIES: dict[str, bytes] = {
    "deep array 100k": _nested(100_000, b"[", b"]"),
    "deep object 50k": _nested(50_000, b'{"a":', b"}"),
    "deep 65": _nested(65, b"[", b"]"),
    "deep mixed": _nested(20_000, b'[{"a":', b"}]"),
    "deep unclosed": b"[" * 200_000,
    "deep inside a field": b'{"title": ' + _nested(5_000, b'{"a":', b"}") + b"}",
    "huge int": b'{"a": ' + b"9" * 5_000 + b"}",
    "huge negative int": b'{"a": -' + b"9" * 100_000 + b"}",
    "huge exponent": b'{"a": 1e999999999}',
    "NaN": b'{"a": NaN}',
    "Infinity": b'[-Infinity]',
    "NUL escape": b'{"a": "x\\u0000y"}',
    "raw NUL in string": b'{"a": "x\x00y"}',
    "raw NUL outside": b'{"a": 1}\x00',
    "lone high surrogate": b'{"a": "\\ud800"}',
    "lone low surrogate key": b'{"\\udfff": 1}',
    "surrogate as UTF-8 bytes": b'{"a": "\xed\xa0\x80"}',
    "duplicate keys": b'{"a": 1, "a": 2}',
    "latin-1": '{"a": "caf\u00e9"}'.encode("latin-1"),
    "UTF-16 with BOM": '{"a": 1}'.encode("utf-16"),
    "UTF-8 BOM": b'\xef\xbb\xbf{"a": 1}',
    "invalid continuation": b'{"a": "\xc3\x28"}',
    "truncated": b'{"a": [1, 2',
    "empty": b"",
    "whitespace": b" \n\t ",
    "null": b"null",
    "top-level array": b"[1, 2, 3]",
    "top-level string": b'"hello"',
    "top-level number": b"12345678901234567890",
    "huge string": b'{"a": "' + b"x" * (3 * 1024 * 1024) + b'"}',
    "over the size limit": b'{"a": "' + b"x" * (4 * 1024 * 1024 + 16) + b'"}',
    "many elements": b"[" + b"0," * 400_000 + b"0]",
    "many keys": b"{" + b",".join(b'"k%d": 1' % i for i in range(50_000)) + b"}",
}

HOSTILE_VALUES: dict[str, Any] = {
    "NUL": "a\x00b", "lone surrogate": "\ud800", "huge int": 10**30, "negative huge int": -(10**30),
    "int64 max + 1": 2**63, "infinity": float("inf"), "nan": float("nan"), "tiny float": -1e-320,
    "bool": True, "null": None, "array": [1, "x", None], "object": {"a": {"b": [1]}},
    "empty string": "", "long string": "x" * 200_000, "deep value": json.loads(_nested(60, b"[", b"]")),
    "numeric string": "99999999999999999999999", "enum-ish": "PRIORITY_BOGUS",
}

HOSTILE_URL_VALUES = ["%00", "%ED%A0%80", "%FF%FE", "99999999999999999999999", "-99999999999999999999999",
                      "1_000", "%C2%B2", "1e309", "NaN", "x" * 8_000, "%2F..%2F..", "0x10", "%20%207"]

HOSTILE_LAST_EVENT_IDS = ["99999999999999999999999", "9223372036854775808", "-1", "1" * 5_000, "abc", "1.5",
                          "7 7", "+7", "0x1f"]


def _dumps(value: Any) -> bytes:
    """JSON text of ``value``; lone surrogates become \\u escapes, as a careless client would send them."""
    return json.dumps(value, ensure_ascii=True, allow_nan=True).encode()


def _resolve(doc: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    ref = schema.get("$ref")
    return doc["components"]["schemas"][ref.rsplit("/", 1)[1]] if ref else schema


def hostile_requests(doc: dict[str, Any]) -> Iterator[tuple[str, str, str, bytes, dict[str, str]]]:
    """(label, method, path, body, headers) for every route of ``doc``."""
    json_headers = {"Content-Type": "application/json"}
    for template, methods in doc["paths"].items():
        for method, operation in methods.items():
            method = method.upper()
            path = re.sub(r"\{[^}]+\}", "s1", template)
            params = operation.get("parameters", [])
            if "requestBody" in operation:
                for label, body in HOSTILE_BODIES.items():
                    yield f"body {label}", method, path, body, json_headers
                schema = _resolve(doc, operation["requestBody"]["content"]["application/json"]["schema"])
                names = list(schema.get("properties", {})) or ["model", "messages", "prompt", "max_tokens", "n",
                                                                "stream", "temperature", "seed", "tools", "stop"]
                for name in names:
                    for label, value in HOSTILE_VALUES.items():
                        yield f"field {name}={label}", method, path, _dumps({name: value}), json_headers
            for param in params:
                if param["in"] == "path":
                    for value in HOSTILE_URL_VALUES:
                        yield (f"path {param['name']}={value[:20]}", method,
                               template.replace("{" + param["name"] + "}", value), b"{}", json_headers)
                elif param["in"] == "query":
                    for value in HOSTILE_URL_VALUES:
                        yield f"query {param['name']}={value[:20]}", method, f"{path}?{param['name']}={value}", \
                            b"{}" if "requestBody" in operation else b"", json_headers
                elif param["in"] == "header":
                    for value in HOSTILE_LAST_EVENT_IDS:
                        yield f"header {param['name']}={value[:20]}", method, path, \
                            b"{}" if "requestBody" in operation else b"", {**json_headers, param["name"]: value}
            yield "unknown query field", method, f"{path}?no_such_field=1&no_such_field=2", b"", json_headers


def _send(client: httpx.Client, method: str, path: str, body: bytes, headers: dict[str, str]) -> httpx.Response:
    try:
        return client.request(method, path, content=body, headers=headers)
    except httpx.TransportError:
        # Once more on a new connection: the server may have closed a kept-alive one after an earlier error.
        return client.request(method, path, content=body, headers={**headers, "Connection": "close"})


def run_corpus(url: str, key: str) -> dict[str, Any]:
    started = time.monotonic()
    statuses: dict[int, int] = {}
    server_errors: list[str] = []
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        doc = client.get("/openapi.json").json()
        num_requests = 0
        for label, method, path, body, headers in hostile_requests(doc):
            num_requests += 1
            try:
                response = _send(client, method, path, body, headers)
            except httpx.TransportError as exc:
                # A request the server dropped instead of answering counts as a server error.
                statuses[0] = statuses.get(0, 0) + 1
                server_errors.append(f"{method} {path[:120]} [{label}] -> no answer: {exc!r}"[:300])
                continue
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            if response.status_code >= 500:
                server_errors.append(f"{method} {path[:120]} [{label}] -> {response.status_code} {response.text[:200]}")
    return {"num_requests": num_requests, "num_5xx": len(server_errors),
            "num_routes": sum(map(len, doc["paths"].values())),
            "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "seconds": round(time.monotonic() - started, 1), "examples": server_errors[:MAX_EXAMPLES_LISTED]}


def measure_rest_fuzz(*, phases: str = "coverage,fuzzing,stateful", max_examples: int = 30, max_time_s: int = 120,
                      seed: int = 18, workers: int = 2, schemathesis: bool = True) -> dict[str, Any]:
    """Responses with status >= 500 while fuzzing every route: ``rest_5xx_under_fuzz`` and the details."""
    started = time.monotonic()
    with GatewayUnderTest() as gateway:
        corpus = run_corpus(gateway.url, gateway.key)
        fuzz = (run_schemathesis(gateway.url, gateway.key, phases=phases, max_examples=max_examples,
                                 max_time_s=max_time_s, seed=seed, workers=workers) if schemathesis else None)
    total = corpus["num_5xx"] + (fuzz["num_5xx"] if fuzz else 0)
    return {"rest_5xx_under_fuzz": total, "corpus": corpus, "schemathesis": fuzz,
            "seconds": round(time.monotonic() - started, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="write the JSON result here (else stdout)")
    parser.add_argument("--phases", default="coverage,fuzzing,stateful")
    parser.add_argument("--max-examples", type=int, default=30)
    parser.add_argument("--max-time", type=int, default=120, help="schemathesis time budget, seconds")
    parser.add_argument("--seed", type=int, default=18)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--corpus-only", action="store_true", help="skip schemathesis")
    args = parser.parse_args(argv)
    result = measure_rest_fuzz(phases=args.phases, max_examples=args.max_examples, max_time_s=args.max_time,
                               seed=args.seed, workers=args.workers, schemathesis=not args.corpus_only)
    text = json.dumps(result, indent=2) + "\n"
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text if not args.out else f"rest_5xx_under_fuzz={result['rest_5xx_under_fuzz']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
