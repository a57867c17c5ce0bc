"""Which sequence of the KV cache holds what, and who gets a sequence next.

A sequence is either busy (a request decodes in it), idle with a session
(kept so the session's next turn prefills only its new tokens) or free (its
cells may still hold the prompt of a finished anonymous request, which a new
request with the same prefix can reuse). When sequences or cells run out, the
least recently used idle session is evicted: its state is saved (bytes from
the backend) so a later turn restores it instead of prefilling it again.

The table models the unified KV cache cell by cell: a sequence holds a list
of cell ids, and a cell shared by several sequences (a common prefix given to
a new sequence by ``share``, which is ``llama_memory_seq_cp`` on the model)
is counted once and freed when its last sequence drops it. Token mutations go
through the table so the cell counts and the prefix index stay exact.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from services.inference.core.prefixes import DEFAULT_BLOCK_CHARS, TokenBlockIndex, summarize, text_prefix_hashes
from services.inference.core.text import common_prefix_len

#: Tokens per block of the prefix index: a new sequence shares whole blocks of another's prefix, and more.
DEFAULT_BLOCK_TOKENS = 32


@dataclass
class Slot:
    seq_id: int
    #: Tokens whose KV cells this sequence holds, positions 0..len-1 (change them through the table).
    tokens: list[int] = field(default_factory=list)
    #: The cell holding each token; a cell may be shared with other sequences.
    cells: list[int] = field(default_factory=list)
    #: Tenant whose request put the cells here: only its requests reuse or share them.
    tenant_id: str = ""
    #: Routing summary: text block hashes of the prompt these cells came from.
    text_blocks: list[int] = field(default_factory=list)
    session_id: str = ""
    #: Prompt text and its tokens of the session's last turn, so a follow-up
    #: whose text extends it tokenizes only the new part.
    prompt_text: str = ""
    prompt_tokens: list[int] = field(default_factory=list)
    busy_key: int | None = None
    last_used: float = 0.0


@dataclass
class SavedSession:
    tokens: list[int]
    prompt_text: str
    prompt_tokens: list[int]
    state: bytes

    @property
    def footprint(self) -> int:
        """Bytes this entry holds: the state plus its token lists and text.

        A real model's state (~13 KB a token) dwarfs the rest, but a small or
        synthetic one does not, so the budget counts everything.
        """
        return (len(self.state) + len(self.prompt_text) + _POINTER_BYTES * (len(self.tokens) + len(self.prompt_tokens))
                + _ENTRY_OVERHEAD_BYTES)


# A list slot per token id (small ints are shared), and the fixed cost of an
# entry (dataclass, lists, dict slot).
_POINTER_BYTES = 8
_ENTRY_OVERHEAD_BYTES = 400


@dataclass(frozen=True)
class Eviction:
    """An idle session pushed out of its sequence; the caller saves its state."""

    seq_id: int
    session_id: str
    tokens: list[int]
    prompt_text: str
    prompt_tokens: list[int]


class KVSlotTable:
    def __init__(self, num_sequences: int, num_cells: int, saved_max_bytes: int = 256 << 20,
                 block_tokens: int = DEFAULT_BLOCK_TOKENS, block_chars: int = DEFAULT_BLOCK_CHARS) -> None:
        self.num_cells = num_cells
        self.slots = [Slot(seq_id=i) for i in range(num_sequences)]
        self._by_session: dict[str, Slot] = {}
        self.saved: OrderedDict[str, SavedSession] = OrderedDict()
        self.saved_max_bytes = saved_max_bytes
        self._saved_bytes = 0
        self.block_chars = block_chars
        self.index = TokenBlockIndex(block_tokens)
        # Cell id -> how many sequences hold it.
        self._refs: dict[int, int] = {}
        self._cell_ids = itertools.count()

    # -- queries ------------------------------------------------------------

    @property
    def used_cells(self) -> int:
        """Distinct cells in use: a prefix shared by several sequences counts once."""
        return len(self._refs)

    @property
    def held_cells(self) -> int:
        """Cells the sequences would use if none were shared."""
        return sum(len(s.tokens) for s in self.slots)

    @property
    def free_cells(self) -> int:
        return self.num_cells - self.used_cells

    def exclusive_cells(self, slot: Slot) -> int:
        """Cells that dropping ``slot`` would free (those no other sequence shares)."""
        return sum(1 for cell in slot.cells if self._refs[cell] == 1)

    @property
    def num_free(self) -> int:
        return sum(1 for s in self.slots if s.busy_key is None and not s.session_id)

    @property
    def num_sessions(self) -> int:
        return len(self._by_session) + len(self.saved)

    def resident(self, session_id: str) -> Slot | None:
        return self._by_session.get(session_id)

    def knows(self, session_id: str) -> bool:
        return session_id in self._by_session or session_id in self.saved

    def session_prompt(self, session_id: str) -> tuple[str, list[int]]:
        """The last prompt text of a session and its tokens ("" when unknown)."""
        slot = self._by_session.get(session_id)
        if slot is not None:
            return slot.prompt_text, slot.prompt_tokens
        saved = self.saved.get(session_id)
        if saved is not None:
            return saved.prompt_text, saved.prompt_tokens
        return "", []

    def reusable_prefix(self, slot: Slot, prompt: Sequence[int], tenant_id: str) -> int:
        """Leading tokens of ``prompt`` whose cells ``slot`` holds and ``tenant_id`` may use."""
        return common_prefix_len(slot.tokens, prompt) if slot.tenant_id == tenant_id else 0

    def longest_holder(self, prompt: Sequence[int], tenant_id: str,
                       exclude: Collection[int] = ()) -> tuple[Slot | None, int]:
        """The sequence (not in ``exclude``) holding the longest prefix of ``prompt`` for ``tenant_id``,
        found through the block index, and how many tokens it shares."""
        _, seq_ids = self.index.holders(tenant_id, prompt)
        best: Slot | None = None
        best_len = 0
        for seq_id in sorted(seq_ids):
            slot = self.slots[seq_id]
            if seq_id in exclude:
                continue
            shared = self.reusable_prefix(slot, prompt, tenant_id)
            if shared > best_len:
                best, best_len = slot, shared
        return best, best_len

    def prefix_summary(self, limit: int) -> list[int]:
        """Text block hashes of the prompts held in cells, for a router (see ``prefixes.summarize``)."""
        return summarize((s.text_blocks for s in self.slots if s.tokens), limit)

    # -- cells --------------------------------------------------------------

    def append(self, slot: Slot, tokens: Sequence[int]) -> None:
        """``tokens`` got new cells in ``slot`` (decoded, or restored from a saved state)."""
        if not tokens:
            return
        unchanged = len(slot.tokens)
        slot.tokens.extend(tokens)
        for _ in tokens:
            cell = next(self._cell_ids)
            self._refs[cell] = 1
            slot.cells.append(cell)
        self.index.update(slot.seq_id, slot.tenant_id, slot.tokens, unchanged)

    def truncate(self, slot: Slot, keep: int) -> int:
        """Drop the cells of ``slot`` at positions >= keep; returns how many it held there."""
        dropped = len(slot.tokens) - keep
        if dropped <= 0:
            return 0
        for cell in slot.cells[keep:]:
            refs = self._refs[cell] - 1
            if refs:
                self._refs[cell] = refs
            else:
                del self._refs[cell]
        del slot.cells[keep:]
        del slot.tokens[keep:]
        self.index.update(slot.seq_id, slot.tenant_id, slot.tokens, keep)
        if not slot.tokens:
            slot.text_blocks = []
        return dropped

    def share(self, source: Slot, slot: Slot, upto: int) -> None:
        """``slot`` (empty) takes the cells of ``source`` at positions < upto: shared, not copied."""
        assert not slot.tokens, "share into a sequence that holds cells"
        slot.tenant_id = source.tenant_id
        slot.tokens = source.tokens[:upto]
        slot.cells = source.cells[:upto]
        for cell in slot.cells:
            self._refs[cell] += 1
        self.index.update(slot.seq_id, slot.tenant_id, slot.tokens, 0)

    def adopt(self, slot: Slot, tenant_id: str, prompt_text: str) -> None:
        """``slot`` now holds cells for ``tenant_id`` (whose cells it must hold already, if any),
        coming from ``prompt_text`` (for the routing summary)."""
        assert not slot.tokens or slot.tenant_id == tenant_id, "cells of another tenant"
        if slot.tenant_id != tenant_id:
            slot.tenant_id = tenant_id
        slot.text_blocks = text_prefix_hashes(tenant_id, prompt_text, self.block_chars) if prompt_text else []

    # -- allocation ---------------------------------------------------------

    def pick_free(self, prompt: list[int], tenant_id: str = "") -> Slot | None:
        """A free sequence, preferring the one whose stale cells share the longest prefix."""
        free = [s for s in self.slots if s.busy_key is None and not s.session_id]
        if not free:
            return None
        def reuse(slot: Slot) -> tuple[int, int]:
            shared = self.reusable_prefix(slot, prompt, tenant_id)
            # Sharing only BOS saves nothing; then keep cached prefixes alive
            # by taking the emptiest sequence instead.
            return (shared if shared > 1 else 0, -len(slot.tokens))

        return max(free, key=reuse)

    def lru_idle_session(self, exclude: str = "") -> Slot | None:
        idle = [s for s in self.slots if s.busy_key is None and s.session_id and s.session_id != exclude]
        return min(idle, key=lambda s: s.last_used) if idle else None

    def evict(self, slot: Slot) -> Eviction:
        """Detach an idle session from its sequence; the sequence becomes free and empty."""
        assert slot.busy_key is None and slot.session_id
        eviction = Eviction(slot.seq_id, slot.session_id, list(slot.tokens), slot.prompt_text,
                            list(slot.prompt_tokens))
        del self._by_session[slot.session_id]
        self._reset(slot)
        return eviction

    def clear_free(self, slot: Slot) -> int:
        """Forget the stale cells of a free sequence; returns how many were held."""
        n = len(slot.tokens)
        self._reset(slot)
        return n

    def bind(self, slot: Slot, key: int, session_id: str, now: float) -> None:
        """Give ``slot`` to request ``key`` (and to its session, if any)."""
        slot.busy_key = key
        slot.last_used = now
        if session_id and slot.session_id != session_id:
            slot.session_id = session_id
            self._by_session[session_id] = slot

    def release(self, slot: Slot, now: float) -> None:
        """The request in ``slot`` ended; a session keeps it, otherwise it turns free."""
        slot.busy_key = None
        slot.last_used = now

    def drop_session(self, session_id: str) -> Slot | None:
        """Forget a session (resident or saved); returns its slot if the cells must be cleared."""
        self.take_saved(session_id)
        slot = self._by_session.pop(session_id, None)
        if slot is None:
            return None
        slot.session_id = ""
        slot.prompt_text = ""
        slot.prompt_tokens = []
        return slot

    # -- saved states -------------------------------------------------------

    def store_saved(self, eviction: Eviction, state: bytes) -> None:
        entry = SavedSession(eviction.tokens, eviction.prompt_text, eviction.prompt_tokens, state)
        if entry.footprint > self.saved_max_bytes:
            return
        self.take_saved(eviction.session_id)
        self.saved[eviction.session_id] = entry
        self._saved_bytes += entry.footprint
        while self._saved_bytes > self.saved_max_bytes:
            _, oldest = self.saved.popitem(last=False)
            self._saved_bytes -= oldest.footprint

    def take_saved(self, session_id: str) -> SavedSession | None:
        saved = self.saved.pop(session_id, None)
        if saved is not None:
            self._saved_bytes -= saved.footprint
        return saved

    def _reset(self, slot: Slot) -> None:
        self.truncate(slot, 0)
        slot.tenant_id = ""
        slot.text_blocks = []
        slot.session_id = ""
        slot.prompt_text = ""
        slot.prompt_tokens = []
        slot.busy_key = None
