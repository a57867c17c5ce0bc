from __future__ import annotations

import json
import logging

from opentelemetry.sdk.trace import TracerProvider

from services.common.logs import JsonFormatter, session_id_var


def _record(msg: str, **extra) -> logging.LogRecord:
    record = logging.LogRecord("llmesh.test", logging.INFO, __file__, 1, msg, None, None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_log_line_is_json_with_trace_and_session_ids() -> None:
    tracer = TracerProvider().get_tracer("test")
    token = session_id_var.set("sess-42")
    try:
        with tracer.start_as_current_span("rpc") as span:
            num_events = 3
            line = JsonFormatter("store").format(_record(f"appended {num_events} events", num_events=num_events))
            expected_trace = format(span.get_span_context().trace_id, "032x")
    finally:
        session_id_var.reset(token)
    entry = json.loads(line)
    assert entry["msg"] == "appended 3 events"
    assert entry["service"] == "store"
    assert entry["trace_id"] == expected_trace
    assert entry["session_id"] == "sess-42"
    assert entry["num_events"] == 3


def test_log_line_without_span_or_session_has_neither() -> None:
    entry = json.loads(JsonFormatter("store").format(_record("hello")))
    assert "trace_id" not in entry and "session_id" not in entry
