"""Scripted stand-ins for inference, tools and policy (pure-logic tests only)."""
from __future__ import annotations

import asyncio
import json
import re
import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.common.errors import FailedPrecondition, NotFound, Unavailable
from services.orchestrator.core.events import Usage
from services.orchestrator.core.ports import (
    APPROVE_ONCE,
    APPROVE_SESSION,
    STATUS_APPROVAL_REQUIRED,
    STATUS_OK,
    STATUS_TIMEOUT,
    STATUS_UNAVAILABLE,
    GenerationChunk,
    GenerationRequest,
    ToolInvocation,
    ToolOutcome,
    ToolSpec,
)

_TOKEN_RE = re.compile(r"<[a-z_/]+>|[^\s<]+|\s+")
BOS = 2


def fake_tokenize(text: str) -> list[int]:
    """Deterministic word-level tokens; special markers are one token each."""
    return [zlib.crc32(piece.encode()) % 50_000 + 10 for piece in _TOKEN_RE.findall(text)]


@dataclass
class Gate:
    """A reply that waits for `release` before streaming (to cancel or disconnect mid-run)."""

    text: str
    release: asyncio.Event = field(default_factory=asyncio.Event)
    reached: asyncio.Event = field(default_factory=asyncio.Event)


class ScriptedInference:
    def __init__(self, replies: Sequence[Any] = (), *, n_ctx: int = 2048, chunk_words: int = 1,
                 token_delay_s: float = 0.0) -> None:
        self.replies: list[Any] = list(replies)
        self.n_ctx = n_ctx
        self.chunk_words = chunk_words
        self.token_delay_s = token_delay_s
        self.requests: list[GenerationRequest] = []
        self.tokenized: list[str] = []
        self.summaries: list[str] = []

    async def tokenize(self, text: str, *, model: str = "", add_special: bool = False) -> list[int]:
        self.tokenized.append(text)
        return ([BOS] if add_special else []) + fake_tokenize(text)

    async def context_size(self, model: str = "") -> int:
        return self.n_ctx

    async def generate(self, request: GenerationRequest):
        self.requests.append(request)
        assert len(request.prompt_tokens) + request.max_tokens <= self.n_ctx, "prompt overflows the context"
        if not self.replies:
            raise AssertionError("the script has no reply left")
        reply = self.replies.pop(0)
        if callable(reply) and not isinstance(reply, Gate):
            reply = reply(request)
        if isinstance(reply, BaseException):
            raise reply
        if isinstance(reply, Gate):
            reply.reached.set()
            await reply.release.wait()
            reply = reply.text
        words = re.findall(r"\S+\s*", reply) or [reply]
        for i in range(0, len(words), self.chunk_words):
            if self.token_delay_s:
                await asyncio.sleep(self.token_delay_s)
            yield GenerationChunk(text="".join(words[i:i + self.chunk_words]))
        yield GenerationChunk(text="", finish_reason="stop", ttft_ms=1.0,
                              usage=Usage(prompt_tokens=len(request.prompt_tokens), generated_tokens=len(words)))


def call(name: str, **arguments: Any) -> str:
    return f'<tool_call>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


FS_READ = ToolSpec("fs_read", "Read a text file.", {"type": "object", "properties": {"path": {"type": "string"}},
                                                    "required": ["path"]}, retryable=True, timeout_ms=2000)
FS_LIST = ToolSpec("fs_list", "List a directory.", {"type": "object", "properties": {"path": {"type": "string"}},
                                                     "required": ["path"]}, retryable=True, timeout_ms=2000)
SHELL = ToolSpec("shell", "Run a command.", {"type": "object", "properties": {"command": {"type": "string"}},
                                             "required": ["command"]}, retryable=False, timeout_ms=2000)

Handler = Callable[[dict], Awaitable[str]]


