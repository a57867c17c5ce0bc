"""The route table, read from the ``google.api.http`` annotations of the protos.

Nothing here is written per RPC: adding an annotated RPC to a proto adds its
REST route, its OpenAPI entry and its backend call.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory
from google.protobuf.message import Message

from services.common import authz
from services.gateway.core.path_template import PathTemplate, parse_template

# Proto modules whose annotated services the gateway exposes, by backend name.
DEFAULT_PROTO_MODULES: dict[str, str] = {
    "orchestrator": "llmesh.orchestrator.v1.orchestrator_pb2",
    "inference": "llmesh.inference.v1.inference_pb2",
    "tools": "llmesh.tools.v1.tools_pb2",
    "policy": "llmesh.policy.v1.policy_pb2",
}

_HTTP_METHODS = ("get", "put", "post", "delete", "patch")


@dataclass(frozen=True)
class Route:
    http_method: str
    template: PathTemplate
    body: str
    backend: str
    method: _descriptor.MethodDescriptor

    @property
    def grpc_path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"

    @property
    def server_streaming(self) -> bool:
        return self.method.server_streaming

    @property
    def input_type(self) -> _descriptor.Descriptor:
        return self.method.input_type

    @property
    def output_type(self) -> _descriptor.Descriptor:
        return self.method.output_type

    @property
    def operation_id(self) -> str:
        return f"{self.method.containing_service.name}_{self.method.name}"

    def request_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.input_type)

    def response_class(self) -> type[Message]:
        return message_factory.GetMessageClass(self.method.output_type)


def _bindings(rule: http_pb2.HttpRule) -> Iterable[tuple[str, str, str]]:
    pattern = rule.WhichOneof("pattern")
    if pattern in _HTTP_METHODS:
        yield pattern.upper(), getattr(rule, pattern), rule.body
    elif pattern == "custom":
        yield rule.custom.kind.upper(), rule.custom.path, rule.body
    for extra in rule.additional_bindings:
        yield from _bindings(extra)


def routes_for_service(service: _descriptor.ServiceDescriptor, backend: str) -> list[Route]:
    routes = []
    for method in service.methods:
        if method.client_streaming:
            continue  # no REST mapping for client streams
        options = method.GetOptions()
        if not options.HasExtension(annotations_pb2.http):
            continue
        for http_method, path, body in _bindings(options.Extensions[annotations_pb2.http]):
            routes.append(Route(http_method, parse_template(path), body, backend, method))
    return routes


def load_routes(modules: dict[str, str] | None = None) -> list[Route]:
    """Every annotated route the gateway may call for its clients, most specific first
    so literals beat variables. RPCs that the authorisation table keeps from the
    gateway (policy's Evaluate, tools' ExecuteTool, ...) get no route at all."""
    routes: list[Route] = []
    for backend, module_name in (modules or DEFAULT_PROTO_MODULES).items():
        module = importlib.import_module(module_name)
        for service in module.DESCRIPTOR.services_by_name.values():
            routes.extend(r for r in routes_for_service(service, backend)
                          if authz.GATEWAY in authz.allowed_callers(r.grpc_path))
    return sort_routes(routes)


def sort_routes(routes: Sequence[Route]) -> list[Route]:
    return sorted(routes, key=lambda r: (not r.template.verb, -r.template.num_literals, len(r.template.variables)))


def match_route(routes: Sequence[Route], http_method: str, path: str) -> tuple[Route, dict[str, str]] | None:
    for route in routes:
        if route.http_method != http_method:
            continue
        bound = route.template.match(path)
        if bound is not None:
            return route, bound
    return None


def path_exists(routes: Sequence[Route], path: str) -> list[str]:
    """HTTP methods that would match ``path`` (for 405 vs 404)."""
    return sorted({r.http_method for r in routes if r.template.match(path) is not None})
