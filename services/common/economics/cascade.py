"""Small-then-large cascade: answer with the small model, escalate when its answer fails a check.

The check is deliberately mechanical: a grammar (or any validator) the answer
must satisfy, length bounds, and the mean log-probability of its tokens
(low means the model was guessing). Only a failed check pays for the large model.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

from services.common.economics.routing import ModelProfile


@dataclass(frozen=True)
class Answer:
    text: str
    #: Log-probability of each generated token; empty when the node did not report them.
    token_logprobs: Sequence[float] = ()


@dataclass(frozen=True)
class AnswerCheck:
    #: Escalate when the mean token log-probability is below this; None skips the check.
    min_mean_logprob: float | None = None
    min_chars: int = 0
    #: 0 means no upper bound.
    max_chars: int = 0
    #: Must return True for a well-formed answer (e.g. a grammar or JSON schema check).
    validator: Callable[[str], bool] | None = None
    #: Escalate when log-probabilities were asked for but none came back.
    require_logprobs: bool = False

    def failure(self, answer: Answer) -> str | None:
        """Why the answer is not good enough, or None when it passes."""
        text = answer.text
        if len(text.strip()) < self.min_chars:
            return "too_short"
        if self.max_chars and len(text) > self.max_chars:
            return "too_long"
        if self.validator is not None and not self.validator(text):
            return "invalid"
        if self.min_mean_logprob is not None:
            if not answer.token_logprobs:
                return "no_logprobs" if self.require_logprobs else None
            mean = sum(answer.token_logprobs) / len(answer.token_logprobs)
            if mean < self.min_mean_logprob:
                return "low_confidence"
        return None


@dataclass(frozen=True)
class CascadeResult:
    answer: Answer
    model: str
    escalated: bool
    #: Why the small model's answer was rejected ("" when it was kept).
    reason: str = ""


async def cascade(small: ModelProfile, large: ModelProfile, call: Callable[[ModelProfile], Awaitable[Answer]],
                  check: AnswerCheck) -> CascadeResult:
    first = await call(small)
    reason = check.failure(first)
    if reason is None:
        return CascadeResult(first, small.name, escalated=False)
    return CascadeResult(await call(large), large.name, escalated=True, reason=reason)
