"""KV slot table: free sequences with reusable prefixes, LRU eviction, saved states."""
from services.inference.core.kv_slots import KVSlotTable


def test_free_slot_with_longest_shared_prefix_is_preferred():
    table = KVSlotTable(num_sequences=3, num_cells=100)
    table.slots[0].tokens = [1, 2, 9]
    table.slots[1].tokens = [1, 2, 3, 4]
    assert table.pick_free([1, 2, 3, 5]).seq_id == 1


def test_sessions_keep_their_slot_and_lru_idle_one_is_evicted():
    table = KVSlotTable(num_sequences=2, num_cells=100)
    for seq, (session, t) in enumerate([("a", 1.0), ("b", 2.0)]):
        slot = table.slots[seq]
        table.bind(slot, key=seq + 1, session_id=session, now=t)
        slot.tokens = [seq] * 10
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


def test_saved_states_are_bounded_by_bytes_oldest_dropped_first():
    table = KVSlotTable(num_sequences=1, num_cells=10, saved_max_bytes=10)
    for session in ("a", "b", "c"):
        slot = table.slots[0]
        table.bind(slot, key=1, session_id=session, now=0)
        table.release(slot, now=0)
        table.store_saved(table.evict(slot), b"12345")
    assert list(table.saved) == ["b", "c"]


def test_busy_slot_is_never_an_eviction_victim():
    table = KVSlotTable(num_sequences=1, num_cells=10)
    table.bind(table.slots[0], key=1, session_id="a", now=0)
    assert table.lru_idle_session() is None
    assert table.num_free == 0
