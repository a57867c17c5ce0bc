"""OpenAI's Responses API over a TextGenerator and a ResponseLog (the store).

A stored response chain is a session: its items (inputs and outputs) are the
session's messages, and the node keeps the session's KV cache under the same
id, so a follow-up with ``previous_response_id`` prefills only what is new.
A response id names its chain (``resp_<chain><suffix>``); the store binds every
read and write to the caller's tenant, so another tenant's id is not found.

One writer per chain at a time: a response takes the chain's store lock while
it runs. A follow-up of a response that is no longer the chain's tip (or
whose chain another response is extending now) forks: it gets a new chain
holding a copy of the history, prefilled cold on its first turn.

Background responses write their stream events to the store as they go, so
any gateway replica can replay them (``starting_after``) and follow the rest,
and a cancel posted through any replica reaches the runner through the
chain's events.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from services.common import errors
from services.gateway.core.chat_format import parse_tool_call
from services.gateway.core.openai_compat import MAX_MAX_TOKENS, CompletionPlan, plan_chat
from services.gateway.core.openai_fields import check_fields
from services.gateway.core.ports import GenerationChunk, ResponseLog, StoredItem, TextGenerator

log = logging.getLogger("llmesh.gateway")

_ID = re.compile(r"resp_([0-9a-f]{24})[0-9a-f]{16}")
CHAIN_PREFIX = "responses-"
# A runner renews its chain lock every third of this; a dead runner's lock lapses after it.
LOCK_LEASE_MS = 30_000
# A reader that finds a response unfinished and its chain's lock free holds the lock this long to end it.
REAP_LEASE_MS = 10_000
TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})
END_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed", "response.cancelled"})
# Stream events of a background response are flushed to the store in batches this far apart.
FLUSH_S = 0.02
MAX_METADATA_KEYS = 16
INPUT_ROLES = ("user", "system", "developer", "assistant")
# Store roles of the API's message roles (the store has no "developer").
_STORE_ROLE = {"user": "user", "system": "system", "developer": "system", "assistant": "assistant"}
DEFAULT_INPUT_ITEMS = 20
# How long a cancel waits for the runner to record the end before answering with the response as it stands.
CANCEL_WAIT_S = 10.0
MAX_INPUT_ITEMS = 100


def chain_of(response_id: Any, field_name: str) -> str:
    """The store session of a response id; NOT_FOUND naming ``field_name`` when it is not one of ours."""
    match = _ID.fullmatch(response_id) if isinstance(response_id, str) else None
    if match is None:
        raise errors.NotFound(f"{field_name}: no response {str(response_id)[:64]!r}", field=field_name,
                              reason="RESPONSE_NOT_FOUND")
    return CHAIN_PREFIX + match.group(1)


def _new_id(chain: str) -> str:
    return "resp_" + chain.removeprefix(CHAIN_PREFIX) + secrets.token_hex(8)


def _new_chain() -> str:
    return CHAIN_PREFIX + secrets.token_hex(12)


# Field names of the chat planner -> the Responses names they stand for, in refusals.
_RENAMES = ((re.compile(r"^max_tokens"), "max_output_tokens"),
            (re.compile(r"^response_format\.json_schema"), "text.format"),
            (re.compile(r"^response_format"), "text.format"),
            (re.compile(r"^tools\[(\d+)\]\.function"), r"tools[\1]"),
            (re.compile(r"^tool_choice\.function"), "tool_choice"),
            (re.compile(r"^messages(\[\d+\])?"), "input"))


def _renamed(exc: errors.DomainError) -> errors.DomainError:
    if not isinstance(exc, errors.InvalidArgument) or not exc.field:
        return exc
    new = exc.field
    for pattern, replacement in _RENAMES:
        new = pattern.sub(replacement, new)
    if new == exc.field:
        return exc
    return errors.InvalidArgument(exc.message.replace(exc.field, new, 1), field=new, reason=exc.reason)


@dataclass(frozen=True)
class ResponsePlan:
    # The request's items, as the API shows them (with ids).
    input_items: tuple[dict[str, Any], ...]
    # The chat-completions body the items after the history render through.
    chat_body: dict[str, Any]
    # What the response object echoes of the request.
    echo: dict[str, Any]
    previous_response_id: str | None
    store: bool
    stream: bool
    background: bool


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _text_parts(content: Any, field_name: str, part_type: str) -> str:
    if isinstance(content, str):
        return content
    errors.require(isinstance(content, list), field_name, "must be a string or a list of content parts")
    texts = []
    for i, part in enumerate(content):
        errors.require(isinstance(part, dict) and part.get("type") == part_type and isinstance(part.get("text"), str),
                       f"{field_name}[{i}]", f"only {part_type} parts are supported here")
        texts.append(part["text"])
    return "".join(texts)


def _input_item(raw: Any, field_name: str) -> dict[str, Any]:
    """One input item, checked and normalised to the shape the API lists (with an id)."""
    errors.require(isinstance(raw, dict), field_name, "must be an object")
    kind = raw.get("type", "message")
    if kind == "message":
        role = raw.get("role")
        errors.require(role in INPUT_ROLES, f"{field_name}.role", f"must be one of {', '.join(INPUT_ROLES)}")
        part = "output_text" if role == "assistant" else "input_text"
        text = _text_parts(raw.get("content"), f"{field_name}.content", part)
        content: dict[str, Any] = {"type": part, "text": text}
        if part == "output_text":
            content["annotations"] = []
        return {"type": "message", "id": _item_id("msg"), "role": role, "status": "completed", "content": [content]}
    if kind == "function_call":
        for name in ("call_id", "name", "arguments"):
            errors.require(isinstance(raw.get(name), str) and raw[name] != "", f"{field_name}.{name}",
                           "must be a non-empty string")
        return {"type": "function_call", "id": _item_id("fc"), "call_id": raw["call_id"], "name": raw["name"],
                "arguments": raw["arguments"], "status": "completed"}
    if kind == "function_call_output":
        errors.require(isinstance(raw.get("call_id"), str) and raw["call_id"] != "", f"{field_name}.call_id",
                       "must be a non-empty string")
        output = _text_parts(raw.get("output"), f"{field_name}.output", "input_text")
        return {"type": "function_call_output", "id": _item_id("fco"), "call_id": raw["call_id"], "output": output,
                "status": "completed"}
    raise errors.InvalidArgument(f"{field_name}.type: only message, function_call and function_call_output items "
                                 "are supported", field=f"{field_name}.type", reason="UNSUPPORTED_VALUE")


def _tools(raw: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(tools as the response echoes them, tools as chat completions takes them)."""
    if raw is None:
        return [], []
    errors.require(isinstance(raw, list), "tools", "must be a list")
    echo, chat = [], []
    for i, tool in enumerate(raw):
        errors.require(isinstance(tool, dict) and tool.get("type") == "function", f"tools[{i}].type",
                       "only function tools are supported")
        strict = tool.get("strict")
        # Function tools of the Responses API are strict unless they say otherwise.
        strict = True if strict is None else strict
        function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        function["strict"] = strict
        chat.append({"type": "function", "function": function})
        echo.append({"type": "function", "name": tool.get("name"), "description": tool.get("description"),
                     "parameters": tool.get("parameters"), "strict": strict})
    return echo, chat


