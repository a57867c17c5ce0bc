"""Ending the turn of a replica that stopped mid-turn, and looking at a session's lock.

A replica that dies while running a turn leaves the session's store lock to
expire and the turn's events without a final or error event, so a client
following the session would wait forever. The next replica to touch the
session takes the lock, sees that the last stored event is not terminal and
appends an `error` event (reason REPLICA_LOST) for the dead run, with the
next seq under its own fencing token: the dead replica, should it come back,
can write nothing more (its appends are refused), and the log stays gapless.

"Touching" is: a run starting (under its own fresh lock, before its first
event), a Resume that follows the session from the store (at once, and again
whenever the followed session has gone quiet for a third of the lock lease
in the middle of a turn), and Cancel or SubmitApproval for a run not on this
replica. The checks that are not a run take the lock under a checker owner
(`check:...`) for a few store round trips; a run that finds a checker holding
the lock waits for it instead of answering SESSION_BUSY.

A replica shows a turn's events to live clients before they are stored, so a
client of a replica that died may have seen seqs the store never got. A
Resume whose cursor is past the stored end of a session with no turn going
cannot be served what it asks for (those seqs will never exist, or now name
other events): it fails with ABORTED, reason EVENTS_NOT_STORED, naming
`last_stored_seq`, and a Resume after that seq gets the rest of the log,
ending with the dead run's terminal event.
"""
from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from services.common.errors import Aborted, DomainError
from services.orchestrator.core import events as ev
from services.orchestrator.core.events import AgentEvent
from services.orchestrator.core.lock_lease import LockLease, write_fenced
from services.orchestrator.core.ports import StorePort
from services.orchestrator.core.retry import RetryPolicy, with_retries
from services.orchestrator.core.signals import NO_SIGNALS, Signals

log = logging.getLogger("llmesh.orchestrator.recovery")

# Owner ids of lock holders that only look at a session (never a run).
CHECKER_PREFIX = "check:"
REPLICA_LOST = "REPLICA_LOST"
REPLICA_LOST_MESSAGE = "the replica running this turn stopped before the turn ended"
DEFAULT_RETRY = RetryPolicy(max_attempts=6)


class SessionState(enum.Enum):
    # A live owner (a run, on this replica or another) holds the session's lock.
    RUN_ACTIVE = "run_active"
    # Nobody held the lock: no turn is going (a dead one, if any, has just been ended).
    NO_RUN = "no_run"
    # Another replica's check holds the lock for a moment: no turn is going.
    BEING_CHECKED = "being_checked"


@dataclass(frozen=True)
class SessionCheck:
    state: SessionState
    # The lock's holder when it was held.
    holder_id: str = ""
    # The dead run this check ended, if it ended one.
    ended_run_id: str = ""
    # The seq of the session's last stored event, when the check held the lock (0: unknown or none).
    last_stored_seq: int = 0
    # Where a client whose cursor is past what the store holds should resume: after this seq, so
    # that the dead run's REPLICA_LOST event, when it is the last one, is among what it gets.
    resume_after_seq: int = 0


def is_checker(owner_id: str) -> bool:
    return owner_id.startswith(CHECKER_PREFIX)


@dataclass
class _Quiet:
    """What a guarded follower has seen: whether a turn is open and when anything last came."""

    armed: bool
    last_seen: float
    num_seen: int = 0
    # The highest seq the client has: its Resume's after_seq, then each event given.
    cursor: int = 0


class EventsNotStored(Aborted):
    """A client was shown events of a dead replica that the store never got."""

    default_reason = "EVENTS_NOT_STORED"

    def __init__(self, session_id: str, after_seq: int, last_stored_seq: int) -> None:
        super().__init__(f"after_seq: session {session_id!r} has no turn going and its log ends at seq "
                         f"{last_stored_seq}; the events after it up to seq {after_seq} were shown by a replica "
                         f"that stopped before storing them: Resume after seq {last_stored_seq}",
                         field="after_seq", metadata={"last_stored_seq": str(last_stored_seq)})
        self.last_stored_seq = last_stored_seq


