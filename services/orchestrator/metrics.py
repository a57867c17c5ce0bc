"""Prometheus metrics of the orchestrator, fed by the event hub's observer and the core's signals."""
from __future__ import annotations

import weakref
from collections.abc import Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from services.orchestrator.core import events as ev
from services.orchestrator.core.events import AgentEvent
from services.orchestrator.core.signals import Signals
from services.orchestrator.core.tasks import TaskQueue
from services.orchestrator.core.webhooks import DeliverySignals, DestinationStats

EVENTS = Counter("llmesh_orchestrator_events_total", "Events published to run streams.", ["type"])
ACTIVE_RUNS = Gauge("llmesh_orchestrator_active_runs", "Runs started here and not yet final.")
RUNS_ENDED = Counter("llmesh_orchestrator_runs_ended_total", "Runs that ended, by how.", ["outcome"])
COMPACTIONS = Counter("llmesh_orchestrator_compactions_total", "Context compactions.", ["strategy"])
COMPACTION_RATIO = Histogram(
    "llmesh_orchestrator_compaction_ratio", "Prompt tokens after a compaction over tokens before it.",
    buckets=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0))

RUNS_FENCED = Counter("llmesh_orchestrator_runs_fenced_total",
                      "Runs stopped because the store refused their append: another replica took the session.")
DEAD_RUNS_ENDED = Counter("llmesh_orchestrator_dead_runs_ended_total",
                          "Turns of a replica that stopped mid-turn, ended here with an error event.")
CONTROLS = Counter("llmesh_orchestrator_session_controls_total",
                   "Session controls (cancel, approval): posted here for a run elsewhere, applied to a run here, "
                   "or seen with no such run here.", ["kind", "outcome"])
CONTROL_DELAY = Histogram(
    "llmesh_orchestrator_session_control_delay_seconds",
    "From a control's store time to its applying here (two machines' clocks).",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))


def observe_control(kind: str, outcome: str, delay_s: float | None) -> None:
    CONTROLS.labels(kind, outcome).inc()
    if delay_s is not None:
        CONTROL_DELAY.observe(delay_s)


def signals() -> Signals:
    """The core's hooks, pointed at these metrics."""
    return Signals(run_fenced=RUNS_FENCED.inc, dead_run_ended=DEAD_RUNS_ENDED.inc, control=observe_control)


def observe_event(event: AgentEvent) -> None:
    EVENTS.labels(event.type).inc()
    if event.type == ev.TURN_STARTED:
        ACTIVE_RUNS.inc()
    elif event.type in ev.TERMINAL_TYPES:
        ACTIVE_RUNS.dec()
        RUNS_ENDED.labels(event.type).inc()
    elif event.type == ev.COMPACTION:
        COMPACTIONS.labels(str(event.body.get("strategy", ""))).inc()
        before = event.body.get("tokens_before") or 0
        if before > 0:
            COMPACTION_RATIO.observe((event.body.get("tokens_after") or 0) / before)


class _ClaimedTasks(Collector):
    """``llmesh_orchestrator_tasks_claimed_total`` read from the task queues' own counts."""

    def __init__(self) -> None:
        self.queues: weakref.WeakSet[TaskQueue] = weakref.WeakSet()

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily("llmesh_orchestrator_tasks_claimed", "Background tasks claimed here, by class.",
                                     labels=["task_class"])
        totals: dict[str, int] = {}
        for queue in list(self.queues):
            for task_class, count in queue.num_claimed_by_class.items():
                totals[task_class] = totals.get(task_class, 0) + count
        for task_class, count in sorted(totals.items()):
            family.add_metric([task_class], count)
        yield family


_CLAIMED = _ClaimedTasks()
REGISTRY.register(_CLAIMED)


def watch_tasks(queue: TaskQueue) -> None:
    _CLAIMED.queues.add(queue)


WEBHOOK_ATTEMPTS = Counter("llmesh_orchestrator_webhook_attempts_total",
                           "Webhook delivery attempts made here, by destination (scheme://host:port).",
                           ["destination"])
WEBHOOK_FAILURES = Counter("llmesh_orchestrator_webhook_failures_total",
                           "Webhook delivery attempts that failed, by destination and kind (timeout, network, "
                           "http: a non-2xx answer, refused: the host resolves to a non-public address, "
                           "error: anything else).",
                           ["destination", "kind"])
WEBHOOK_DEAD = Counter("llmesh_orchestrator_webhook_dead_letters_total",
                       "Webhook deliveries dead-lettered after an attempt here, by destination.", ["destination"])
WEBHOOK_PENDING = Gauge("llmesh_orchestrator_webhook_pending",
                        "Undelivered webhook deliveries in the store's outbox (mesh-wide, the same on every "
                        "replica), by destination.", ["destination"])
WEBHOOK_OLDEST_AGE = Gauge("llmesh_orchestrator_webhook_oldest_pending_age_seconds",
                           "Age of the oldest undelivered webhook delivery (mesh-wide), by destination.",
                           ["destination"])
WEBHOOK_DEAD_ROWS = Gauge("llmesh_orchestrator_webhook_dead",
                          "Dead-lettered webhook deliveries in the store (mesh-wide), by destination.",
                          ["destination"])
_STATS_GAUGES = (WEBHOOK_PENDING, WEBHOOK_OLDEST_AGE, WEBHOOK_DEAD_ROWS)
_stats_destinations: set[str] = set()


def observe_outbox_stats(stats: list[DestinationStats]) -> None:
    """Set the outbox gauges; destinations no longer in the stats are removed."""
    seen = set()
    for row in stats:
        seen.add(row.destination)
        WEBHOOK_PENDING.labels(row.destination).set(row.pending)
        WEBHOOK_OLDEST_AGE.labels(row.destination).set(row.oldest_pending_age_s)
        WEBHOOK_DEAD_ROWS.labels(row.destination).set(row.dead)
    for gone in _stats_destinations - seen:
        for gauge in _STATS_GAUGES:
            try:
                gauge.remove(gone)
            except KeyError:
                pass
    _stats_destinations.clear()
    _stats_destinations.update(seen)


def webhook_signals() -> DeliverySignals:
    """The delivery worker's hooks, pointed at these metrics."""
    return DeliverySignals(attempt=lambda destination: WEBHOOK_ATTEMPTS.labels(destination).inc(),
                           failure=lambda destination, kind: WEBHOOK_FAILURES.labels(destination, kind).inc(),
                           dead=lambda destination: WEBHOOK_DEAD.labels(destination).inc(),
                           stats=observe_outbox_stats)
