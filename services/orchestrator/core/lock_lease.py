"""A run's hold on its session's store lock."""
from __future__ import annotations

from dataclasses import dataclass

from services.orchestrator.core.ports import SessionLockGrant


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

    @classmethod
    def granted(cls, owner_id: str, grant: SessionLockGrant) -> LockLease:
        return cls(owner_id=owner_id, next_event_seq=grant.next_event_seq, fencing_token=grant.fencing_token)

    def passed_on(self, next_event_seq: int) -> LockLease:
        """The same lock, for the session's next run, which continues at `next_event_seq`."""
        return LockLease(owner_id=self.owner_id, next_event_seq=next_event_seq, fencing_token=self.fencing_token,
                         inherited=True)

    def renewed(self, grant: SessionLockGrant) -> bool:
        """Whether the lease held through this renewal; marks it lost when not."""
        if grant.acquired and self._unbroken(grant.fencing_token):
            self.fencing_token = grant.fencing_token or self.fencing_token
            return True
        self.lost = True
        return False

    def _unbroken(self, token: int) -> bool:
        # Every change of hands adds one to the token, and so does a renewal
        # after the lease lapsed: one more means it lapsed but nobody took it
        # meanwhile, so nobody else wrote the session's events.
        return not token or not self.fencing_token or token - self.fencing_token in (0, 1)