class DeadRunRecovery:
    def __init__(self, store: StorePort, *, replica_id: str, lease_ms: int, signals: Signals = NO_SIGNALS,
                 retry: RetryPolicy = DEFAULT_RETRY) -> None:
        self._store = store
        self._replica_id = replica_id
        self._lease_ms = lease_ms
        self._signals = signals
        self._retry = retry
        self.num_dead_runs_ended = 0
        # Checks under way, held so that one whose caller left still runs to its release.
        self._checks: set[asyncio.Future[SessionCheck]] = set()

    @property
    def quiet_interval_s(self) -> float:
        """How long a followed turn may go quiet before its lock is looked at (a third of the lease)."""
        return self._lease_ms / 3000.0

    async def check(self, tenant_id: str, session_id: str) -> SessionCheck:
        """Whether a turn is going on the session; ends a dead one when the lock has expired.

        Shielded: a caller that goes away (a client closing its Resume) does not cut the
        check between taking the lock and letting it go, which would leave the lock to
        its lease and a new turn answered SESSION_BUSY meanwhile.
        """
        task = asyncio.ensure_future(self._check(tenant_id, session_id))
        self._checks.add(task)
        task.add_done_callback(self._checks.discard)
        return await asyncio.shield(task)

    async def _check(self, tenant_id: str, session_id: str) -> SessionCheck:
        owner_id = f"{CHECKER_PREFIX}{self._replica_id}:{uuid.uuid4().hex[:12]}"
        grant = await self._store.acquire_session_lock(tenant_id=tenant_id, session_id=session_id,
                                                       owner_id=owner_id, lease_ms=self._lease_ms)
        if not grant.acquired:
            state = SessionState.BEING_CHECKED if is_checker(grant.holder_id) else SessionState.RUN_ACTIVE
            return SessionCheck(state, holder_id=grant.holder_id)
        lease = LockLease.granted(owner_id, grant)
        try:
            ended = await self.end_dead_run(tenant_id, session_id, lease)
            last_stored = max(0, lease.next_event_seq - 1)
            resume_after = last_stored - 1 if ended else await self._before_lost_run_end(
                tenant_id, session_id, last_stored)
        finally:
            try:
                await self._store.release_session_lock(tenant_id=tenant_id, session_id=session_id, owner_id=owner_id)
            except DomainError:
                log.warning("checker lock not released; it will expire", extra={"session_id": session_id})
        return SessionCheck(SessionState.NO_RUN, ended_run_id=ended, last_stored_seq=last_stored,
                            resume_after_seq=resume_after)

    async def _before_lost_run_end(self, tenant_id: str, session_id: str, last_stored: int) -> int:
        """``last_stored``, or the seq before it when that event ended a run whose replica stopped."""
        if last_stored <= 0:
            return 0
        tail = await with_retries(lambda: self._store.read_events(tenant_id=tenant_id, session_id=session_id,
                                                                  after_seq=last_stored - 1), self._retry)
        last = next((e for e in tail if e.seq == last_stored), None)
        lost = last is not None and last.type == ev.ERROR and last.body.get("reason") == REPLICA_LOST
        return last_stored - 1 if lost else last_stored

    async def end_dead_run(self, tenant_id: str, session_id: str, lease: LockLease) -> str:
        """Under a lease fresh from the store: end the session's last run if it has no terminal event.

        Returns the run id it ended ("" when the last run had ended). The
        error event takes the lease's next seq, which moves on by one.
        """
        if lease.next_event_seq <= 1:
            return ""  # no events yet (or a store that does not say where the log ends)
        last_seq = lease.next_event_seq - 1
        tail = await with_retries(lambda: self._store.read_events(tenant_id=tenant_id, session_id=session_id,
                                                                  after_seq=last_seq - 1), self._retry)
        last = next((e for e in tail if e.seq == last_seq), None)
        if last is None or last.is_terminal:
            return ""
        seq, run_id = lease.next_event_seq, last.run_id
        error = AgentEvent(session_id, run_id, ev.ERROR, {"reason": REPLICA_LOST, "message": REPLICA_LOST_MESSAGE,
                                                          "retryable": True})
        key = f"{run_id}:{seq}"  # the key the run itself would have used for this seq
        (stored,) = await with_retries(lambda: write_fenced(lease, lambda token: self._store.append_events(
            request_id=key, tenant_id=tenant_id, session_id=session_id, events=[error], idempotency_keys=[key],
            fencing_token=token)), self._retry)
        lease.next_event_seq = stored + 1
        self.num_dead_runs_ended += 1
        self._signals.dead_run_ended()
        log.warning("ended the turn of a replica that stopped", extra={"session_id": session_id, "run_id": run_id,
                                                                       "seq": stored})
        return run_id

    async def guard(self, tenant_id: str, session_id: str, events: AsyncIterator[AgentEvent], *,
                    is_local: Callable[[], bool], after_seq: int = 0) -> AsyncIterator[AgentEvent]:
        """`events` (a follower of the session after `after_seq`), ended for a client when the turn's replica dies.

        Looks at the session's lock at once, and again whenever the follower
        has seen a turn start but nothing for `quiet_interval_s`, unless the
        turn runs here (`is_local`). Raises EventsNotStored when the client's
        cursor is past the stored end of a session with no turn going.
        """
        loop = asyncio.get_running_loop()
        quiet = _Quiet(armed=True, last_seen=loop.time(), cursor=after_seq)
        lost: asyncio.Future[EventsNotStored] = loop.create_future()
        watchdog = asyncio.create_task(self._watch_over(tenant_id, session_id, quiet, is_local, lost),
                                       name=f"watchdog-{session_id}")
        iterator = events.__aiter__()
        following: asyncio.Future[AgentEvent] | None = None
        try:
            while True:
                following = asyncio.ensure_future(iterator.__anext__())
                racing: list[asyncio.Future[Any]] = [following, lost]
                await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
                if not following.done():
                    raise lost.result()
                try:
                    event = following.result()
                except StopAsyncIteration:
                    return
                quiet.armed, quiet.last_seen = not event.is_terminal, loop.time()
                quiet.num_seen += 1
                quiet.cursor = max(quiet.cursor, event.seq)
                yield event
        finally:
            watchdog.cancel()
            if following is not None and not following.done():
                # The follower is mid-step: stop it there, or it cannot be closed.
                following.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                    await following
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _watch_over(self, tenant_id: str, session_id: str, quiet: _Quiet,
                          is_local: Callable[[], bool], lost: asyncio.Future[EventsNotStored]) -> None:
        loop = asyncio.get_running_loop()
        interval = self.quiet_interval_s
        due = True  # the first look is at once: the session may hold a dead turn already
        while True:
            if due and not is_local():
                num_seen = quiet.num_seen
                try:
                    check = await self.check(tenant_id, session_id)
                except DomainError as exc:
                    log.info("could not look at the session's lock", extra={"session_id": session_id,
                                                                          "reason": exc.reason})
                except Exception:  # the follower goes on without its watchdog's look this time
                    log.exception("looking at the session's lock failed", extra={"session_id": session_id})
                else:
                    if check.state is SessionState.NO_RUN and quiet.num_seen == num_seen and not lost.done() and (
                            check.last_stored_seq < quiet.cursor
                            or (check.ended_run_id and check.last_stored_seq <= quiet.cursor)):
                        # No turn is going and the log ends before what the client has (or this check
                        # just wrote the dead run's end under a seq the client was shown): the events
                        # between were a dead replica's, never stored, or their seqs now name others.
                        lost.set_result(EventsNotStored(session_id, quiet.cursor, check.resume_after_seq))
                        return
                    if check.state is SessionState.NO_RUN and not check.ended_run_id and quiet.num_seen == num_seen:
                        quiet.armed = False  # the last turn had ended; a new one re-arms with its first event
            await asyncio.sleep(interval)
            due = quiet.armed and loop.time() - quiet.last_seen >= interval
