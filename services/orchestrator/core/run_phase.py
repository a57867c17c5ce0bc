"""Where a run is in its life, and the only moves between phases.

    STARTING ──> RUNNING ──> FINISHING ──> RELEASING ──> DONE
        │                        │                        ^
        │                        └──> HANDED_OVER ────────┤
        └─────────────────────────────────────────────────┘

STARTING: the session is reserved for the run while it takes the session's
store lock and opens its event stream; a start that fails there goes to DONE.
RUNNING: the agent loop runs. FINISHING: the run's final or error event is
out; its events are still being flushed. From there the session's next run
on this replica may take over the run's lock and event stream (HANDED_OVER),
or the run gives the lock back itself (RELEASING). DONE: nothing of the run
is left to do.
"""
from __future__ import annotations

import enum


class IllegalTransition(RuntimeError):
    """A move the lifecycle does not have: a bug in the caller, never a client error."""


class RunPhase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    FINISHING = "finishing"
    HANDED_OVER = "handed_over"
    RELEASING = "releasing"
    DONE = "done"

    @property
    def turn_is_over(self) -> bool:
        """Whether the run's last event is out (a client may already start the next turn)."""
        return self in _TURN_OVER

    def to(self, target: RunPhase) -> RunPhase:
        """`target`, if the lifecycle allows moving there from here; else IllegalTransition."""
        if target not in NEXT_PHASES[self]:
            raise IllegalTransition(f"a run cannot go from {self.value} to {target.value}")
        return target


NEXT_PHASES: dict[RunPhase, frozenset[RunPhase]] = {
    RunPhase.STARTING: frozenset({RunPhase.RUNNING, RunPhase.DONE}),
    RunPhase.RUNNING: frozenset({RunPhase.FINISHING}),
    RunPhase.FINISHING: frozenset({RunPhase.HANDED_OVER, RunPhase.RELEASING}),
    RunPhase.HANDED_OVER: frozenset({RunPhase.DONE}),
    RunPhase.RELEASING: frozenset({RunPhase.DONE}),
    RunPhase.DONE: frozenset(),
}

_TURN_OVER = frozenset({RunPhase.FINISHING, RunPhase.HANDED_OVER, RunPhase.RELEASING, RunPhase.DONE})
