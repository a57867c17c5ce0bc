"""Replicas that share their state through the store (`make bench-replicas`).

Drives a replicated mesh (``make run REPLICAS=2 DB=postgres``: two replicas
each of the store, policy, tools and orchestrator on a throw-away PostgreSQL
cluster) whose inference node is the synthetic backend with a scripted reply:
a ``shell_exec`` call of a command the default policy asks a person about,
after a run of blank tokens, so a turn generates for a few seconds before it
calls the tool. Scenarios:

cancel     a turn started on one orchestrator replica, cancelled through the
           other: every run must stop; delay from Cancel to the run's
           terminal event (p50/p95/max).
approvals  a turn waiting for an approval on one replica, answered through
           the other: every run must go on to its tool result.
kills      SIGKILL of the replica running a turn: Resume through the other
           ends the dead run with a terminal event, the next turn runs on
           the survivor, and across every kill no event is lost or
           duplicated (seqs gapless, each seq once).
s1         chat turns through the round-robin target for a fixed time, on a
           one-replica and a two-replica mesh: ops/s of each and the ratio.

The same scenario functions serve the acceptance tests
(tests/replicas/test_replicated_mesh.py), which assert the outcomes; the
delays are measured here only. Results: bench/results/replicas.json.
    python bench/replicas.py [--quick] [--out PATH]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from llmesh.orchestrator.v1 import orchestrator_pb2 as pb
from llmesh.orchestrator.v1 import orchestrator_pb2_grpc as pb_grpc

from services.common.interceptors import error_info
from tests.support.auth import client_channel
from tests.support.mesh import LaunchedMesh, replicated_mesh

TENANT = "replicas"
# A command no rule covers: the default policy asks a person (unknown_command: prompt).
COMMAND = "deploy-widget --now"
TOOL_CALL = '<tool_call>' + json.dumps({"name": "shell_exec", "arguments": {"command": COMMAND}}) + '</tool_call>'
# Blank tokens first (the reply is stripped before it is parsed), so a turn generates for a while.
REPLY = " " * 150 + TOOL_CALL
TOKENS_PER_S = 50.0
# Short, so a dead replica's lock lapses soon; renewed every third of it while a run goes on.
LOCK_LEASE_MS = 3000
TERMINAL = ("final", "error")
# After a rewind, how long a Resume that gets nothing means the followed turn left nothing in the log.
VOID_TURN_QUIET_S = 3.0


def mesh_env(seqs: int = 64) -> dict[str, str]:
    return {
        "LLMESH_INFERENCE_BACKEND": "synthetic",
        "LLMESH_INFERENCE_SYNTHETIC_TOKENS_PER_S": str(TOKENS_PER_S),
        "LLMESH_INFERENCE_SYNTHETIC_REPLY": REPLY,
        "LLMESH_INFERENCE_N_SEQ_MAX": str(seqs),
        "LLMESH_INFERENCE_MAX_QUEUE": str(seqs * 4),
        "LLMESH_INFERENCE_N_CTX": str(seqs * 2048),
        "LLMESH_INFERENCE_N_BATCH": "65536",
        "LLMESH_ORCHESTRATOR_SESSION_LOCK_LEASE_MS": str(LOCK_LEASE_MS),
        "LLMESH_ORCHESTRATOR_MAX_ACTIVE_RUNS": "1024",
        "LLMESH_TOOLS_SANDBOX": "none",
        "LLMESH_TOOLS_SANDBOX_UID": "-1",
        "LLMESH_TOOLS_SANDBOX_GID": "-1",
        "LLMESH_LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
    }


@contextmanager
def replicated(data_dir: Path, replicas: int = 2, seqs: int = 64) -> Iterator[LaunchedMesh]:
    with replicated_mesh(data_dir, replicas=replicas, env=mesh_env(seqs), http=False) as mesh:
        yield mesh


@dataclass
class Agents:
    """A stub per orchestrator replica (index 0 is replica 1) and one over both, round robin."""

    replicas: list[pb_grpc.AgentServiceStub]
    any: pb_grpc.AgentServiceStub
    channels: list[grpc.aio.Channel] = field(default_factory=list)

    def other(self, index: int) -> pb_grpc.AgentServiceStub:
        return self.replicas[(index + 1) % len(self.replicas)]


@asynccontextmanager
async def agents(mesh: LaunchedMesh) -> AsyncIterator[Agents]:
    channels = [client_channel(t, TENANT, credentials=mesh.credentials, tls=mesh.tls)
                for t in mesh.replica_targets("orchestrator")]
    channels.append(client_channel(mesh.target("orchestrator"), TENANT, credentials=mesh.credentials, tls=mesh.tls))
    try:
        yield Agents([pb_grpc.AgentServiceStub(c) for c in channels[:-1]], pb_grpc.AgentServiceStub(channels[-1]),
                     channels)
    finally:
        for channel in channels:
            await channel.close()


async def new_session(agent: pb_grpc.AgentServiceStub) -> str:
    reply = await agent.CreateSession(pb.CreateSessionRequest(tenant_id=TENANT, tools=["shell_exec"],
                                                              request_id=uuid.uuid4().hex), timeout=30)
    return reply.session.session_id


def run_request(session_id: str, tool_choice: str = "auto", max_steps: int = 2) -> pb.RunRequest:
    return pb.RunRequest(request_id=uuid.uuid4().hex, tenant_id=TENANT, session_id=session_id,
                         user_message="Deploy the widget.",
                         options=pb.RunOptions(max_steps=max_steps, max_tokens=400, tool_choice=tool_choice))


def body_of(event: pb.AgentEvent) -> str:
    return event.WhichOneof("body") or ""


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p95": 0.0, "max": 0.0}
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
    return {"p50": round(statistics.median(ordered), 1), "p95": round(p95, 1), "max": round(ordered[-1], 1)}


async def _bounded(limit: int, jobs: list[Any]) -> list[Any]:
    gate = asyncio.Semaphore(limit)

    async def one(job: Any) -> Any:
        async with gate:
            return await job

    return await asyncio.gather(*(one(j) for j in jobs))


# -- cancel and approvals ---------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    ok: bool
    delay_ms: float = 0.0
    detail: str = ""


class CrossReplicaStep:
    """What one cross-replica run does with its events: None goes on, an Outcome ends the run."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.sent = 0.0  # when the other replica was asked

    async def on_event(self, kind: str, reply: pb.RunResponse, session_id: str,
                       other: pb_grpc.AgentServiceStub) -> Outcome | None:
        raise NotImplementedError

    end_without_outcome = "the stream ended"


