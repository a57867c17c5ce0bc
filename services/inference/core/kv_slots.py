"""Which sequence of the KV cache holds what, and who gets a sequence next.

A sequence is either busy (a request decodes in it), idle with a session
(kept so the session's next turn prefills only its new tokens) or free (its
cells may still hold the prompt of a finished anonymous request, which a new
request with the same prefix can reuse). When sequences or cells run out, the
least recently used idle session is evicted: its state is saved (bytes from
the backend) so a later turn restores it instead of prefilling it again.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from services.inference.core.text import common_prefix_len


@dataclass
class Slot:
    seq_id: int
    #: Tokens whose KV cells this sequence holds, positions 0..len-1.
    tokens: list[int] = field(default_factory=list)
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
    def __init__(self, num_sequences: int, num_cells: int, saved_max_bytes: int = 256 << 20) -> None:
        self.num_cells = num_cells
        self.slots = [Slot(seq_id=i) for i in range(num_sequences)]
        self._by_session: dict[str, Slot] = {}
        self.saved: OrderedDict[str, SavedSession] = OrderedDict()
        self.saved_max_bytes = saved_max_bytes
        self._saved_bytes = 0

    # -- queries ------------------------------------------------------------

    @property
    def used_cells(self) -> int:
        return sum(len(s.tokens) for s in self.slots)

    @property
    def free_cells(self) -> int:
        return self.num_cells - self.used_cells

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

    # -- allocation ---------------------------------------------------------

    def pick_free(self, prompt: list[int]) -> Slot | None:
        """A free sequence, preferring the one whose stale cells share the longest prefix."""
        free = [s for s in self.slots if s.busy_key is None and not s.session_id]
        if not free:
            return None
        def reuse(slot: Slot) -> tuple[int, int]:
            shared = common_prefix_len(slot.tokens, prompt)
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

    @staticmethod
    def _reset(slot: Slot) -> None:
        slot.tokens = []
        slot.session_id = ""
        slot.prompt_text = ""
        slot.prompt_tokens = []
        slot.busy_key = None
