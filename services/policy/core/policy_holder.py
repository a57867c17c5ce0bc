"""The rules in force, swapped atomically when a new file loads cleanly."""
from __future__ import annotations

from services.policy.core.evaluator import PolicyEvaluator
from services.policy.core.policy_loader import PolicyLoadError, load_policy
from services.policy.core.rules import Policy


class PolicyHolder:
    def __init__(self, policy: Policy) -> None:
        self._evaluator = PolicyEvaluator(policy)
        self.last_error = ""
        self.num_reloads = 0

    @property
    def evaluator(self) -> PolicyEvaluator:
        return self._evaluator

    @property
    def policy(self) -> Policy:
        return self._evaluator.policy

    def reload(self, text: str, source: str) -> bool:
        """Swap in ``text`` if it is valid; otherwise keep the old rules and remember why."""
        try:
            policy = load_policy(text, source)
        except PolicyLoadError as exc:
            self.last_error = str(exc)
            return False
        self._evaluator = PolicyEvaluator(policy)
        self.last_error = ""
        self.num_reloads += 1
        return True