async def _cross_replica_run(a: Agents, index: int, timeout_s: float, step: CrossReplicaStep) -> Outcome:
    """A run on replica ``index % replicas``, its events handed to ``step`` with the other replica's stub."""
    owner = index % len(a.replicas)
    session_id = await new_session(a.any)
    call = a.replicas[owner].Run(run_request(session_id), timeout=timeout_s)
    try:
        async for reply in call:
            outcome = await step.on_event(body_of(reply.event), reply, session_id, a.other(owner))
            if outcome is not None:
                return outcome
    except grpc.aio.AioRpcError as exc:
        return Outcome(False, detail=f"{exc.code().name}: {exc.details()}")
    finally:
        call.cancel()
    return Outcome(False, detail=step.end_without_outcome)


def _since_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000 if start else 0.0


class CancelThroughOther(CrossReplicaStep):
    """Once the turn starts on its replica, the other replica is asked to cancel it."""

    end_without_outcome = "the stream ended without a terminal event"

    async def on_event(self, kind: str, reply: pb.RunResponse, session_id: str,
                       other: pb_grpc.AgentServiceStub) -> Outcome | None:
        if kind == "turn_started" and not self.sent:
            self.sent = time.perf_counter()
            answer = await other.Cancel(pb.CancelRequest(request_id=uuid.uuid4().hex, tenant_id=TENANT,
                                                         session_id=session_id), timeout=self.timeout_s)
            if not answer.cancelled:
                return Outcome(False, detail="Cancel answered cancelled=false")
        if kind in TERMINAL:
            reason = reply.event.final.reason if kind == "final" else reply.event.error.reason
            return Outcome(kind == "final" and reason == "cancelled", _since_ms(self.sent), reason)
        if kind in ("approval_required", "tool_call"):
            return Outcome(False, detail=f"the run went on to {kind}")
        return None


