"""Small-then-large cascade: answer with the small model, escalate when its answer fails a check.

The check is deliberately mechanical: a grammar (or any validator) the answer
must satisfy, length bounds, and the mean log-probability of its tokens
(low means the model was guessing). Only a failed check pays for the large model.
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from services.common.errors import InvalidArgument
from services.common.settings import json_object
from services.inference.client.routing import ModelProfile, check_entry_keys


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


@dataclass(frozen=True)
class CascadeSpec:
    """A model name that answers with ``small`` and escalates to ``large`` when ``check`` fails."""

    small: str
    large: str
    check: AnswerCheck


_CASCADE_FIELDS = {"small": str, "large": str, "min_mean_logprob": (int, float), "min_chars": int, "max_chars": int}


def parse_cascades(text: str, field_name: str = "model_cascades") -> dict[str, CascadeSpec]:
    """``{"name": {"small": "a", "large": "b", "min_mean_logprob": -1.0, "min_chars": 1}}`` -> cascades."""
    cascades = {}
    for name, values in json_object(text, field_name).items():
        if not isinstance(values, dict) or not all(isinstance(values.get(k), str) and values.get(k)
                                                   for k in ("small", "large")):
            raise InvalidArgument(f"{field_name}: {name!r} needs \"small\" and \"large\" model names",
                                  field=field_name)
        if name in (values["small"], values["large"]):
            raise InvalidArgument(f"{field_name}: {name!r} cannot name itself as a step", field=field_name)
        check_entry_keys(values, _CASCADE_FIELDS, name, field_name)
        check = {k: v for k, v in values.items() if k not in ("small", "large")}
        cascades[name] = CascadeSpec(values["small"], values["large"],
                                     AnswerCheck(require_logprobs="min_mean_logprob" in check, **check))
    for name, spec in cascades.items():
        if spec.small in cascades or spec.large in cascades:
            raise InvalidArgument(f"{field_name}: {name!r} has a cascade as a step", field=field_name)
    return cascades