def _tool_choice(raw: Any) -> Any:
    if isinstance(raw, dict):
        errors.require(raw.get("type") == "function", "tool_choice.type", "only a function can be named")
        return {"type": "function", "function": {"name": raw.get("name")}}
    return raw


def _text_format(raw: Any) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(text.format as echoed, the chat response_format or None)."""
    if raw is None:
        return {"type": "text"}, None
    errors.require(isinstance(raw, dict), "text", "must be an object")
    fmt = raw.get("format")
    if fmt is None:
        return {"type": "text"}, None
    errors.require(isinstance(fmt, dict), "text.format", "must be an object")
    kind = fmt.get("type")
    if kind == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "description", "strict") if fmt.get(k) is not None}
        return dict(fmt), {"type": "json_schema", "json_schema": spec}
    return dict(fmt), {"type": kind}


def _metadata(raw: Any) -> dict[str, str]:
    if raw is None:
        return {}
    errors.require(isinstance(raw, dict) and len(raw) <= MAX_METADATA_KEYS, "metadata",
                   f"must be an object of at most {MAX_METADATA_KEYS} keys")
    for key, value in raw.items():
        errors.require(isinstance(key, str) and 0 < len(key) <= 64 and isinstance(value, str) and len(value) <= 512,
                       f"metadata.{str(key)[:64]}", "keys must be 1-64 characters and values strings of at most 512")
    return dict(raw)


def _flag(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    errors.require(isinstance(value, bool), name, "must be a boolean")
    return value


def plan_response(body: Any) -> ResponsePlan:
    errors.require(isinstance(body, dict), "body", "expected a JSON object")
    check_fields(body, "responses")
    raw_input = body.get("input")
    if isinstance(raw_input, str):
        errors.require(raw_input != "", "input", "must be a non-empty string or list of items")
        raw_input = [{"type": "message", "role": "user", "content": raw_input}]
    errors.require(isinstance(raw_input, list) and len(raw_input) > 0, "input",
                   "must be a non-empty string or list of items")
    items = tuple(_input_item(item, f"input[{i}]") for i, item in enumerate(raw_input))
    instructions = body.get("instructions")
    errors.require(instructions is None or isinstance(instructions, str), "instructions", "must be a string")
    previous = body.get("previous_response_id")
    if previous is not None:
        chain_of(previous, "previous_response_id")
    store = _flag(body, "store", True)
    stream = _flag(body, "stream", False)
    background = _flag(body, "background", False)
    errors.require(not background or store, "background", "needs store: true (a background response is kept "
                                                           "in the store until it is read)")
    errors.require(body.get("stream_options") is None or stream, "stream_options", "is only allowed with stream: true")
    max_output = body.get("max_output_tokens")
    errors.require(max_output is None or (isinstance(max_output, int) and not isinstance(max_output, bool)
                                          and 1 <= max_output <= MAX_MAX_TOKENS),
                   "max_output_tokens", f"must be an integer between 1 and {MAX_MAX_TOKENS}")
    tools_echo, chat_tools = _tools(body.get("tools"))
    text_echo, response_format = _text_format(body.get("text"))
    chat_body: dict[str, Any] = {k: body[k] for k in ("model", "temperature", "top_p") if body.get(k) is not None}
    if max_output is not None:
        chat_body["max_completion_tokens"] = max_output
    if chat_tools:
        chat_body["tools"] = chat_tools
    if body.get("tool_choice") is not None:
        chat_body["tool_choice"] = _tool_choice(body["tool_choice"])
    if response_format is not None:
        chat_body["response_format"] = response_format
    if instructions:
        chat_body["instructions"] = instructions
    # Checked now against the request's own items, so a bad field is refused before anything is stored.
    planned = _chat_plan(chat_body, [], items, {})
    echo = {"instructions": instructions, "max_output_tokens": max_output, "metadata": _metadata(body.get("metadata")),
            "model": planned.model or "default", "parallel_tool_calls": _flag(body, "parallel_tool_calls", True),
            "previous_response_id": previous, "store": store, "background": background,
            "temperature": planned.params.temperature, "top_p": body.get("top_p", 1.0),
            "tool_choice": body.get("tool_choice", "auto"), "tools": tools_echo, "text": {"format": text_echo},
            "truncation": "disabled", "user": None}
    return ResponsePlan(items, chat_body, echo, previous, store, stream, background)


def _chat_message(item: dict[str, Any], call_names: dict[str, str]) -> dict[str, Any]:
    kind = item["type"]
    if kind == "message":
        return {"role": item["role"], "content": "".join(part["text"] for part in item["content"])}
    if kind == "function_call":
        return {"role": "assistant", "content": None,
                "tool_calls": [{"id": item["call_id"], "type": "function",
                                "function": {"name": item["name"], "arguments": item["arguments"]}}]}
    return {"role": "tool", "content": item["output"], "tool_call_id": item["call_id"],
            "name": call_names.get(item["call_id"]) or None}


def _chat_plan(chat_body: dict[str, Any], history: list[StoredItem], items: tuple[dict[str, Any], ...],
               call_names: dict[str, str]) -> CompletionPlan:
    """The generation of a turn: history (the model's own outputs as it said them) then the new items."""
    body = {k: v for k, v in chat_body.items() if k != "instructions"}
    messages: list[dict[str, Any]] = []
    if chat_body.get("instructions"):
        messages.append({"role": "system", "content": chat_body["instructions"]})
    for stored in history:
        if stored.is_input:
            messages.append(_chat_message(stored.item, call_names))
        else:
            messages.append({"role": "assistant", "content": stored.raw})
    messages.extend(_chat_message(item, call_names) for item in items)
    body["messages"] = messages
    try:
        return plan_chat(body)
    except errors.DomainError as exc:
        raise _renamed(exc) from None


def _call_names(history: list[StoredItem], items: tuple[dict[str, Any], ...]) -> dict[str, str]:
    calls = [s.item for s in history] + list(items)
    return {c["call_id"]: c["name"] for c in calls if c.get("type") == "function_call"}


def _store_item(item: dict[str, Any], response_id: str, *, is_input: bool, raw: str = "") -> StoredItem:
    kind = item["type"]
    if kind == "message":
        role, content = _STORE_ROLE[item["role"]], "".join(p["text"] for p in item["content"])
    elif kind == "function_call":
        role, content = "assistant", item["arguments"]
    else:
        role, content = "tool", item["output"]
    return StoredItem(role, content, response_id, item, is_input, raw or content)


def _usage(last: GenerationChunk | None) -> dict[str, Any]:
    prompt = last.prompt_tokens if last else 0
    output = last.generated_tokens if last else 0
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": last.cached_tokens if last else 0},
            "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt + output}


@dataclass
class _Turn:
    """One response while it runs: its state, and the stream events it has produced."""
    response_id: str
    plan: ResponsePlan
    completion: CompletionPlan
    chain: str
    created_at: int
    status: str = "in_progress"
    output: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    incomplete: dict[str, Any] | None = None
    model: str = ""
    raw: str = ""
    sequence: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {"id": self.response_id, "object": "response", "created_at": self.created_at, "status": self.status,
                "error": self.error, "incomplete_details": self.incomplete, "output": list(self.output),
                "usage": self.usage, **self.plan.echo, "model": self.model or self.plan.echo["model"]}

    def event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event


class OpenAIResponses:
    """Create, retrieve, cancel and delete responses, and list their input items."""

    def __init__(self, generator: TextGenerator, log_for: Callable[[], ResponseLog],
                 require_model: Callable[[str], Any] | None = None) -> None:
        self.generator = generator
        # The store client is made per call site: its calls forward the caller's principal.
        self.log_for = log_for
        self.require_model = require_model
        self._background: set[asyncio.Task[None]] = set()

    # -- create ------------------------------------------------------------------

    async def create(self, plan: ResponsePlan, *, tenant_id: str = "",
                     metadata: tuple[tuple[str, str], ...] = ()) -> AsyncGenerator[dict[str, Any], None]:
        """The response's stream events (``response.created`` first, an end event last).

        Without ``stream`` the caller keeps only the last event's response. A
        background response runs on in its own task: closing this generator
        does not stop it.
        """
        if self.require_model is not None:
            await self.require_model(plan.chat_body.get("model", ""))
        store = self.log_for()
        turn, lock_owner = await self._begin(store, plan)
        params = replace(turn.completion.params, request_id=turn.response_id, tenant_id=tenant_id,
                         metadata=metadata, session_id=turn.chain if plan.store else "")
        queue: asyncio.Queue[dict[str, Any] | errors.DomainError | None] = asyncio.Queue()
        runner = _Runner(self, store, turn, params, lock_owner, queue)
        if plan.background:
            task = asyncio.create_task(runner.run(), name=f"response {turn.response_id}")
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        else:
            task = asyncio.create_task(runner.run())
        try:
            while True:
                event = await queue.get()
                if event is None:
                    break
                if isinstance(event, errors.DomainError):
                    # A response that could not be generated: the stream has said so; a plain call raises it.
                    if not plan.stream:
                        raise event
                    break
                yield event
        finally:
            if not plan.background and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _begin(self, store: ResponseLog, plan: ResponsePlan) -> tuple[_Turn, str]:
        """Pick the chain (continue, fork or new), take its lock, and plan the generation."""
        history: list[StoredItem] = []
        chain = _new_chain()
        owner = "resp-" + secrets.token_hex(8)
        continuing = False
        if plan.previous_response_id is not None:
            previous_chain = chain_of(plan.previous_response_id, "previous_response_id")
            await self._snapshot(store, previous_chain, plan.previous_response_id, "previous_response_id")
            items = await store.list_items(previous_chain)
            last = max((i for i, s in enumerate(items) if s.response_id == plan.previous_response_id), default=-1)
            history = items[:last + 1]
            if plan.store and last == len(items) - 1 and \
                    (await store.lock(previous_chain, owner, LOCK_LEASE_MS)).acquired:
                # Still the tip now that no one else may write? (Another follow-up may have come and gone.)
                continuing = len(await store.list_items(previous_chain)) == len(items)
                if continuing:
                    chain = previous_chain
                else:
                    await store.unlock(previous_chain, owner)
        if plan.store and not continuing:
            await store.create_chain(chain)
            if not (await store.lock(chain, owner, LOCK_LEASE_MS)).acquired:
                raise errors.Aborted("a new response chain was taken by another writer", reason="CHAIN_BUSY")
            # A fork: the new chain starts with a copy of the history it continues.
            await store.append_items(chain, history)
        completion = _chat_plan(plan.chat_body, history, plan.input_items, _call_names(history, plan.input_items))
        turn = _Turn(_new_id(chain), plan, completion, chain, int(time.time()),
                     status="queued" if plan.background else "in_progress")
        return turn, owner if plan.store else ""

    # -- read --------------------------------------------------------------------

    @staticmethod
    async def _snapshot(store: ResponseLog, chain: str, response_id: str, field_name: str) -> dict[str, Any]:
        latest: dict[str, Any] | None = None
        try:
            events = await store.read_events(chain)
        except errors.NotFound:
            events = []
        for event in events:
            if event.payload.get("response_id") != response_id:
                continue
            if event.kind == "response":
                latest = event.payload["response"]
            elif event.kind == "response.deleted":
                latest = None
                break
        if latest is None:
            raise errors.NotFound(f"{field_name}: no response {response_id!r}", field=field_name,
                                  reason="RESPONSE_NOT_FOUND")
        return latest

    async def retrieve(self, response_id: str) -> dict[str, Any]:
        chain = chain_of(response_id, "response_id")
        return await self._current(self.log_for(), chain, response_id)

    async def _current(self, store: ResponseLog, chain: str, response_id: str) -> dict[str, Any]:
        """The response as stored; one left unfinished by a runner that is gone is recorded failed first.

        A runner holds its chain's lock and renews it while it runs: a lock anyone may take means the
        replica that ran the response stopped (its lease ran out), and nothing will ever finish it.
        """
        snapshot = await self._snapshot(store, chain, response_id, "response_id")
        if snapshot["status"] in TERMINAL:
            return snapshot
        probe = "reaper-" + secrets.token_hex(6)
        if not (await store.lock(chain, probe, REAP_LEASE_MS)).acquired:
            return snapshot
        try:
            # Read again under the lock: the runner may have finished just before its lease ran out.
            snapshot = await self._snapshot(store, chain, response_id, "response_id")
            if snapshot["status"] in TERMINAL:
                return snapshot
            failed = {**snapshot, "status": "failed",
                      "error": {"code": "server_error", "message": "the gateway replica that ran this response "
                                                                  "stopped before it ended"}}
            ended: list[tuple[str, dict[str, Any]]] = [("response", {"response_id": response_id,
                                                                     "response": failed})]
            if snapshot.get("background"):
                numbers = [e.payload["event"]["sequence_number"] for e in await store.read_events(chain)
                           if e.kind == "response.stream" and e.payload.get("response_id") == response_id]
                end = {"type": "response.failed", "sequence_number": max(numbers, default=-1) + 1,
                       "response": failed}
                ended.insert(0, ("response.stream", {"response_id": response_id, "event": end}))
            await store.append_events(chain, ended)
            return failed
        finally:
            await store.unlock(chain, probe)

    async def replay(self, response_id: str, starting_after: int | None) -> AsyncGenerator[dict[str, Any], None]:
        """A background response's stream events after ``starting_after``, then the rest as they come."""
        store = self.log_for()
        chain = chain_of(response_id, "response_id")
        snapshot = await self._current(store, chain, response_id)
        errors.require(bool(snapshot.get("background")), "stream",
                       "only background responses keep their stream events; retrieve this one without stream")
        after = -1 if starting_after is None else starting_after
        # The stored events, then new ones as the runner (on whichever replica) writes them.
        async for event in store.watch_events(chain, 0):
            if event.kind == "response.stream" and event.payload.get("response_id") == response_id:
                streamed = event.payload["event"]
                if streamed["sequence_number"] > after:
                    after = streamed["sequence_number"]
                    yield streamed
                if streamed["type"] in END_EVENTS:
                    return

    async def input_items(self, response_id: str, *, limit: int = DEFAULT_INPUT_ITEMS, order: str = "desc",
                          after: str | None = None) -> dict[str, Any]:
        errors.require(1 <= limit <= MAX_INPUT_ITEMS, "limit", f"must be between 1 and {MAX_INPUT_ITEMS}")
        errors.require(order in ("asc", "desc"), "order", "must be 'asc' or 'desc'")
        store = self.log_for()
        chain = chain_of(response_id, "response_id")
        await self._snapshot(store, chain, response_id, "response_id")
        items = [s.item for s in await store.list_items(chain) if s.is_input and s.response_id == response_id]
        if order == "desc":
            items.reverse()
        if after is not None:
            index = next((i for i, item in enumerate(items) if item.get("id") == after), None)
            if index is None:
                raise errors.InvalidArgument(f"after: {after[:64]!r} is not an input item of this response",
                                             field="after")
            items = items[index + 1:]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}

    # -- change ------------------------------------------------------------------

    async def cancel(self, response_id: str) -> dict[str, Any]:
        store = self.log_for()
        chain = chain_of(response_id, "response_id")
        snapshot = await self._current(store, chain, response_id)
        errors.require(bool(snapshot.get("background")), "response_id", "only background responses can be cancelled")
        if snapshot["status"] in TERMINAL:
            return snapshot
        seqs = await store.append_events(chain, [("response.cancel", {"response_id": response_id})])
        snapshot = await self._snapshot(store, chain, response_id, "response_id")
        if snapshot["status"] in TERMINAL:
            return snapshot
        # The runner (on whichever replica) sees the request among the chain's events and ends the response.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CANCEL_WAIT_S):
                async for event in store.watch_events(chain, seqs[0]):
                    if event.kind == "response" and event.payload.get("response_id") == response_id \
                            and event.payload["response"]["status"] in TERMINAL:
                        return dict(event.payload["response"])
        return await self._snapshot(store, chain, response_id, "response_id")

    async def delete(self, response_id: str) -> dict[str, Any]:
        store = self.log_for()
        chain = chain_of(response_id, "response_id")
        await self._snapshot(store, chain, response_id, "response_id")
        await store.append_events(chain, [("response.deleted", {"response_id": response_id})])
        return {"id": response_id, "object": "response", "deleted": True}

    async def close(self) -> None:
        """Stop background responses (at shutdown): each ends as failed, saying why."""
        tasks = list(self._background)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task