class ApproveThroughOther(CrossReplicaStep):
    """The turn's approval is answered through the other replica; the tool's result must follow."""

    end_without_outcome = "the stream ended without a tool result"

    async def on_event(self, kind: str, reply: pb.RunResponse, session_id: str,
                       other: pb_grpc.AgentServiceStub) -> Outcome | None:
        if kind == "approval_required":
            self.sent = time.perf_counter()
            answer = await other.SubmitApproval(pb.SubmitApprovalRequest(
                request_id=uuid.uuid4().hex, tenant_id=TENANT, session_id=session_id,
                approval_id=reply.event.approval_required.approval_id,
                decision=pb.APPROVAL_DECISION_APPROVE_ONCE, approver="bench"), timeout=self.timeout_s)
            if not answer.accepted:
                return Outcome(False, detail="SubmitApproval answered accepted=false")
        elif kind == "tool_result":
            result = reply.event.tool_result
            return Outcome(bool(self.sent), _since_ms(self.sent),
                           "" if self.sent else f"a tool result without an approval: "
                                                f"{result.status} {result.output[:200]!r}")
        elif kind in TERMINAL:
            return Outcome(False, detail=f"the run ended ({kind}) before its tool result")
        return None


async def cross_replica_cancels(mesh: LaunchedMesh, runs: int, concurrency: int = 16,
                                timeout_s: float = 60.0) -> dict[str, Any]:
    async with agents(mesh) as a:
        outcomes = await _bounded(concurrency, [_cross_replica_run(a, i, timeout_s, CancelThroughOther(timeout_s))
                                                for i in range(runs)])
    delays = [o.delay_ms for o in outcomes if o.ok]
    return {"runs": runs, "stopped": len(delays), "failures": [o.detail for o in outcomes if not o.ok][:10],
            **{f"delay_ms_{k}": v for k, v in percentiles(delays).items()}}


async def cross_replica_approvals(mesh: LaunchedMesh, runs: int, concurrency: int = 16,
                                  timeout_s: float = 60.0) -> dict[str, Any]:
    async with agents(mesh) as a:
        outcomes = await _bounded(concurrency, [_cross_replica_run(a, i, timeout_s, ApproveThroughOther(timeout_s))
                                                for i in range(runs)])
    delays = [o.delay_ms for o in outcomes if o.ok]
    return {"runs": runs, "unblocked": len(delays), "approvals_lost": runs - len(delays),
            "failures": [o.detail for o in outcomes if not o.ok][:10],
            **{f"delay_ms_{k}": v for k, v in percentiles(delays).items()}}


# -- kills ------------------------------------------------------------------------------------------------------------

async def _events(stream: Any, until_terminal: bool, timeout_s: float) -> list[pb.AgentEvent]:
    """Events of a Run or Resume stream up to the first terminal one (or the stream's end)."""
    events: list[pb.AgentEvent] = []

    async def read() -> None:
        async for reply in stream:
            events.append(reply.event)
            if until_terminal and body_of(reply.event) in TERMINAL:
                return

    try:
        await asyncio.wait_for(read(), timeout_s)
    except (TimeoutError, grpc.aio.AioRpcError) as exc:
        # What arrived is the answer: the caller judges it (a stream that never ended is a problem there).
        what = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else "timed out"
        events.append(pb.AgentEvent(error=pb.Error(reason="STREAM_FAILED", message=what)))
    finally:
        stream.cancel()
    return events


