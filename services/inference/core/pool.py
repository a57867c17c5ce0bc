"""Engines of one node (one per device) and which one serves a request."""
from __future__ import annotations

from collections.abc import Sequence

from services.inference.core.engine import Engine, RequestHandle
from services.inference.core.types import GenerateSpec, LoadReport


class EnginePool:
    def __init__(self, engines: Sequence[Engine]) -> None:
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        self.engines = list(engines)

    @property
    def primary(self) -> Engine:
        return self.engines[0]

    def route(self, session_id: str) -> Engine:
        """The engine holding the session's cache, else the least loaded one."""
        if session_id:
            for engine in self.engines:
                if engine.holds_session(session_id):
                    return engine

        def pressure(engine: Engine) -> tuple[float, float]:
            load = engine.load()
            busy = (load.queue_depth + load.num_running) / max(1, load.num_sequences)
            return busy, load.kv_usage

        return min(self.engines, key=pressure)

    def submit(self, spec: GenerateSpec, *, require_session: bool = False) -> RequestHandle:
        return self.route(spec.session_id).submit(spec, require_session=require_session)

    async def release_session(self, session_id: str) -> bool:
        released = [await engine.release_session(session_id) for engine in self.engines]
        return any(released)

    def load(self) -> LoadReport:
        loads = [engine.load() for engine in self.engines]
        total_cells = sum(load.kv_total_cells for load in loads)
        return LoadReport(
            queue_depth=sum(load.queue_depth for load in loads),
            num_running=sum(load.num_running for load in loads),
            num_free_sequences=sum(load.num_free_sequences for load in loads),
            num_sequences=sum(load.num_sequences for load in loads),
            kv_used_cells=sum(load.kv_used_cells for load in loads),
            kv_total_cells=total_cells,
            tokens_per_second=sum(load.tokens_per_second for load in loads),
            num_sessions=sum(load.num_sessions for load in loads),
            kv_cells_saved=sum(load.kv_cells_saved for load in loads),
            prefix_blocks=tuple(dict.fromkeys(h for load in loads for h in load.prefix_blocks)),
            prefix_block_chars=loads[0].prefix_block_chars,
        )

    def start(self) -> None:
        for engine in self.engines:
            engine.start()

    def stop(self) -> None:
        for engine in self.engines:
            engine.stop()
        for engine in self.engines:
            engine.backend.close()
