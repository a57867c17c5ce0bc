"""The tool registry: specs, normalised names and argument validation."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import jsonschema
from jsonschema.exceptions import SchemaError

from services.common.errors import InvalidArgument, NotFound, require
from services.common.paging import decode_token, encode_token, page_limit
from services.tools.core import names
from services.tools.core.model import ToolSpec

ARGUMENTS_FIELD = "call.arguments_json"
MAX_REPORTED_ERRORS = 10
#: The registry is the same for every caller: its listing has one scope.
PAGE_SCOPE = "tools"


def _json_path(error: jsonschema.ValidationError) -> str:
    parts = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    return "$" + parts


class ToolRegistry:
    """Tools by normalised name; the original name is kept for the actual call."""

    def __init__(self) -> None:
        self.tools: dict[str, ToolSpec] = {}
        self.validators: dict[str, jsonschema.protocols.Validator] = {}
        # (source, original name) -> normalised name, so refreshes keep names stable.
        self.assigned: dict[tuple[str, str], str] = {}

    def add(self, spec: ToolSpec, candidate: str | None = None) -> ToolSpec:
        """Register ``spec`` under a valid unique name derived from ``candidate``."""
        original = spec.original_name or spec.name
        key = (spec.source, original)
        name = self.assigned.get(key)
        if name is None or (name in self.tools and self.tools[name].source != spec.source):
            name = names.normalize(candidate or spec.name, f"{spec.source}:{original}", set(self.tools))
        validator_cls = jsonschema.validators.validator_for(spec.parameters_schema)
        try:
            validator_cls.check_schema(spec.parameters_schema)
        except SchemaError as exc:
            raise InvalidArgument(f"tool {original!r}: invalid parameters schema: {exc.message}",
                                  field="parameters_schema") from None
        spec = dataclasses.replace(spec, name=name, original_name=original)
        self.tools[name] = spec
        self.validators[name] = validator_cls(spec.parameters_schema)
        self.assigned[key] = name
        return spec

    def replace_source(self, source: str, specs: Iterable[tuple[ToolSpec, str]]) -> list[ToolSpec]:
        """Swap every tool of ``source`` for ``specs`` (an MCP server's fresh listing)."""
        for name in [n for n, s in self.tools.items() if s.source == source]:
            del self.tools[name]
            del self.validators[name]
        return [self.add(spec, candidate) for spec, candidate in specs]

    def get(self, name: str) -> ToolSpec:
        spec = self.tools.get(name)
        if spec is None:
            raise NotFound(f"call.name: no tool named {name!r}", reason="TOOL_NOT_FOUND", field="call.name")
        return spec

    def list(self) -> list[ToolSpec]:
        return [self.tools[n] for n in sorted(self.tools)]

    def page(self, page_size: int, page_token: str) -> tuple[Sequence[ToolSpec], str]:
        """One page of the tools in name order, resuming after the name in ``page_token``."""
        limit = page_limit(page_size)
        after = decode_token(page_token, PAGE_SCOPE)
        require(after is None or isinstance(after, str), "page_token", "not a token of this listing")
        specs = [s for s in self.list() if after is None or s.name > after]
        page = specs[:limit]
        return page, encode_token(PAGE_SCOPE, page[-1].name) if len(specs) > limit else ""

    def validate(self, name: str, arguments: Any) -> None:
        """INVALID_ARGUMENT listing every failing path (``$.path``) when the arguments break the schema."""
        errors = sorted(self.validators[name].iter_errors(arguments), key=lambda e: list(e.absolute_path))
        if not errors:
            check = self.get(name).check_arguments
            if check is not None:
                try:
                    check(arguments)
                except InvalidArgument as exc:
                    raise InvalidArgument(f"{ARGUMENTS_FIELD}: arguments of {name!r}: {exc.message}",
                                          reason="ARGUMENTS_INVALID", field=ARGUMENTS_FIELD,
                                          metadata={"paths": exc.field or ""}) from None
            return
        shown = [f"{_json_path(e)}: {e.message}" for e in errors[:MAX_REPORTED_ERRORS]]
        more = len(errors) - len(shown)
        message = f"{ARGUMENTS_FIELD}: arguments of {name!r} do not match its schema: " + "; ".join(shown)
        if more > 0:
            message += f"; and {more} more"
        raise InvalidArgument(message, reason="ARGUMENTS_INVALID", field=ARGUMENTS_FIELD,
                              metadata={"paths": ",".join(_json_path(e) for e in errors[:MAX_REPORTED_ERRORS])})
