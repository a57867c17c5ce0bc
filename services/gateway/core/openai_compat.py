"""OpenAI-compatible chat and text completions over a TextGenerator.

Requests are validated here (bad input names the field), turned into one
generation, and answered in OpenAI's JSON shapes: whole responses, or chunk
dicts for streaming (the HTTP layer frames them as ``data:`` lines).
"""
from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field, replace
from typing import Any

from services.common import errors
from services.gateway.core.best_of import rank_best
from services.gateway.core.chat_format import (
    ANSWER_MAX_ARRAY_ITEMS,
    ANSWER_MAX_STRING_CHARS,
    ChatMessage,
    ToolSpec,
    parse_messages,
    parse_tool_call,
    parse_tools,
    render_prompt,
    tool_call_grammar,
)
from services.gateway.core.model_catalog import ModelCatalog
from services.gateway.core.openai_fields import check_fields
from services.gateway.core.ports import GenerationChunk, GenerationParams, TextGenerator, TokenLogprob
from services.gemma.chat_format import END_OF_TURN as END
from services.inference.client.grammar import check_schema, schema_grammar

DEFAULT_MAX_TOKENS = 256
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
# Choices (and best_of candidates) per request: each decodes in a sequence of its own on the node, after one
# shared prefill.
MAX_CHOICES = 8
MAX_MAX_TOKENS = 8192
_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop", None: "stop"}
# response_format json_object: any JSON object.
ANY_OBJECT: dict[str, Any] = {"type": "object"}
_SCHEMA_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass(frozen=True)
class CompletionPlan:
    params: GenerationParams
    model: str
    stream: bool
    include_usage: bool
    tools: tuple[ToolSpec, ...] = ()
    # "none", "auto" or "required" (a named tool is narrowed into ``tools``).
    tool_mode: str = "none"
    # Completions: candidates decoded; above params.n, the params.n likeliest come back (best_of).
    best_of: int = 1


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    errors.require(isinstance(value, (int, float)) and not isinstance(value, bool), name, "must be a number")
    errors.require(low <= value <= high, name, f"must be between {low} and {high}")
    return float(value)


def _common_params(body: Any, *, stop_default: tuple[str, ...] = ()) -> tuple[GenerationParams, str, bool, bool]:
    errors.require(isinstance(body, dict), "body", "expected a JSON object")
    model = body.get("model", "")
    errors.require(isinstance(model, str), "model", "must be a string")
    n = body.get("n")
    n = 1 if n is None else n
    errors.require(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_CHOICES, "n",
                   f"must be an integer between 1 and {MAX_CHOICES}")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is None:
        max_tokens = DEFAULT_MAX_TOKENS
    errors.require(isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
                   and 1 <= max_tokens <= MAX_MAX_TOKENS,
                   "max_tokens", f"must be an integer between 1 and {MAX_MAX_TOKENS}")
    stop = body.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    errors.require(isinstance(stop, (list, tuple)) and len(stop) <= 4 and all(isinstance(s, str) and s for s in stop),
                   "stop", "must be a string or a list of up to 4 non-empty strings")
    seed = body.get("seed")
    errors.require(seed is None or (isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**32),
                   "seed", "must be an integer in [0, 2^32)")
    stream = body.get("stream")
    stream = False if stream is None else stream
    errors.require(isinstance(stream, bool), "stream", "must be a boolean")
    options = body.get("stream_options")
    errors.require(options is None or stream, "stream_options", "is only allowed with stream: true")
    options = options or {}
    errors.require(isinstance(options, dict), "stream_options", "must be an object")
    params = GenerationParams(
        prompt="", model=model, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0), top_p=_number(body, "top_p", 0.0, 0.0, 1.0),
        stop=tuple(stop) + stop_default, seed=seed, n=n)
    return params, model, stream, bool(options.get("include_usage", False))