async def _wait_back(mesh: LaunchedMesh, replica: int, since_line: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    text = f"orchestrator-{replica} restarted and ready"
    while time.monotonic() < deadline:
        if any(text in line for line in mesh.lines[since_line:]):
            return True
        await asyncio.sleep(0.1)
    return False


async def replica_kills(mesh: LaunchedMesh, kills: int, timeout_s: float = 60.0) -> dict[str, Any]:
    """SIGKILL the replica running a turn, ``kills`` times, alternating replicas; check every event.

    The stored log is the record: it must stay gapless with each seq once and
    every run ended exactly once. A replica shows events live before it
    stores them, so what a client saw of a turn whose replica died may be
    missing from the log (its Resume is told so and rewinds to the stored
    end); those events are counted apart, as ``events_shown_not_stored``.
    """
    dead_runs_ended = next_turns_ok = rewound = turns_void = 0
    end_ms: list[float] = []
    problems: list[str] = []
    shown: set[tuple[int, str, str]] = set()  # (seq, run_id, kind) of every event a client was shown

    def saw(events: list[pb.AgentEvent]) -> None:
        shown.update((e.seq, e.run_id, body_of(e)) for e in events if e.seq)

    async with agents(mesh) as a:
        session_id = await new_session(a.any)
        last_seq = 0
        for kill in range(kills):
            victim = kill % len(a.replicas)
            survivor = (victim + 1) % len(a.replicas)
            # The turn starts on the victim; once it streams, the victim dies.
            run = a.replicas[victim].Run(run_request(session_id, tool_choice="none", max_steps=1), timeout=timeout_s)
            first: list[pb.AgentEvent] = []
            async for reply in run:
                first.append(reply.event)
                if body_of(reply.event) == "token":
                    break
            saw(first)
            since = len(mesh.lines)
            mesh.kill("orchestrator", victim + 1)
            killed = time.perf_counter()
            run.cancel()
            # The client resumes after the last event it saw, through the survivor: the log's open run ends.
            after = first[-1].seq if first else last_seq
            tail, rewinds = await resume_to_end(a.replicas[survivor], session_id, after, timeout_s)
            saw(tail)
            rewound += rewinds
            if tail and body_of(tail[-1]) in TERMINAL and tail[-1].seq:
                end_ms.append((time.perf_counter() - killed) * 1000)
                if first and tail[-1].run_id != first[0].run_id and tail[-1].seq < first[0].seq:
                    turns_void += 1  # it died before storing anything: the log's last turn had ended
                else:
                    dead_runs_ended += 1
            else:
                log = await _read_all(a.any, session_id, timeout_s)
                problems.append(f"kill {kill}: Resume after {after} did not end the dead run: "
                                f"{[(body_of(e), e.seq, e.error.message) for e in tail][-2:]}; shown "
                                f"{[(body_of(e), e.seq, e.run_id[:6]) for e in first]}; stored ends "
                                f"{[(body_of(e), e.seq, e.run_id[:6]) for e in log[-3:]]}")
            # The next turn, on the survivor, runs to its end.
            turn = await _events(a.replicas[survivor].Run(run_request(session_id, tool_choice="none", max_steps=1),
                                                          timeout=timeout_s), True, timeout_s)
            saw(turn)
            if turn and body_of(turn[-1]) == "final" and turn[-1].final.reason == "stop":
                next_turns_ok += 1
                last_seq = turn[-1].seq
            else:
                ended = turn[-1] if turn else None
                failed = ended is not None and body_of(ended) == "error"
                why = f" ({ended.error.reason}: {ended.error.message[:200]})" if failed and ended else ""
                problems.append(f"kill {kill}: the next turn ended {[body_of(e) for e in turn][-2:]}{why}")
            if not await _wait_back(mesh, victim + 1, since, timeout_s=120):
                problems.append(f"kill {kill}: orchestrator-{victim + 1} did not come back")
                break
        # Every stored event, read back: gapless, each seq once, every run ended once.
        stored = await _read_all(a.any, session_id, timeout_s)
    seqs = [e.seq for e in stored]
    expected = set(range(1, (max(seqs) if seqs else 0) + 1))
    by_seq = {e.seq: (e.run_id, body_of(e)) for e in stored}
    runs: dict[str, list[str]] = {}
    for event in stored:
        runs.setdefault(event.run_id, []).append(body_of(event))
    unended = [run_id for run_id, kinds in runs.items() if sum(k in TERMINAL for k in kinds) != 1]
    return {"kills": kills, "dead_runs_ended": dead_runs_ended, "next_turns_ok": next_turns_ok,
            # Killed before the turn stored its first event: Resume is told so and the log has no such turn.
            "turns_void": turns_void,
            # Resumes told that the events they had seen live were never stored (Resume after last_stored_seq).
            "resumes_rewound": rewound,
            "events_stored": len(seqs), "events_lost": len(expected - set(seqs)),
            "events_duplicated": len(seqs) - len(set(seqs)),
            "events_shown_not_stored": sum(1 for seq, run_id, kind in shown if by_seq.get(seq) != (run_id, kind)),
            "events_shown": len(shown),
            "runs": len(runs), "runs_not_ended_once": len(unended), "problems": problems[:10],
            # From the SIGKILL to the client's Resume ending (rewinds included).
            **{f"resume_end_ms_{k}": v for k, v in percentiles(end_ms).items()}}


async def resume_to_end(agent: pb_grpc.AgentServiceStub, session_id: str, after_seq: int,
                        timeout_s: float) -> tuple[list[pb.AgentEvent], int]:
    """Resume until a terminal event, as a client should after its replica died.

    A replica shows events live before it stores them; a client that saw some
    a dead replica never stored is told so (ABORTED with ``last_stored_seq``)
    and resumes after that seq. When the turn it was following left nothing
    in the log (it died before its first event was stored), the log's last
    event, at that seq, is the previous turn's end: that event is returned,
    the turn was void. Returns the events and how often it was told to rewind.
    """
    rewinds = 0
    deadline = time.monotonic() + timeout_s
    while True:
        stream = agent.Resume(pb.ResumeRequest(tenant_id=TENANT, session_id=session_id, after_seq=after_seq),
                              timeout=max(1.0, deadline - time.monotonic()))
        events: list[pb.AgentEvent] = []
        try:
            iterator = stream.__aiter__()
            while True:
                # After a rewind the log may hold nothing more: the turn was void, nothing will come.
                wait_s = VOID_TURN_QUIET_S if rewinds and not events else deadline - time.monotonic()
                try:
                    reply = await asyncio.wait_for(iterator.__anext__(), max(0.1, wait_s))
                except TimeoutError:
                    if rewinds and not events:
                        return await _event_at(agent, session_id, after_seq, timeout_s), rewinds
                    raise
                except StopAsyncIteration:
                    return events, rewinds
                events.append(reply.event)
                if body_of(reply.event) in TERMINAL:
                    return events, rewinds
        except grpc.aio.AioRpcError as exc:
            info = error_info(exc)
            stored = info.metadata.get("last_stored_seq") if info is not None else None
            if exc.code() != grpc.StatusCode.ABORTED or stored is None or rewinds >= 3:
                events.append(pb.AgentEvent(error=pb.Error(reason="STREAM_FAILED",
                                                           message=f"{exc.code().name}: {exc.details()}")))
                return events, rewinds
            after_seq, rewinds = int(stored), rewinds + 1
        except TimeoutError:
            events.append(pb.AgentEvent(error=pb.Error(reason="STREAM_FAILED", message="timed out")))
            return events, rewinds
        finally:
            stream.cancel()


async def _event_at(agent: pb_grpc.AgentServiceStub, session_id: str, seq: int,
                    timeout_s: float) -> list[pb.AgentEvent]:
    """The stored event at ``seq`` (as a one-item list; empty when there is none)."""
    stream = agent.Resume(pb.ResumeRequest(tenant_id=TENANT, session_id=session_id, after_seq=max(0, seq - 1)),
                          timeout=timeout_s)
    try:
        reply = await asyncio.wait_for(stream.__aiter__().__anext__(), timeout_s)
        return [reply.event] if reply.event.seq == seq else []
    except (TimeoutError, StopAsyncIteration, grpc.aio.AioRpcError):
        return []
    finally:
        stream.cancel()


async def _read_all(agent: pb_grpc.AgentServiceStub, session_id: str, timeout_s: float) -> list[pb.AgentEvent]:
    """Every event of the session: Resume from 0 until it has nothing more for a moment (it follows the session)."""
    events: list[pb.AgentEvent] = []
    stream = agent.Resume(pb.ResumeRequest(tenant_id=TENANT, session_id=session_id, after_seq=0), timeout=timeout_s)
    iterator = stream.__aiter__()
    try:
        while True:
            try:
                reply = await asyncio.wait_for(iterator.__anext__(), 2.0)
            except (TimeoutError, StopAsyncIteration):
                return events
            events.append(reply.event)
    finally:
        stream.cancel()


# -- S1 throughput ----------------------------------------------------------------------------------------------------

async def s1_throughput(mesh: LaunchedMesh, concurrency: int, duration_s: float) -> dict[str, Any]:
    """Chat turns (a few tokens, no tools), each session's turns on one replica (as Envoy's session
    hash places them; sessions spread over the replicas): ops/s and errors by kind."""
    async with agents(mesh) as a:
        sessions = [await new_session(a.any) for _ in range(concurrency)]
        done = 0
        errors: dict[str, int] = {}
        deadline = time.monotonic() + duration_s

        async def client(index: int, session_id: str) -> None:
            nonlocal done
            agent = a.replicas[index % len(a.replicas)]
            while time.monotonic() < deadline:
                request = run_request(session_id, tool_choice="none", max_steps=1)
                request.options.max_tokens = 4
                events = await _events(agent.Run(request, timeout=30), True, 30)
                last = events[-1] if events else None
                if last is not None and body_of(last) == "final":
                    done += 1
                    continue
                kind = "NO_EVENT" if last is None else (
                    last.error.message.split(":")[0] if last.error.reason == "STREAM_FAILED" else last.error.reason)
                errors[kind] = errors.get(kind, 0) + 1
                await asyncio.sleep(0.05)  # do not spin on a failing mesh

        started = time.monotonic()
        await asyncio.gather(*(client(i, s) for i, s in enumerate(sessions)))
        elapsed = time.monotonic() - started
    return {"concurrency": concurrency, "seconds": round(elapsed, 1), "turns": done,
            "errors": sum(errors.values()), "errors_by_kind": errors,
            "ops_per_s": round(done / elapsed, 2)}


# -- main -------------------------------------------------------------------------------------------------------------

async def _measure(opts: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="llmesh-replicas-") as tmp:
        with replicated(Path(tmp) / "two") as mesh:
            results["cancel"] = await cross_replica_cancels(mesh, opts.runs)
            print(f"cancel: {results['cancel']['stopped']}/{opts.runs} stopped, "
                  f"p95 {results['cancel']['delay_ms_p95']} ms", flush=True)
            results["approvals"] = await cross_replica_approvals(mesh, opts.runs)
            print(f"approvals: {results['approvals']['unblocked']}/{opts.runs} unblocked", flush=True)
            results["kills"] = await replica_kills(mesh, opts.kills)
            print(f"kills: {results['kills']}", flush=True)
            two = await s1_throughput(mesh, opts.s1_concurrency, opts.s1_seconds)
        with replicated(Path(tmp) / "one", replicas=1) as mesh:
            one = await s1_throughput(mesh, opts.s1_concurrency, opts.s1_seconds)
    results["s1"] = {"one_replica": one, "two_replicas": two}
    print(f"S1: one replica {one['ops_per_s']} ops/s, two {two['ops_per_s']} ops/s", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/replicas.json")
    parser.add_argument("--quick", action="store_true", help="20 runs, 5 kills, 10 s of S1 per mesh")
    opts = parser.parse_args()
    opts.runs, opts.kills = (20, 5) if opts.quick else (100, 50)
    opts.s1_concurrency, opts.s1_seconds = 16, (10.0 if opts.quick else 30.0)
    started = time.monotonic()
    results = asyncio.run(_measure(opts))
    one, two = results["s1"]["one_replica"]["ops_per_s"], results["s1"]["two_replicas"]["ops_per_s"]
    summary = {
        "cross_replica_cancel_p95_ms": results["cancel"]["delay_ms_p95"],
        "cancels_not_stopped": results["cancel"]["runs"] - results["cancel"]["stopped"],
        "approvals_lost": results["approvals"]["approvals_lost"],
        "events_lost": results["kills"]["events_lost"],
        "events_duplicated": results["kills"]["events_duplicated"],
        "s1_ops_ratio_two_vs_one_replica": round(two / one, 2) if one else 0.0,
    }
    goals = {"cross_replica_cancel_p95_ms": 1000, "approvals_lost": 0, "events_lost": 0, "events_duplicated": 0}
    out = {**summary, "goals": goals,
           "goals_met": all(summary[k] <= v for k, v in goals.items()) and summary["cancels_not_stopped"] == 0,
           "details": results, "seconds": round(time.monotonic() - started, 1),
           "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
           "note": f"one machine, loopback, synthetic inference at {TOKENS_PER_S:.0f} tokens/s; PostgreSQL store"}
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
