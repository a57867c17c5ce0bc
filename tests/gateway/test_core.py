"""Pure pieces of the REST layer: templates, status table, SSE framing, request building."""
from __future__ import annotations

import pytest
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb

from services.common import errors
from services.common.interceptors import ERROR_TABLE
from services.gateway import convert
from services.gateway.core import streaming
from services.gateway.core.chat_format import parse_tool_call, parse_tools
from services.gateway.core.http_status import http_status_for
from services.gateway.core.path_template import TemplateError, parse_template
from services.gateway.http_errors import describe_error, error_response
from services.gateway.routes import load_routes, match_route


def test_templates_bind_variables_verbs_and_wildcards():
    run = parse_template("/v1/sessions/{session_id}:run")
    assert run.match("/v1/sessions/a%2Fb:run") == {"session_id": "a/b"}  # decoded after matching
    assert run.match("/v1/sessions/a/b:run") is None
    assert run.match("/v1/sessions/x:cancel") is None
    nested = parse_template("/v1/{name=projects/*/docs/**}")
    assert nested.match("/v1/projects/p1/docs/a/b") == {"name": "projects/p1/docs/a/b"}
    assert nested.openapi_path == "/v1/{name}"
    with pytest.raises(TemplateError):
        parse_template("v1/no-slash")


def test_route_table_prefers_verbs_and_literals():
    routes = load_routes()
    route, bound = match_route(routes, "POST", "/v1/sessions/s1:run")
    assert route.method.name == "Run" and bound == {"session_id": "s1"}
    route, bound = match_route(routes, "GET", "/v1/policy/tenants/t1/audit:verify")
    assert route.method.name == "VerifyAudit" and bound == {"tenant_id": "t1"}
    assert match_route(routes, "PUT", "/v1/sessions") is None


def test_status_table():
    assert [http_status_for(c) for c in ("INVALID_ARGUMENT", "UNAUTHENTICATED", "RESOURCE_EXHAUSTED",
                                         "NOT_FOUND", "UNAVAILABLE", "SOMETHING_NEW")] == [400, 401, 429, 404, 503, 500]


@pytest.mark.parametrize("cls", list(ERROR_TABLE), ids=lambda cls: cls.__name__)
def test_every_domain_error_answers_the_http_status_of_its_grpc_code(cls):
    code, message, details, retry_after_ms = describe_error(cls("boom", reason="WHY", field="f", retry_after_ms=2500))
    assert code == ERROR_TABLE[cls].name and message == "boom" and retry_after_ms == 2500
    assert details[0]["reason"] == "WHY" and details[0]["metadata"] == {"field": "f"}
    assert details[1] == {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "2.500s"}
    response = error_response(cls("boom"))
    assert response.status_code == http_status_for(ERROR_TABLE[cls].name)


def test_sse_frames_carry_the_event_seq():
    payload = {"event": {"seq": "7", "type": "EVENT_TYPE_TOKEN"}}
    frame = streaming.sse_frame(payload, event_id=streaming.find_seq(payload)).decode()
    assert frame.startswith("id: 7\ndata: {") and frame.endswith("\n\n")
    assert streaming.choose_stream_format("application/x-ndjson") == streaming.NDJSON_MEDIA_TYPE
    assert streaming.choose_stream_format("*/*") == streaming.SSE_MEDIA_TYPE
    assert streaming.parse_last_event_id(" 12 ") == 12
    with pytest.raises(ValueError):
        streaming.parse_last_event_id("-1")


def test_build_request_merges_query_path_and_body():
    message = convert.build_request(pb.ResumeRequest.DESCRIPTOR, pb.ResumeRequest, body_rule="", body=b"",
                                    path_vars={"session_id": "s1"}, query=[("afterSeq", "3"), ("tenant_id", "t")])
    assert (message.session_id, message.after_seq, message.tenant_id) == ("s1", 3, "t")
    run = convert.build_request(pb.RunRequest.DESCRIPTOR, pb.RunRequest, body_rule="*",
                                body=b'{"userMessage": "hi", "sessionId": "other", "options": {"maxSteps": 2}}',
                                path_vars={"session_id": "s1"}, query=[])
    assert (run.session_id, run.user_message, run.options.max_steps) == ("s1", "hi", 2)
    with pytest.raises(errors.InvalidArgument) as caught:
        convert.build_request(pb.ResumeRequest.DESCRIPTOR, pb.ResumeRequest, body_rule="", body=b"",
                              path_vars={}, query=[("after_seq", "99999999999999999999")])
    assert caught.value.field == "after_seq"
    with pytest.raises(errors.InvalidArgument) as caught:
        convert.build_request(pb.RunRequest.DESCRIPTOR, pb.RunRequest, body_rule="*",
                              body=b'{"options": {"maxSteps": "many"}}', path_vars={}, query=[])
    assert "max" in caught.value.field.lower()


def test_resume_point_takes_the_later_of_header_and_query():
    message = pb.ResumeRequest(after_seq=5)
    convert.apply_resume_point(message, 3)
    assert message.after_seq == 5
    convert.apply_resume_point(message, 9)
    assert message.after_seq == 9


def test_tool_call_parsing_only_accepts_known_tools():
    tools = parse_tools([{"type": "function", "function": {"name": "lookup"}}])
    assert parse_tool_call(' {"name": "lookup", "arguments": {"q": 1}}', tools) == ("lookup", '{"q":1}')
    assert parse_tool_call('{"name": "other", "arguments": {}}', tools) is None
    assert parse_tool_call('{"name": "lookup", "arguments": {', tools) is None
    assert parse_tool_call("plain text", tools) is None
    with pytest.raises(errors.InvalidArgument) as caught:
        parse_tools([{"type": "function", "function": {"name": "bad name!"}}])
    assert caught.value.field == "tools[0].function.name"