class _Runner:
    """Decodes one response, turning chunks into stream events; records it in the store as it goes."""

    def __init__(self, owner: OpenAIResponses, store: ResponseLog, turn: _Turn, params: Any, lock_owner: str,
                 queue: asyncio.Queue[dict[str, Any] | errors.DomainError | None]) -> None:
        self.owner = owner
        self.store = store
        self.turn = turn
        self.params = params
        self.lock_owner = lock_owner
        self.queue = queue
        self.failure: errors.DomainError | None = None
        self._generation: asyncio.Task[None] | None = None
        self.plan = turn.plan
        self._pending: list[tuple[str, dict[str, Any]]] = []
        self._flush_lock = asyncio.Lock()

    def _emit(self, kind: str, **fields: Any) -> None:
        event = self.turn.event(kind, **fields)
        self.queue.put_nowait(event)
        if self.plan.background:
            self._pending.append(("response.stream", {"response_id": self.turn.response_id, "event": event}))

    async def _flush(self) -> None:
        # One append at a time, in order: a batch taken from the buffer is always written.
        async with self._flush_lock:
            pending, self._pending = self._pending, []
            await self.store.append_events(self.turn.chain, pending)

    async def _snapshot(self) -> int:
        seqs = await self.store.append_events(self.turn.chain, [("response", {"response_id": self.turn.response_id,
                                                                              "response": self.turn.snapshot()})])
        return seqs[0]

    async def run(self) -> None:
        turn = self.turn
        watchers: list[asyncio.Task[Any]] = []
        try:
            first_seq = 0
            if self.plan.store:
                await self.store.append_items(turn.chain, [_store_item(i, turn.response_id, is_input=True)
                                                           for i in self.plan.input_items])
                first_seq = await self._snapshot()
            self._emit("response.created", response=turn.snapshot())
            if self.plan.background:
                turn.status = "in_progress"
                await self._snapshot()
            self._emit("response.in_progress", response=turn.snapshot())
            self._generation = asyncio.create_task(self._generate())
            if self.plan.background:
                await self._flush()
                # A cancel is posted after the first snapshot (it must find the response): watch from there.
                watchers.append(asyncio.create_task(self._watch_cancel(first_seq)))
                watchers.append(asyncio.create_task(self._flush_loop()))
            if self.lock_owner:
                watchers.append(asyncio.create_task(self._renew_lock()))
            await self._generation
            turn.status = "incomplete" if turn.incomplete else "completed"
        except asyncio.CancelledError:
            if turn.status == "cancelling":
                turn.status = "cancelled"
            elif self.plan.background:
                turn.status = "failed"
                turn.error = {"code": "server_error", "message": "the gateway stopped while the response ran"}
            else:
                # The client went away from a plain response: nobody waits for the rest.
                turn.status = "cancelled"
        except errors.DomainError as exc:
            self.failure = exc
            turn.status = "failed"
            turn.error = {"code": "server_error", "message": exc.message}
        except Exception:
            log.exception("response %s failed", turn.response_id)
            turn.status = "failed"
            turn.error = {"code": "server_error", "message": "internal error"}
        finally:
            if self._generation is not None and not self._generation.done():
                self._generation.cancel()
            for watcher in watchers:
                watcher.cancel()
            await asyncio.shield(self._finish())

    async def _finish(self) -> None:
        turn = self.turn
        end = {"completed": "response.completed", "incomplete": "response.incomplete",
               "cancelled": "response.cancelled"}.get(turn.status, "response.failed")
        try:
            if self.plan.store:
                outputs = [_store_item(item, turn.response_id, is_input=False, raw=turn.raw if i == 0 else "")
                           for i, item in enumerate(turn.output)]
                await self.store.append_items(turn.chain, outputs)
            self._emit(end, response=turn.snapshot())
            if self.plan.store:
                if self.plan.background:
                    await self._flush()
                await self._snapshot()
        except errors.DomainError as exc:
            log.warning("response %s: could not record its end: %s", turn.response_id, exc.message)
        finally:
            self.queue.put_nowait(self.failure)
            if self.lock_owner:
                with contextlib.suppress(errors.DomainError):
                    await self.store.unlock(turn.chain, self.lock_owner)

    async def _renew_lock(self) -> None:
        while True:
            await asyncio.sleep(LOCK_LEASE_MS / 3000)
            try:
                renewed = (await self.store.lock(self.turn.chain, self.lock_owner, LOCK_LEASE_MS)).acquired
            except errors.DomainError as exc:
                log.warning("response %s: could not renew its chain's lock: %s", self.turn.response_id, exc.message)
                continue
            if not renewed:
                # The lease ran out and another writer took the chain: this response's writes would be refused.
                log.warning("response %s lost its chain's lock", self.turn.response_id)
                return

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_S)
            if self._pending:
                # Shielded: stopping the loop never drops a batch it has taken from the buffer.
                await asyncio.shield(self._flush())

    async def _watch_cancel(self, after_seq: int) -> None:
        async for event in self.store.watch_events(self.turn.chain, after_seq):
            if event.kind == "response.cancel" and event.payload.get("response_id") == self.turn.response_id:
                self.turn.status = "cancelling"
                if self._generation is not None:
                    self._generation.cancel()
                return

    async def _generate(self) -> None:
        turn, completion = self.turn, self.turn.completion
        tool_mode = completion.tool_mode != "none"
        texts: list[str] = []
        item: dict[str, Any] | None = None
        last: GenerationChunk | None = None
        try:
            async for chunk in self.owner.generator.generate(self.params):
                last = chunk
                texts.append(chunk.text)
                so_far = "".join(texts)
                # Output that may be a tool call is held back until it is known not to be one.
                if tool_mode and (not so_far.strip() or so_far.lstrip().startswith("{")):
                    continue
                if item is None:
                    item = self._open_message()
                    delta = so_far
                else:
                    delta = chunk.text
                if delta:
                    item["content"][0]["text"] += delta
                    self._emit("response.output_text.delta", item_id=item["id"], output_index=0, content_index=0,
                               delta=delta, logprobs=[])
        finally:
            turn.raw = "".join(texts)
            turn.model = last.model if last is not None and last.model else ""
            turn.usage = _usage(last)
            if last is not None and last.finish_reason == "length":
                turn.incomplete = {"reason": "max_output_tokens"}
            self._close_output(item, list(completion.tools) if tool_mode else [])

    def _open_message(self) -> dict[str, Any]:
        item = {"type": "message", "id": _item_id("msg"), "role": "assistant", "status": "in_progress",
                "content": [{"type": "output_text", "text": "", "annotations": []}]}
        self.turn.output.append(item)
        self._emit("response.output_item.added", output_index=0,
                   item={**item, "content": []})
        self._emit("response.content_part.added", item_id=item["id"], output_index=0, content_index=0,
                   part={"type": "output_text", "text": "", "annotations": []})
        return item

    def _close_output(self, item: dict[str, Any] | None, tools: list[Any]) -> None:
        turn = self.turn
        status = "incomplete" if turn.incomplete else "completed"
        if item is None:
            call = parse_tool_call(turn.raw, tools) if tools else None
            if call is not None:
                name, arguments = call
                fc = {"type": "function_call", "id": _item_id("fc"), "call_id": "call_" + secrets.token_hex(12),
                      "name": name, "arguments": "", "status": "in_progress"}
                turn.output.append(fc)
                self._emit("response.output_item.added", output_index=0, item=dict(fc))
                self._emit("response.function_call_arguments.delta", item_id=fc["id"], output_index=0,
                           delta=arguments)
                fc["arguments"] = arguments
                self._emit("response.function_call_arguments.done", item_id=fc["id"], output_index=0,
                           name=name, arguments=arguments)
                fc["status"] = "completed"
                self._emit("response.output_item.done", output_index=0, item=dict(fc))
                return
            if not turn.raw:
                return
            item = self._open_message()
            item["content"][0]["text"] = turn.raw
            self._emit("response.output_text.delta", item_id=item["id"], output_index=0, content_index=0,
                       delta=turn.raw, logprobs=[])
        part = item["content"][0]
        self._emit("response.output_text.done", item_id=item["id"], output_index=0, content_index=0,
                   text=part["text"], logprobs=[])
        self._emit("response.content_part.done", item_id=item["id"], output_index=0, content_index=0, part=dict(part))
        item["status"] = status
        self._emit("response.output_item.done", output_index=0, item={**item, "content": [dict(part)]})
