"""The load harness at toy scale: the whole mesh as processes, each scenario once, nothing lost."""
from __future__ import annotations

import pytest

from bench import load
from bench.load_mesh import MeshOptions, running_mesh

pytestmark = pytest.mark.slow


async def test_s1_s2_s3_at_toy_scale_lose_nothing_and_fail_nothing() -> None:
    opts = load.parse_args(["--quick"])
    opts.s2_idle, opts.s2_active, opts.s2_seconds, opts.s2_idle_s = 40, 10, 2.0, 1.0
    opts.s3_tasks, opts.s3_workers = 200, 4
    # Two nodes behind the orchestrator's balancer, as `make bench-load` runs the mesh (bench/load.py --nodes).
    async with running_mesh(MeshOptions(nodes=2, tokens_per_s=opts.tokens_per_s)) as mesh:
        s1 = await load.s1_level(mesh, concurrency=4, duration_s=3.0, opts=opts)
        s2 = await load.scenario_s2(mesh, opts)
        s3 = await load.scenario_s3(mesh, opts)
    assert s1["error_rate"] == 0.0, s1["error_samples"]
    assert s1["num_turns"] > 0 and s1["num_tool_batches"] > 0
    assert s2["watchers_seen_by_store"] == 50
    assert s2["events_delivered"] == s2["events_appended"] * 1  # one watcher per active session
    assert s2["store_reads_per_s_idle"] < 5, "idle subscribers read the store"
    assert s3["tasks_done"] == 200 and s3["duplicates"] == 0 and s3["tasks_lost"] == 0
