"""Prometheus metrics of the tool executor."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from services.tools.core.executor import ToolExecutor
from services.tools.core.model import ToolOutcome

# Calls to a name the registry does not know share one label value, so a
# caller sending random names cannot grow the series without bound.
UNKNOWN_TOOL = "_unknown"

TOOL_CALLS = Counter("llmesh_tool_calls_total", "Tool calls by tool and outcome status.", ["tool", "status"])
TOOL_DURATION = Histogram(
    "llmesh_tool_duration_seconds", "Time of one tool call, policy check and retries included.", ["tool", "status"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300))
CALLS_WAITING = Gauge("llmesh_tools_calls_waiting", "Tool calls waiting for a concurrency slot (queue depth).")
CALLS_RUNNING = Gauge("llmesh_tools_calls_running", "Tool calls holding a concurrency slot.")
CALL_SLOTS = Gauge("llmesh_tools_call_slots", "Concurrency slots of the executor (max_concurrent_calls).")


def watch_executor(executor: ToolExecutor) -> None:
    """Gauges read the executor's live counters at scrape time."""
    CALLS_WAITING.set_function(lambda: executor.num_waiting)
    CALLS_RUNNING.set_function(lambda: executor.num_running)
    CALL_SLOTS.set(executor.limits.max_concurrent_calls)


def record_outcomes(executor: ToolExecutor, outcomes: list[ToolOutcome]) -> None:
    known = {spec.name for spec in executor.registry.list()}
    for outcome in outcomes:
        tool = outcome.name if outcome.name in known else UNKNOWN_TOOL
        status = outcome.status.name.lower()
        TOOL_CALLS.labels(tool, status).inc()
        TOOL_DURATION.labels(tool, status).observe(outcome.duration_ms / 1000.0)
