"""Hooks the server points at its metrics; the core calls them and never imports prometheus."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _nothing(*_args: object) -> None:
    return None


@dataclass(frozen=True)
class Signals:
    """Each hook must return at once and never raise."""

    # A run stopped because the store refused its append (another replica holds the session).
    run_fenced: Callable[[], None] = _nothing
    # This replica ended the run of a replica that stopped mid-turn (a terminal event on its behalf).
    dead_run_ended: Callable[[], None] = _nothing
    # A session control: (kind, outcome, seconds from posted to applied or None). Outcomes:
    # "posted" (for a run elsewhere), "applied" (to a run here), "not_here" (no such run here).
    control: Callable[[str, str, float | None], None] = _nothing


# Hooks that do nothing (tests, tools, a core without metrics).
NO_SIGNALS = Signals()
