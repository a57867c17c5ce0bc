"""A run's hold on its session's store lock, and writes fenced by it.

Every append of a run carries the lease's fencing token; the store refuses it
(FAILED_PRECONDITION, reason STALE_LOCK_OWNER) once the lock has changed hands.
A refusal proves another owner holds the session: the lease is fenced, the
run stops writing at once and ends here without emitting anything more.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from services.common.errors import FailedPrecondition
from services.orchestrator.core.ports import SessionLockGrant

T = TypeVar("T")

# ErrorInfo reason of an append refused because the lock changed hands.
STALE_LOCK_OWNER = "STALE_LOCK_OWNER"


class LeaseFenced(FailedPrecondition):
    """The store refused a write of this lease: another owner holds the session's lock."""

    default_reason = STALE_LOCK_OWNER


@dataclass
class LockLease:
    # Who holds the lock in the store; the same owner renews it.
    owner_id: str
    # The session's next event seq when the run got the lease (0: the store did not say).
    next_event_seq: int = 0
    # The store's fencing token for this holder (0: the store does not fence).
    fencing_token: int = 0
    # Taken over from the session's previous run on this replica rather than granted by the store.
    inherited: bool = False
    # A renewal was refused, or showed that another owner held the lock meanwhile.
    lost: bool = False
    # The store refused a write under this lease (implies lost): nothing more is written.
    fenced: bool = False
    # The session's next run on this replica, which took this lock over: its
    # renewals carry the token on, and the tail of this run is written with it.
    successor: LockLease | None = field(default=None, repr=False)
    # Called once when the lease is fenced (the run stops).
    on_fenced: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def granted(cls, owner_id: str, grant: SessionLockGrant) -> LockLease:
        return cls(owner_id=owner_id, next_event_seq=grant.next_event_seq, fencing_token=grant.fencing_token)

    def passed_on(self, next_event_seq: int) -> LockLease:
        """The same lock, for the session's next run, which continues at `next_event_seq`."""
        self.successor = LockLease(owner_id=self.owner_id, next_event_seq=next_event_seq,
                                   fencing_token=self.fencing_token, inherited=True)
        return self.successor

    @property
    def latest(self) -> LockLease:
        """The lease of the last run that took this lock over (this one when none did)."""
        lease = self
        while lease.successor is not None:
            lease = lease.successor
        return lease

    @property
    def write_token(self) -> int:
        """The token to write with now: the one the latest renewal of this lock returned."""
        return self.latest.fencing_token

    def renewed(self, grant: SessionLockGrant) -> bool:
        """Whether the lease held through this renewal; marks it lost when not."""
        if grant.acquired and self._unbroken(grant.fencing_token):
            self.fencing_token = grant.fencing_token or self.fencing_token
            return True
        self.lost = True
        return False

    def fence(self) -> None:
        """A write was refused: this lease and every one that took it over are gone."""
        lease: LockLease | None = self
        while lease is not None:
            if not lease.fenced:
                lease.fenced = lease.lost = True
                if lease.on_fenced is not None:
                    lease.on_fenced()
            lease = lease.successor

    def _unbroken(self, token: int) -> bool:
        # Every change of hands adds one to the token, and so does a renewal
        # after the lease lapsed: one more means it lapsed but nobody took it
        # meanwhile, so nobody else wrote the session's events.
        return not token or not self.fencing_token or token - self.fencing_token in (0, 1)


async def write_fenced(lease: LockLease | None, write: Callable[[int], Awaitable[T]]) -> T:
    """`write(token)` with the lease's current fencing token (0 without a lease).

    A refusal fences the lease and raises LeaseFenced; there is no retry,
    except once when this replica's own renewal moved the token while the
    write was on its way (the lock never changed hands then).
    """
    if lease is None:
        return await write(0)
    if lease.fenced:
        raise LeaseFenced(f"lock of {lease.owner_id!r} was taken over; not writing")
    for attempt in range(2):
        token = lease.write_token
        try:
            return await write(token)
        except FailedPrecondition as exc:
            if exc.reason != STALE_LOCK_OWNER:
                raise
            if attempt == 0 and not lease.latest.lost and lease.write_token != token:
                continue
            lease.fence()
            raise LeaseFenced(f"the store refused a write of {lease.owner_id!r}: the lock changed hands") from exc
    raise AssertionError("unreachable")