def answer_schema(body: dict) -> dict[str, Any] | None:
    """The JSON schema ``response_format`` asks the answer to have; None for plain text."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    errors.require(isinstance(fmt, dict), "response_format", "must be an object")
    kind = fmt.get("type")
    errors.require(kind in ("text", "json_object", "json_schema"), "response_format.type",
                   "must be 'text', 'json_object' or 'json_schema'")
    if kind == "text":
        return None
    if kind == "json_object":
        return ANY_OBJECT
    spec = fmt.get("json_schema")
    errors.require(isinstance(spec, dict), "response_format.json_schema", "must be an object")
    name = spec.get("name")
    errors.require(isinstance(name, str) and 0 < len(name) <= 64 and set(name) <= _SCHEMA_NAME_CHARS,
                   "response_format.json_schema.name", "must be 1-64 letters, digits, '_' or '-'")
    strict = spec.get("strict")
    errors.require(strict is None or isinstance(strict, bool), "response_format.json_schema.strict",
                   "must be a boolean")
    schema = spec.get("schema", ANY_OBJECT)
    errors.require(isinstance(schema, dict), "response_format.json_schema.schema", "must be a JSON schema object")
    # Strict or not, the answer is decoded under the schema: a keyword it cannot enforce is refused.
    check_schema(schema, "response_format.json_schema.schema")
    return schema


def _answer_instruction(body: dict, schema: dict[str, Any]) -> str:
    spec = (body.get("response_format") or {}).get("json_schema") or {}
    description = spec.get("description")
    errors.require(description is None or isinstance(description, str), "response_format.json_schema.description",
                   "must be a string")
    return (f"{description}\n" if description else "") + \
        "Answer with only a JSON value that matches this JSON schema: " + json.dumps(schema, separators=(",", ":"))


def plan_chat(body: Any) -> CompletionPlan:
    check_fields(body, "chat")
    params, model, stream, include_usage = _common_params(body, stop_default=(END,))
    messages = parse_messages(body.get("messages"))
    answer = answer_schema(body)
    if answer is not None:
        messages = [ChatMessage("system", _answer_instruction(body, answer)), *messages]
    params = replace(params, **_chat_logprobs(body))
    tools = parse_tools(body.get("tools"))
    choice = body.get("tool_choice", "auto" if tools else "none")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        chosen = [t for t in tools if t.name == name]
        errors.require(bool(chosen), "tool_choice.function.name", f"{name!r} is not one of the given tools")
        tools, mode = chosen, "required"
    else:
        errors.require(choice in ("none", "auto", "required"), "tool_choice",
                       "must be 'none', 'auto', 'required' or {'type': 'function', ...}")
        errors.require(choice == "none" or bool(tools), "tool_choice", "needs tools")
        mode = choice
    prompt = render_prompt(messages, tools if mode != "none" else [])
    return CompletionPlan(replace(params, prompt=prompt, grammar=_chat_grammar(tools, mode, answer, body)), model,
                          stream, include_usage, tuple(tools), mode)


def _chat_logprobs(body: dict) -> dict[str, Any]:
    wanted = body.get("logprobs")
    errors.require(wanted is None or isinstance(wanted, bool), "logprobs", "must be a boolean")
    top = body.get("top_logprobs")
    errors.require(top is None or (isinstance(top, int) and not isinstance(top, bool)
                                   and 0 <= top <= MAX_TOP_LOGPROBS),
                   "top_logprobs", f"must be an integer between 0 and {MAX_TOP_LOGPROBS}")
    errors.require(top is None or wanted is True, "top_logprobs", "needs logprobs: true")
    return {"logprobs": bool(wanted), "top_logprobs": top or 0}


def _completion_logprobs(body: dict) -> dict[str, Any]:
    top = body.get("logprobs")
    errors.require(top is None or (isinstance(top, int) and not isinstance(top, bool)
                                   and 0 <= top <= MAX_COMPLETION_LOGPROBS),
                   "logprobs", f"must be an integer between 0 and {MAX_COMPLETION_LOGPROBS}")
    return {"logprobs": top is not None, "top_logprobs": top or 0}


def _best_of(body: dict, n: int, stream: bool) -> int:
    """How many candidates decode for the ``n`` choices returned (OpenAI's default: n)."""
    best_of = body.get("best_of")
    if best_of is None:
        return n
    errors.require(isinstance(best_of, int) and not isinstance(best_of, bool) and 1 <= best_of <= MAX_CHOICES,
                   "best_of", f"must be an integer between 1 and {MAX_CHOICES}")
    errors.require(best_of >= n, "best_of", f"must be at least n ({n})")
    errors.require(best_of == 1 or not stream, "best_of",
                   "must be 1 with stream: true (candidates are ranked once they are all done)")
    return best_of


def _token_text(piece: bytes) -> str:
    # A token may hold part of a UTF-8 character: its exact bytes travel beside the text.
    return piece.decode("utf-8", errors="replace")


def chat_logprobs(tokens: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs`` object for ``tokens``."""
    return {"content": [{"token": _token_text(t.piece), "logprob": t.logprob, "bytes": list(t.piece),
                         "top_logprobs": [{"token": _token_text(p), "logprob": lp, "bytes": list(p)}
                                          for p, lp in t.top]} for t in tokens],
            "refusal": None}


def completion_logprobs(tokens: list[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """OpenAI's legacy completions ``logprobs`` object for ``tokens``, text offsets from ``offset``."""
    texts = [_token_text(t.piece) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{_token_text(p): lp for p, lp in t.top} for t in tokens], "text_offset": offsets}


def _chat_grammar(tools: list[ToolSpec], mode: str, answer: dict[str, Any] | None, body: dict) -> str:
    """Forced calls, strict tools and response_format decode under a grammar; the rest freely."""
    if mode == "required":
        return tool_call_grammar(tools)
    strict = any(isinstance(t, dict) and (t.get("function") or {}).get("strict") is True
                 for t in body.get("tools") or ())
    if mode == "auto" and (strict or answer is not None):
        return tool_call_grammar(tools, answer=answer, free_answer=answer is None)
    if answer is not None:
        return schema_grammar(answer, max_string_chars=ANSWER_MAX_STRING_CHARS, max_items=ANSWER_MAX_ARRAY_ITEMS)
    return ""


def plan_completion(body: Any) -> CompletionPlan:
    check_fields(body, "completion")
    params, model, stream, include_usage = _common_params(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    errors.require(isinstance(prompt, str) and prompt != "", "prompt", "must be a non-empty string")
    answer = answer_schema(body)
    grammar = "" if answer is None else schema_grammar(answer, max_string_chars=ANSWER_MAX_STRING_CHARS,
                                                        max_items=ANSWER_MAX_ARRAY_ITEMS)
    return CompletionPlan(replace(params, prompt=prompt, grammar=grammar, **_completion_logprobs(body)), model,
                          stream, include_usage, best_of=_best_of(body, params.n, stream))


def answered_model(plan: CompletionPlan, last: GenerationChunk | None) -> str:
    """The model that served the answer when the node said so (routing may pick another), else the asked one."""
    return (last.model if last is not None and last.model else "") or plan.model or "default"


def _usage(lasts: list[GenerationChunk | None]) -> dict[str, Any]:
    """One prompt (prefilled once, whatever n is), the generated tokens of every choice."""
    first = lasts[0] if lasts else None
    prompt = first.prompt_tokens if first else 0
    generated = sum(last.generated_tokens for last in lasts if last)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": first.cached_tokens if first else 0}}


def _tool_call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": "call_" + secrets.token_hex(12), "type": "function",
            "function": {"name": name, "arguments": arguments}}


@dataclass
class _Choice:
    """One choice of an answer as it arrives."""
    texts: list[str] = field(default_factory=list)
    tokens: list[TokenLogprob] = field(default_factory=list)
    last: GenerationChunk | None = None
    # Streaming: output that may be a tool call is held back until it is known not to be one.
    held: list[str] = field(default_factory=list)
    holding: bool = False
    offset: int = 0

    @property
    def finish(self) -> str:
        return _FINISH.get(self.last.finish_reason if self.last else None, "stop")


class OpenAICompat:
    def __init__(self, generator: TextGenerator, catalog: ModelCatalog | None = None) -> None:
        self.generator = generator
        self.catalog = catalog or ModelCatalog(generator)

    async def _run(self, plan: CompletionPlan, request_id: str) -> list[_Choice]:
        """Every choice the node decoded: with best_of, all the candidates (with logprobs, to rank them by)."""
        await self.catalog.require(plan.model)
        ranked = plan.best_of > plan.params.n
        params = replace(plan.params, n=plan.best_of, logprobs=True) if ranked else plan.params
        choices = [_Choice() for _ in range(params.n)]
        try:
            async for chunk in self.generator.generate(replace(params, request_id=request_id)):
                choice = choices[chunk.index]
                choice.texts.append(chunk.text)
                choice.tokens.extend(chunk.tokens)
                choice.last = chunk
        except errors.InvalidArgument as exc:
            # The node's n was the client's best_of (a node caps it at its own sequences).
            if ranked and exc.field == "n":
                raise errors.InvalidArgument("best_of: " + exc.message.removeprefix("n: "), reason=exc.reason,
                                             field="best_of", metadata={**exc.metadata, "field": "best_of"},
                                             retry_after_ms=exc.retry_after_ms) from None
            raise
        return choices

    @staticmethod
    def _model(plan: CompletionPlan, choices: list[_Choice]) -> str:
        return answered_model(plan, next((c.last for c in choices if c.last and c.last.model), None))

    async def chat(self, plan: CompletionPlan) -> dict[str, Any]:
        response_id = "chatcmpl-" + secrets.token_hex(12)
        choices = await self._run(plan, response_id)
        answers = []
        for index, choice in enumerate(choices):
            text = "".join(choice.texts)
            message: dict[str, Any] = {"role": "assistant", "content": text}
            finish = choice.finish
            call = parse_tool_call(text, list(plan.tools)) if plan.tool_mode != "none" else None
            if call is not None:
                message = {"role": "assistant", "content": None, "tool_calls": [_tool_call(*call)]}
                finish = "tool_calls"
            answers.append({"index": index, "message": message, "finish_reason": finish,
                            "logprobs": chat_logprobs(choice.tokens) if plan.params.logprobs else None})
        return {"id": response_id, "object": "chat.completion", "created": int(time.time()),
                "model": self._model(plan, choices), "system_fingerprint": None, "choices": answers,
                "usage": _usage([c.last for c in choices])}

    async def chat_stream(self, plan: CompletionPlan) -> AsyncGenerator[dict[str, Any], None]:
        response_id = "chatcmpl-" + secrets.token_hex(12)
        created = int(time.time())
        choices = [_Choice(holding=plan.tool_mode != "none") for _ in range(plan.params.n)]

        def chunk(index: int, delta: dict[str, Any], finish: str | None = None,
                  tokens: list[TokenLogprob] | None = None) -> dict[str, Any]:
            logprobs = chat_logprobs(tokens) if plan.params.logprobs and tokens is not None else None
            return {"id": response_id, "object": "chat.completion.chunk", "created": created,
                    "model": self._model(plan, choices), "system_fingerprint": None,
                    "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]}

        await self.catalog.require(plan.model)
        for index in range(len(choices)):
            yield chunk(index, {"role": "assistant", "content": ""})
        async for piece in self.generator.generate(replace(plan.params, request_id=response_id)):
            index, choice = piece.index, choices[piece.index]
            choice.last = piece
            # Tokens whose text has not gone out yet (held back, or inside the node's stop-string check).
            choice.tokens.extend(piece.tokens)
            if choice.holding:
                choice.held.append(piece.text)
                so_far = "".join(choice.held).lstrip()
                if so_far and not so_far.startswith("{"):
                    choice.holding = False
                    yield chunk(index, {"content": "".join(choice.held)}, tokens=choice.tokens)
                    choice.held, choice.tokens = [], []
            elif piece.text:
                yield chunk(index, {"content": piece.text}, tokens=choice.tokens)
                choice.tokens = []
            if piece.finish_reason is not None:
                for last_chunk in self._end_choice(plan, index, choice, chunk):
                    yield last_chunk
        if plan.include_usage:
            yield {"id": response_id, "object": "chat.completion.chunk", "created": created,
                   "model": self._model(plan, choices), "choices": [], "usage": _usage([c.last for c in choices])}

    @staticmethod
    def _end_choice(plan: CompletionPlan, index: int, choice: _Choice, chunk: Any) -> list[dict[str, Any]]:
        finish = choice.finish
        chunks = []
        if choice.held:
            text = "".join(choice.held)
            call = parse_tool_call(text, list(plan.tools))
            if call is not None:
                chunks.append(chunk(index, {"tool_calls": [{"index": 0, **_tool_call(*call)}]}))
                finish = "tool_calls"
            else:
                chunks.append(chunk(index, {"content": text}, tokens=choice.tokens))
        elif choice.tokens:
            chunks.append(chunk(index, {"content": ""}, tokens=choice.tokens))
        chunks.append(chunk(index, {}, finish))
        return chunks

    async def completion(self, plan: CompletionPlan) -> dict[str, Any]:
        response_id = "cmpl-" + secrets.token_hex(12)
        choices = await self._run(plan, response_id)
        kept = choices
        if plan.best_of > plan.params.n:
            # The n likeliest candidates, best first; usage still counts every candidate's tokens.
            kept = [choices[i] for i in rank_best([c.tokens for c in choices], plan.params.n)]
        return {"id": response_id, "object": "text_completion", "created": int(time.time()),
                "model": self._model(plan, choices),
                "choices": [{"index": index, "text": "".join(choice.texts),
                             "finish_reason": _FINISH.get(choice.last.finish_reason if choice.last else None),
                             "logprobs": completion_logprobs(choice.tokens) if plan.params.logprobs else None}
                            for index, choice in enumerate(kept)],
                "usage": _usage([c.last for c in choices])}

    async def completion_stream(self, plan: CompletionPlan) -> AsyncGenerator[dict[str, Any], None]:
        response_id = "cmpl-" + secrets.token_hex(12)
        created = int(time.time())
        choices = [_Choice() for _ in range(plan.params.n)]
        await self.catalog.require(plan.model)
        async for piece in self.generator.generate(replace(plan.params, request_id=response_id)):
            choice = choices[piece.index]
            choice.last = piece
            choice.tokens.extend(piece.tokens)
            finish = _FINISH.get(piece.finish_reason) if piece.finish_reason else None
            if piece.text or finish:
                logprobs = completion_logprobs(choice.tokens, choice.offset) if plan.params.logprobs else None
                choice.offset += sum(len(_token_text(t.piece)) for t in choice.tokens)
                choice.tokens = []
                yield {"id": response_id, "object": "text_completion", "created": created,
                       "model": answered_model(plan, piece),
                       "choices": [{"index": piece.index, "text": piece.text, "finish_reason": finish,
                                    "logprobs": logprobs}]}
        if plan.include_usage:
            yield {"id": response_id, "object": "text_completion", "created": created,
                   "model": self._model(plan, choices), "choices": [], "usage": _usage([c.last for c in choices])}

    async def models(self) -> dict[str, Any]:
        names = await self.generator.list_models()
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "llmesh"}
                                           for name in names]}


def dumps(payload: Any) -> str:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
