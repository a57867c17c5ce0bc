"""Capture finished spans in memory and read them back as trees."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter


def capture_spans() -> InMemorySpanExporter:
    """An exporter receiving every span of this process from now on.

    The global provider can be set once per process; when another test set an
    SDK provider first, the exporter joins that one instead.
    """
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider), "a non-SDK tracer provider is installed"
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@dataclass
class SpanNode:
    span: ReadableSpan
    children: list[SpanNode] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.span.name

    def walk(self) -> Iterator[SpanNode]:
        yield self
        for child in self.children:
            yield from child.walk()

    def render(self, depth: int = 0) -> str:
        attrs = {k: v for k, v in (self.span.attributes or {}).items()
                 if k in ("session_id", "tool_call_id", "model", "node")}
        lines = [f"{'  ' * depth}{self.span.kind.name.lower()} {self.name} {attrs or ''}".rstrip()]
        lines += [child.render(depth + 1) for child in self.children]
        return "\n".join(lines)


def build_trees(spans: list[ReadableSpan]) -> dict[int, list[SpanNode]]:
    """trace_id -> root nodes (spans whose parent is not among ``spans``)."""
    nodes = {span.context.span_id: SpanNode(span) for span in spans}
    roots: dict[int, list[SpanNode]] = {}
    for node in sorted(nodes.values(), key=lambda n: n.span.start_time or 0):
        parent = node.span.parent
        if parent is not None and parent.span_id in nodes:
            nodes[parent.span_id].children.append(node)
        else:
            roots.setdefault(node.span.context.trace_id, []).append(node)
    return roots
