"""Orchestrator metrics follow the events runs publish."""
from __future__ import annotations

from prometheus_client import REGISTRY

from services.orchestrator.adapters.memory_store import MemoryStore
from services.orchestrator.core import events as ev
from services.orchestrator.core.event_hub import EventHub
from services.orchestrator.core.events import AgentEvent
from services.orchestrator.metrics import observe_event


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_runs_and_compactions_are_counted() -> None:
    active = _value("llmesh_orchestrator_active_runs")
    finals = _value("llmesh_orchestrator_runs_ended_total", outcome="final")
    drops = _value("llmesh_orchestrator_compactions_total", strategy="drop_oldest")
    ratios = _value("llmesh_orchestrator_compaction_ratio_count")
    ratio_sum = _value("llmesh_orchestrator_compaction_ratio_sum")

    observe_event(AgentEvent("s1", "r1", ev.TURN_STARTED, {}))
    assert _value("llmesh_orchestrator_active_runs") == active + 1
    observe_event(AgentEvent("s1", "r1", ev.COMPACTION, {"strategy": "drop_oldest", "tokens_before": 1000,
                                                         "tokens_after": 250}))
    observe_event(AgentEvent("s1", "r1", ev.FINAL, {"text": "ok"}))

    assert _value("llmesh_orchestrator_active_runs") == active
    assert _value("llmesh_orchestrator_runs_ended_total", outcome="final") == finals + 1
    assert _value("llmesh_orchestrator_compactions_total", strategy="drop_oldest") == drops + 1
    assert _value("llmesh_orchestrator_compaction_ratio_count") == ratios + 1
    assert abs(_value("llmesh_orchestrator_compaction_ratio_sum") - ratio_sum - 0.25) < 1e-9


async def test_hub_observers_see_every_stamped_event() -> None:
    hub = EventHub(MemoryStore(), batch_interval_s=0.001)
    seen: list[tuple[str, int]] = []
    hub.add_observer(lambda event: seen.append((event.type, event.seq)))
    # next_seq from a lock grant: the first event is stamped without a store call.
    stream, first = await hub.open_run(AgentEvent("s1", "r1", ev.TURN_STARTED, {}), "t1", next_seq=7)
    hub.publish(stream, AgentEvent("s1", "r1", ev.TOKEN, {"text": "hi"}))
    stream.flusher.cancel()
    assert seen == [(ev.TURN_STARTED, 7), (ev.TOKEN, 8)]


def test_fenced_runs_dead_runs_and_session_controls_are_counted() -> None:
    from services.orchestrator.metrics import signals

    hooks = signals()
    fenced = _value("llmesh_orchestrator_runs_fenced_total")
    ended = _value("llmesh_orchestrator_dead_runs_ended_total")
    posted = _value("llmesh_orchestrator_session_controls_total", kind="cancel", outcome="posted")
    applied = _value("llmesh_orchestrator_session_controls_total", kind="approval", outcome="applied")
    delays = _value("llmesh_orchestrator_session_control_delay_seconds_count")

    hooks.run_fenced()
    hooks.dead_run_ended()
    hooks.control("cancel", "posted", None)
    hooks.control("approval", "applied", 0.03)

    assert _value("llmesh_orchestrator_runs_fenced_total") == fenced + 1
    assert _value("llmesh_orchestrator_dead_runs_ended_total") == ended + 1
    assert _value("llmesh_orchestrator_session_controls_total", kind="cancel", outcome="posted") == posted + 1
    assert _value("llmesh_orchestrator_session_controls_total", kind="approval", outcome="applied") == applied + 1
    assert _value("llmesh_orchestrator_session_control_delay_seconds_count") == delays + 1
