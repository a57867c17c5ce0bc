"""KV slot table: free sequences with reusable prefixes, LRU eviction, saved states."""
from dataclasses import replace

from services.inference.core.kv_slots import KVSlotTable, SavedSession


def test_free_slot_with_longest_shared_prefix_is_preferred():
    table = KVSlotTable(num_sequences=3, num_cells=100)
    table.append(table.slots[0], [1, 2, 9])
    table.append(table.slots[1], [1, 2, 3, 4])
    assert table.pick_free([1, 2, 3, 5]).seq_id == 1


def test_sessions_keep_their_slot_and_lru_idle_one_is_evicted():
    table = KVSlotTable(num_sequences=2, num_cells=100)
    for seq, (session, t) in enumerate([("a", 1.0), ("b", 2.0)]):
        slot = table.slots[seq]
        table.bind(slot, key=seq + 1, session_id=session, now=t)
        table.append(slot, [seq] * 10)
        table.release(slot, now=t)
    assert table.resident("a").seq_id == 0
    assert table.pick_free([1]) is None
    victim = table.lru_idle_session()
    assert victim.session_id == "a"
    eviction = table.evict(victim)
    assert eviction.tokens == [0] * 10
    assert not table.knows("a")
    table.store_saved(eviction, b"state")
    assert table.knows("a") and table.num_sessions == 2
    assert table.take_saved("a").state == b"state"


def saved_entry_bytes(state: bytes) -> int:
    return SavedSession([], "", [], state).footprint


def test_saved_states_are_bounded_by_bytes_oldest_dropped_first():
    table = KVSlotTable(num_sequences=1, num_cells=10, saved_max_bytes=2 * saved_entry_bytes(b"12345"))
    for session in ("a", "b", "c"):
        slot = table.slots[0]
        table.bind(slot, key=1, session_id=session, now=0)
        table.release(slot, now=0)
        table.store_saved(table.evict(slot), b"12345")
    assert list(table.saved) == ["b", "c"]


def test_the_saved_budget_counts_token_lists_and_text_not_only_the_state():
    # A small model's state can be smaller than the tokens kept beside it.
    entry = SavedSession(list(range(1000)), "x" * 3000, list(range(1000)), b"s" * 2000)
    assert entry.footprint >= 2000 + 3000 + 2 * 1000 * 8
    table = KVSlotTable(num_sequences=1, num_cells=4096, saved_max_bytes=3 * entry.footprint)
    for session in "abcdef":
        slot = table.slots[0]
        table.bind(slot, key=1, session_id=session, now=0)
        table.append(slot, list(range(1000)))
        table.release(slot, now=0)
        eviction = table.evict(slot)
        table.store_saved(replace(eviction, prompt_text="x" * 3000, prompt_tokens=list(range(1000))), b"s" * 2000)
        assert table._saved_bytes == sum(e.footprint for e in table.saved.values()) <= table.saved_max_bytes
    assert list(table.saved) == ["d", "e", "f"]
    # Saving a session again replaces its entry instead of counting it twice.
    table.store_saved(replace(eviction, prompt_text="x" * 3000, prompt_tokens=list(range(1000))), b"s" * 2000)
    assert table._saved_bytes == sum(e.footprint for e in table.saved.values())


def test_busy_slot_is_never_an_eviction_victim():
    table = KVSlotTable(num_sequences=1, num_cells=10)
    table.bind(table.slots[0], key=1, session_id="a", now=0)
    assert table.lru_idle_session() is None
    assert table.num_free == 0
