"""SqlRepository: the core's StoreRepository port over SQLAlchemy (one transaction per call)."""
from __future__ import annotations

from services.store.adapters.approval_repository import ApprovalRepository
from services.store.adapters.control_repository import ControlRepository
from services.store.adapters.database import Database
from services.store.adapters.session_repository import SessionRepository
from services.store.adapters.task_repository import TaskRepository
from services.store.adapters.webhook_repository import WebhookRepository


class SqlRepository(SessionRepository, TaskRepository, ApprovalRepository, ControlRepository, WebhookRepository):
    def __init__(self, db: Database) -> None:
        self.db = db
