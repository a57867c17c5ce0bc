"""AgentLoop: one run = model -> tool calls -> model ... -> final answer.

Each step builds the prompt through the ContextManager (compacting when
needed), samples the model under the tool-call grammar, streams answer text
as `token` events, and hands tool calls to the ToolOrchestrator. A model call
that fails before its first token is retried with backoff; after that the
step fails, because text already went out to clients.
"""
from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.common.errors import InvalidArgument, Unavailable
from services.orchestrator.core import events as ev
from services.orchestrator.core.context import ContextManager
from services.orchestrator.core.events import Usage
from services.orchestrator.core.history import ASSISTANT, TOOL_OUTPUT, USER, CallRef, HistoryItem
from services.orchestrator.core.ports import GenerationRequest, InferencePort, ToolInvocation, ToolSpec
from services.orchestrator.core.prompt import PromptPipeline
from services.orchestrator.core.retry import RetryPolicy
from services.orchestrator.core.tool_format import MalformedReply, ParsedReply, build_grammar, parse_reply
from services.orchestrator.core.tool_runner import ToolOrchestrator, ToolTurnContext

log = logging.getLogger("llmesh.orchestrator.agent")

SUMMARY_MAX_TOKENS = 64
DEFAULT_RETRY = RetryPolicy()
SUMMARY_INSTRUCTION = "Summarise the conversation below in a few sentences, keeping names, paths and results.\n\n"


@dataclass(frozen=True)
class RunSpec:
    tenant_id: str
    session_id: str
    run_id: str
    user_message: str
    model: str = ""
    max_steps: int = 8
    max_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None
    priority: int = 0
    # "auto", "required" (first step calls tools) or "none".
    tool_choice: str = "auto"


@dataclass
class RunResult:
    text: str = ""
    # "stop", "max_steps", "cancelled" or "aborted"; "" when the run failed.
    reason: str = ""
    usage: Usage = field(default_factory=Usage)
    error_reason: str = ""
    # Time spent waiting on inference and tools, for overhead measurement.
    inference_s: float = 0.0
    tools_s: float = 0.0
    first_token_ttft_ms: float = 0.0


class MalformedToolCall(InvalidArgument):
    default_reason = "MALFORMED_TOOL_CALL"


class _TokenStreamer:
    """Streams answer text; holds back replies that turn out to be tool calls."""

    def __init__(self, emit: Callable[[str, dict], object], *, answer_only: bool = False) -> None:
        self._emit = emit
        self._held = ""
        self._mode = "answer" if answer_only else ""  # "", "answer" or "calls"

    def feed(self, text: str) -> None:
        if self._mode == "calls":
            return
        if self._mode == "answer":
            self._send(text)
            return
        self._held += text
        head = self._held.lstrip()
        if head:
            self._mode = "calls" if head.startswith("<") else "answer"
            if self._mode == "answer":
                self._send(self._held)
            self._held = ""

    def _send(self, text: str) -> None:
        if text:
            self._emit(ev.TOKEN, {"text": text})


