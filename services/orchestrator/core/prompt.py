"""PromptPipeline: history -> Gemma-formatted token ids, tokenizing only what is new.

Every history item renders to a segment that starts and ends on a special
token (`<start_of_turn>`, `<end_of_turn>\\n`), so tokenizing segments one by
one gives the same ids as tokenizing the whole prompt, and a segment seen
before comes from the cache. A turn therefore sends to the tokenizer only the
items added since the last turn.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from services.gemma.chat_format import GENERATION_PROMPT
from services.orchestrator.core.history import HistoryItem
from services.orchestrator.core.ports import InferencePort


@dataclass(frozen=True)
class Prompt:
    tokens: tuple[int, ...]
    # Token count per item, in order (the real counts, from the tokenizer).
    item_tokens: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)


class PromptPipeline:
    def __init__(self, inference: InferencePort, *, model: str = "", cache_size: int = 4096) -> None:
        self._inference = inference
        self._model = model
        self._cache: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._cache_size = cache_size
        self._bos: tuple[int, ...] | None = None
        self._suffix: tuple[int, ...] | None = None
        self.num_tokenize_calls = 0

    async def _tokenize(self, text: str, add_special: bool = False) -> tuple[int, ...]:
        self.num_tokenize_calls += 1
        return tuple(await self._inference.tokenize(text, model=self._model, add_special=add_special))

    async def segment(self, text: str) -> tuple[int, ...]:
        key = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        tokens = await self._tokenize(text)
        self._cache[key] = tokens
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return tokens

    async def count(self, item: HistoryItem) -> int:
        return len(item.tokens) if item.tokens else len(await self.segment(item.render()))

    async def item_tokens(self, item: HistoryItem) -> tuple[int, ...]:
        return item.tokens or await self.segment(item.render())

    async def _fixed(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if self._bos is None:
            self._bos = await self._tokenize("", add_special=True)
        if self._suffix is None:
            self._suffix = await self._tokenize(GENERATION_PROMPT)
        return self._bos, self._suffix

    async def overhead_tokens(self) -> int:
        bos, suffix = await self._fixed()
        return len(bos) + len(suffix)

    async def build(self, items: Sequence[HistoryItem]) -> Prompt:
        bos, suffix = await self._fixed()
        tokens: list[int] = list(bos)
        counts: list[int] = []
        for item in items:
            seg = await self.item_tokens(item)
            tokens.extend(seg)
            counts.append(len(seg))
        tokens.extend(suffix)
        return Prompt(tokens=tuple(tokens), item_tokens=tuple(counts))

    async def build_text(self, text: str) -> tuple[int, ...]:
        """A one-off prompt (summaries): BOS + one user turn + generation prompt."""
        bos, suffix = await self._fixed()
        return bos + await self.segment(HistoryItem(kind="user", text=text).render()) + suffix
