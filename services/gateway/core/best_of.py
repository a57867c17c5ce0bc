"""``best_of`` on /v1/completions: which of the decoded candidates come back.

As OpenAI's legacy Completions API defines it, the server generates
``best_of`` candidates and returns the ``n`` "best": those with the highest
log probability per token. The node decodes the candidates as forks of one
prefilled prompt (GenerateRequest.n) and reports each generated token's
log-probability; this ranks them by the mean.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

from services.gateway.core.ports import TokenLogprob


def mean_logprob(tokens: Sequence[TokenLogprob]) -> float:
    """Log probability per token; -inf for a candidate with no scored token (or a NaN), so it ranks last."""
    if not tokens:
        return -math.inf
    mean = math.fsum(t.logprob for t in tokens) / len(tokens)
    return -math.inf if math.isnan(mean) else mean


def rank_best(candidates: Sequence[Sequence[TokenLogprob]], n: int) -> list[int]:
    """Indexes of the ``n`` best candidates (each its tokens), highest mean log-probability first.

    Equal scores keep the candidates' order, so the ranking repeats for the same decode.
    """
    scores = [mean_logprob(tokens) for tokens in candidates]
    return sorted(range(len(candidates)), key=lambda i: -scores[i])[:max(n, 0)]
