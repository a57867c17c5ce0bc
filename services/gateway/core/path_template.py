"""google.api.http path templates: parse, match a request path, render for OpenAPI.

Grammar (AIP-127 / http.proto): ``/seg/{field}/seg/{field=pat/*}:verb`` where a
segment is a literal, ``*`` (one segment) or ``**`` (the rest), and a variable
binds a (possibly dotted) field path to what its pattern matched.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

_VARIABLE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_.]*)(?:=([^}]*))?\}")


@dataclass(frozen=True)
class PathTemplate:
    template: str
    variables: tuple[str, ...]
    verb: str
    regex: re.Pattern[str]
    num_literals: int

    def match(self, path: str) -> dict[str, str] | None:
        """Field path -> value (percent-decoded) if ``path`` (raw, still encoded) matches."""
        found = self.regex.fullmatch(path)
        if found is None:
            return None
        return {field: unquote(found.group(f"v{i}")) for i, field in enumerate(self.variables)}

    @property
    def openapi_path(self) -> str:
        """The template with each ``{field=pattern}`` shortened to ``{field}``."""
        return _VARIABLE.sub(lambda m: "{" + m.group(1) + "}", self.template)


class TemplateError(ValueError):
    pass


def _segment_regex(segment: str) -> str:
    if segment == "*":
        return r"[^/]+"
    if segment == "**":
        return r".+"
    if "{" in segment or "}" in segment or "*" in segment:
        raise TemplateError(f"bad segment {segment!r}")
    return re.escape(segment)


def _segments_regex(text: str) -> str:
    """Regex for literal/wildcard text; empty parts keep their '/' separators."""
    return "/".join(_segment_regex(s) if s else "" for s in text.split("/"))


def parse_template(template: str) -> PathTemplate:
    if not template.startswith("/"):
        raise TemplateError(f"template must start with '/': {template!r}")
    # The verb is a ':' after the last '/' and outside any {...}.
    body, verb = template, ""
    last = template.rsplit("/", 1)[-1]
    if ":" in last and last.rfind(":") > last.rfind("}"):
        body, verb = template[: template.rfind(":")], template[template.rfind(":") + 1:]
    variables: list[str] = []
    regex = ""
    pos = 0
    num_literals = 0
    for found in _VARIABLE.finditer(body):
        literal = body[pos:found.start()]
        num_literals += len([s for s in literal.split("/") if s and s != "*"])
        regex += _segments_regex(literal)
        pattern = found.group(2) or "*"
        regex += f"(?P<v{len(variables)}>{_segments_regex(pattern)})"
        variables.append(found.group(1))
        pos = found.end()
    tail = body[pos:]
    num_literals += len([s for s in tail.split("/") if s and s not in ("*", "**")])
    regex += _segments_regex(tail)
    if verb:
        regex += ":" + re.escape(verb)
    if len(set(variables)) != len(variables):
        raise TemplateError(f"variable bound twice in {template!r}")
    return PathTemplate(template, tuple(variables), verb, re.compile(regex), num_literals)
