"""The hash chain detects edited, deleted and reordered rows."""
from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from services.common.errors import Aborted, Unavailable
from services.policy.adapters.memory_audit_log import MemoryAuditLog
from services.policy.core.audit import AuditChain, AuditRecord, entry_hash
from tests.policy.builders import TEST_KEY
from tests.support.waiting import wait_until


async def _chain_with(n: int) -> tuple[AuditChain, MemoryAuditLog]:
    log = MemoryAuditLog()
    chain = AuditChain(log, TEST_KEY)
    for k in range(n):
        await chain.append("acme", {"type": "evaluate", "n": k})
    return chain, log


async def test_intact_chain_verifies() -> None:
    chain, log = await _chain_with(5)
    report = await chain.verify("acme")
    assert report.ok and report.num_checked == 5 and report.first_broken_seq == 0
    rows = log.rows["acme"]
    assert rows[0].prev_hash == "" and all(rows[k].prev_hash == rows[k - 1].entry_hash for k in range(1, 5))
    assert rows[2].entry_hash == entry_hash(TEST_KEY, 3, rows[1].entry_hash, rows[2].payload_json)


async def test_edited_payload_is_named() -> None:
    chain, log = await _chain_with(5)
    row = log.rows["acme"][2]
    edited = json.loads(row.payload_json) | {"decision": "allow"}
    log.rows["acme"][2] = replace(row, payload_json=json.dumps(edited, sort_keys=True))
    report = await chain.verify("acme")
    assert not report.ok and report.first_broken_seq == 3 and "altered" in report.reason


async def test_rehashed_row_without_the_key_breaks_the_next_link() -> None:
    chain, log = await _chain_with(4)
    row = log.rows["acme"][1]
    forged_payload = row.payload_json.replace('"n":1', '"n":99')
    forged = replace(row, payload_json=forged_payload,
                     entry_hash=entry_hash(b"guessed-key-0123456789", 2, row.prev_hash, forged_payload))
    log.rows["acme"][1] = forged
    report = await chain.verify("acme")
    assert not report.ok and report.first_broken_seq == 2


async def test_deleted_middle_row_is_named() -> None:
    chain, log = await _chain_with(5)
    del log.rows["acme"][1]
    report = await chain.verify("acme")
    assert not report.ok and report.first_broken_seq == 2 and "missing" in report.reason


async def test_deleted_tail_row_is_detected() -> None:
    chain, log = await _chain_with(5)
    log.rows["acme"].pop()
    report = await chain.verify("acme")
    assert not report.ok and report.first_broken_seq == 5


async def test_append_retries_when_another_writer_moved_the_head() -> None:
    log = MemoryAuditLog()
    writer_a, writer_b = AuditChain(log, TEST_KEY), AuditChain(log, TEST_KEY)
    await writer_a.append("acme", {"n": 1})
    await writer_b.append("acme", {"n": 2})
    stored = await writer_a.append("acme", {"n": 3})  # its cached head is stale
    assert stored.seq == 3
    assert (await writer_a.verify("acme")).ok


async def test_memory_log_refuses_a_record_that_does_not_extend_the_head() -> None:
    log = MemoryAuditLog()
    try:
        await log.append([AuditRecord("acme", 2, "", "h", "{}")])
    except Aborted:
        return
    raise AssertionError("expected Aborted")


async def test_tenants_have_separate_chains() -> None:
    chain, log = await _chain_with(2)
    await chain.append("globex", {"n": 0})
    assert [r.seq for r in log.rows["globex"]] == [1]
    assert (await chain.verify("globex")).ok and (await chain.verify("acme")).ok


class SlowLog(MemoryAuditLog):
    """A store with a round trip: appends take a while, so decisions pile up behind them."""

    def __init__(self, fail_next: int = 0) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.fail_next = fail_next

    async def append(self, records):
        await asyncio.sleep(0.01)
        self.calls.append(len(records))
        if self.fail_next:
            self.fail_next -= 1
            raise Unavailable("store is down")
        return await super().append(records)


async def test_concurrent_decisions_share_writes_and_the_chain_still_verifies() -> None:
    log = SlowLog()
    chain = AuditChain(log, TEST_KEY)
    stored = await asyncio.gather(*(chain.append("acme", {"n": i}) for i in range(200)))
    assert sorted(r.seq for r in stored) == list(range(1, 201))
    assert [json.loads(r.payload_json)["n"] for r in sorted(stored, key=lambda r: r.seq)] == list(range(200))
    assert len(log.calls) < 20 and sum(log.calls) == 200, log.calls
    assert (await chain.verify("acme")).ok


async def test_a_failed_write_fails_its_waiters_and_the_next_ones_still_land() -> None:
    log = SlowLog(fail_next=1)
    chain = AuditChain(log, TEST_KEY)
    first = await asyncio.gather(*(chain.append("acme", {"n": i}) for i in range(5)), return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in first)
    again = await chain.append("acme", {"n": "after"})
    assert again.seq == 1 and (await chain.verify("acme")).ok


async def test_a_caller_that_goes_away_does_not_take_its_entry_with_it() -> None:
    log = SlowLog()
    chain = AuditChain(log, TEST_KEY)
    waiter = asyncio.ensure_future(chain.append("acme", {"n": 1}))
    await asyncio.sleep(0)
    waiter.cancel()
    # The write goes on without its caller and lands.
    assert await wait_until(lambda: log.rows.get("acme"))
    assert [json.loads(r.payload_json)["n"] for r in log.rows["acme"]] == [1]
    assert waiter.cancelled()