class AgentLoop:
    def __init__(self, inference: InferencePort, tools: ToolOrchestrator, *, retry: RetryPolicy = DEFAULT_RETRY,
                 rng: random.Random | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        self._inference = inference
        self._tools = tools
        self._retry = retry
        self._rng = rng or random.Random()
        self._clock = clock

    def make_summarizer(self, pipeline: PromptPipeline, n_ctx: int, spec: RunSpec):
        async def summarize(items: Sequence[HistoryItem]) -> str:
            body = SUMMARY_INSTRUCTION + "".join(i.render() for i in items)
            tokens = await pipeline.build_text(body)
            if len(tokens) + SUMMARY_MAX_TOKENS > n_ctx:
                log.info("history too long to summarise in one call", extra={"tokens": len(tokens)})
                return ""
            request = GenerationRequest(request_id=f"{spec.run_id}:summary:{len(tokens)}", prompt_tokens=tokens,
                                        model=spec.model, max_tokens=SUMMARY_MAX_TOKENS, temperature=0.0,
                                        grammar='root ::= [^<\\x00] [^<\\x00]*', priority=spec.priority,
                                        tenant_id=spec.tenant_id)
            text, _usage, _ttft = await self._generate(request, lambda _t: None)
            return text
        return summarize

    async def run(self, spec: RunSpec, context: ContextManager, tool_specs: Sequence[ToolSpec],
                  emit: Callable[[str, dict], object], result: RunResult) -> RunResult:
        """Drive the run to its end; `result` is filled as it goes (also read on cancel)."""
        await context.add(HistoryItem(kind=USER, text=spec.user_message))
        by_name = {t.name: t for t in tool_specs}
        for step in range(spec.max_steps):
            grammar = self._grammar(spec, tool_specs, step)
            answer_only = not grammar
            prepared = await context.prepare(spec.max_tokens)
            for report in prepared.compactions:
                emit(ev.COMPACTION, {"strategy": report.strategy, "tokens_before": report.tokens_before,
                                     "tokens_after": report.tokens_after})
            request = GenerationRequest(
                request_id=f"{spec.run_id}:{step}", prompt_tokens=prepared.prompt.tokens, model=spec.model,
                session_id=spec.session_id, max_tokens=prepared.max_tokens, temperature=spec.temperature,
                seed=spec.seed, grammar=grammar, priority=spec.priority, tenant_id=spec.tenant_id)
            started = self._clock()
            streamer = _TokenStreamer(emit, answer_only=answer_only)
            text, usage, ttft_ms = await self._generate(request, streamer.feed)
            result.inference_s += self._clock() - started
            if step == 0:
                result.first_token_ttft_ms = ttft_ms
            result.usage = result.usage.add(usage)
            try:
                reply = ParsedReply(calls=(), text=text.strip()) if answer_only else parse_reply(text, list(by_name))
            except MalformedReply as exc:
                raise MalformedToolCall(f"model reply: {exc}", field="tool_call") from None
            if reply.is_final:
                await context.add(HistoryItem(kind=ASSISTANT, text=reply.text))
                result.text, result.reason = reply.text, "stop"
                return result
            calls = [ToolInvocation(call_id=f"{spec.run_id[:8]}-{step}-{i}", name=c.name,
                                    arguments_json=c.arguments_json, timeout_ms=by_name[c.name].timeout_ms)
                     for i, c in enumerate(reply.calls)]
            await context.add(HistoryItem(kind=ASSISTANT, calls=tuple(
                CallRef(call.call_id, c.name, c.arguments) for call, c in zip(calls, reply.calls, strict=True))))
            started = self._clock()
            outcomes = await self._tools.run_calls(
                ToolTurnContext(spec.tenant_id, spec.session_id, spec.run_id, step, emit), calls, by_name)
            result.tools_s += self._clock() - started
            result.usage = result.usage.add(Usage(num_tool_calls=len(calls)))
            await context.add(*(HistoryItem(kind=TOOL_OUTPUT, text=o.output, call_id=o.call_id, name=o.name,
                                            status=o.status) for o in outcomes))
        result.reason = "max_steps"
        return result

    @staticmethod
    def _grammar(spec: RunSpec, tools: Sequence[ToolSpec], step: int) -> str:
        last_step = step == spec.max_steps - 1
        if spec.tool_choice == "none" or not tools or (last_step and step > 0):
            # No tools on offer: free text is the answer (and sampling without a grammar is
            # faster). The last step answers, so a run that is not stopped ends with an answer.
            return ""
        return build_grammar(tools, require_call=spec.tool_choice == "required" and step == 0)

    async def _generate(self, request: GenerationRequest, on_text: Callable[[str], None]) -> tuple[str, Usage, float]:
        """Sample one reply; retried with backoff only while nothing was streamed."""
        for attempt in range(self._retry.max_attempts):
            parts: list[str] = []
            usage = Usage(num_model_calls=1)
            ttft_ms = 0.0
            try:
                async for chunk in self._inference.generate(request):
                    if chunk.text:
                        parts.append(chunk.text)
                        on_text(chunk.text)
                    if chunk.usage is not None:
                        usage = Usage(prompt_tokens=chunk.usage.prompt_tokens,
                                      cached_tokens=chunk.usage.cached_tokens,
                                      generated_tokens=chunk.usage.generated_tokens, num_model_calls=1)
                        ttft_ms = chunk.ttft_ms
                return "".join(parts), usage, ttft_ms
            except Unavailable:
                if parts or attempt + 1 >= self._retry.max_attempts:
                    raise
                log.warning("inference unavailable, retrying", extra={"attempt": attempt + 1})
                await asyncio.sleep(self._retry.delay_s(attempt, self._rng))
        raise AssertionError("unreachable")
