"""PolicyPort over gRPC: llmesh.policy.v1.PolicyService/Evaluate."""
from __future__ import annotations

import grpc
from llmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from services.common.clients import make_channel
from services.common.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.common.identity import Identity
from services.common.rpc_errors import domain_error_from_rpc
from services.tools.core.ports import PolicyDecision, PolicyQuery, PolicyUnavailable, PolicyVerdict

_DECISIONS = {
    policy_pb2.DECISION_ALLOW: PolicyDecision.ALLOW,
    policy_pb2.DECISION_PROMPT: PolicyDecision.PROMPT,
    policy_pb2.DECISION_FORBIDDEN: PolicyDecision.FORBIDDEN,
}

# Policy's own answers about this call; anything else means policy could not judge it.
REFUSALS = (PermissionDenied, InvalidArgument, NotFound, FailedPrecondition)


class GrpcPolicyClient:
    def __init__(self, target: str, timeout_s: float, identity: Identity | None = None) -> None:
        self.target = target
        self.identity = identity
        self.timeout_s = timeout_s
        # Opened on first use: a grpc.aio channel belongs to the loop it is made
        # in, and the app is built before the server's loop runs.
        self.channel: grpc.aio.Channel | None = None
        self._stub: policy_pb2_grpc.PolicyServiceStub | None = None

    @property
    def stub(self) -> policy_pb2_grpc.PolicyServiceStub:
        if self._stub is None:
            self.channel = make_channel(self.target, self.identity)
            self._stub = policy_pb2_grpc.PolicyServiceStub(self.channel)
        return self._stub

    async def evaluate(self, query: PolicyQuery) -> PolicyVerdict:
        request = policy_pb2.EvaluateRequest(
            tenant_id=query.tenant_id, session_id=query.session_id, role=query.role, tool_name=query.tool_name,
            arguments_json=query.arguments_json, workspace_root=query.workspace_root,
            risk_level=query.risk_level, approval_id=query.approval_id)
        try:
            response = await self.stub.Evaluate(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            error = domain_error_from_rpc(exc, service="policy")
            if isinstance(error, REFUSALS):
                # Policy answered: it refuses this call (e.g. an unknown or spent approval id).
                return PolicyVerdict(PolicyDecision.FORBIDDEN, f"refused by {error.message}")
            raise PolicyUnavailable(f"{error.reason}: {error.message}") from None
        # Anything policy does not say plainly is treated as forbidden (fail closed).
        decision = _DECISIONS.get(response.decision, PolicyDecision.FORBIDDEN)
        return PolicyVerdict(decision, response.justification, response.approval_id)

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