class FakeTools:
    """Runs handlers concurrently; `risky` tools need a person's approval first."""

    def __init__(self, specs: Sequence[ToolSpec] = (FS_READ, FS_LIST, SHELL), *, delay_s: float = 0.05,
                 risky: Sequence[str] = ("shell",)) -> None:
        self.specs = list(specs)
        self.delay_s = delay_s
        self.risky = set(risky)
        self.handlers: dict[str, Handler] = {}
        self.timeouts_left: dict[str, int] = {}
        self.unavailable_left = 0
        # Calls answered "policy could not be checked, the call did not run", per tool.
        self.policy_down_left: dict[str, int] = {}
        self.executed: list[ToolInvocation] = []
        self.batches: list[list[str]] = []
        self.running = 0
        self.max_running = 0
        self.session_grants: set[tuple[str, str, str]] = set()
        self.once_grants: set[str] = set()
        self.approval_calls: dict[str, tuple[str, str, str]] = {}
        self.answered: set[str] = set()
        self._num_approvals = 0

    async def list_tools(self) -> list[ToolSpec]:
        return list(self.specs)

    async def execute_tools(self, *, request_id, tenant_id, session_id, calls) -> list[ToolOutcome]:
        if self.unavailable_left > 0:
            self.unavailable_left -= 1
            raise Unavailable("tools node down")
        self.batches.append([c.name for c in calls])
        return list(await asyncio.gather(*(self._one(session_id, c) for c in calls)))

    async def _one(self, session_id: str, call: ToolInvocation) -> ToolOutcome:
        key = (session_id, call.name, call.arguments_json)
        if self.policy_down_left.get(call.name, 0) > 0:
            self.policy_down_left[call.name] -= 1
            return ToolOutcome(call.call_id, call.name, STATUS_UNAVAILABLE, output="policy could not be checked",
                               error_reason="POLICY_UNAVAILABLE")
        if call.name in self.risky and key not in self.session_grants and call.approval_id not in self.once_grants:
            # Like the policy service: an identical call still waiting reuses its approval id.
            approval_id = next((a for a, k in self.approval_calls.items() if k == key and a not in self.answered), "")
            if not approval_id:
                self._num_approvals += 1
                approval_id = f"ap-{self._num_approvals}"
                self.approval_calls[approval_id] = key
            return ToolOutcome(call.call_id, call.name, STATUS_APPROVAL_REQUIRED, approval_id=approval_id,
                               justification=f"{call.name} is risky")
        self.once_grants.discard(call.approval_id)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        try:
            await asyncio.sleep(self.delay_s)
            if self.timeouts_left.get(call.name, 0) > 0:
                self.timeouts_left[call.name] -= 1
                return ToolOutcome(call.call_id, call.name, STATUS_TIMEOUT, output="timed out")
            self.executed.append(call)
            handler = self.handlers.get(call.name)
            args = json.loads(call.arguments_json)
            output = await handler(args) if handler else f"{call.name} ran with {json.dumps(args, sort_keys=True)}"
            return ToolOutcome(call.call_id, call.name, STATUS_OK, output=output, duration_ms=self.delay_s * 1000)
        finally:
            self.running -= 1


class FakePolicy:
    """Records decisions on the approvals FakeTools opened; answers like the policy service does.

    Policy replicas share their approvals (through the store), so fakes of
    several orchestrator replicas share one FakeTools and see the same ones.
    """

    def __init__(self, tools: FakeTools) -> None:
        self.tools = tools
        self.recorded: list[tuple[str, str]] = []
        self._requests: dict[str, str] = {}

    async def record_approval(self, *, request_id, tenant_id, session_id, approval_id, decision, approver) -> None:
        key = self.tools.approval_calls.get(approval_id)
        if key is None or key[0] != session_id:
            raise NotFound(f"approval_id: no approval {approval_id!r} in this session", field="approval_id")
        if approval_id in self.tools.answered:
            if request_id and self._requests.get(request_id) == approval_id:
                return  # a retried request
            raise FailedPrecondition(f"approval_id: approval {approval_id!r} was already answered",
                                     reason="APPROVAL_ALREADY_ANSWERED", field="approval_id")
        self.recorded.append((approval_id, decision))
        self._requests[request_id] = approval_id
        self.tools.answered.add(approval_id)
        if decision == APPROVE_SESSION:
            self.tools.session_grants.add(key)
        elif decision == APPROVE_ONCE:
            self.tools.once_grants.add(approval_id)
