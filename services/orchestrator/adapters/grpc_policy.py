"""PolicyPort over llmesh.policy.v1."""
from __future__ import annotations

from typing import cast

import grpc
from llmesh.policy.v1 import policy_pb2, policy_pb2_grpc

from services.common.rpc_errors import domain_errors


class GrpcPolicy:
    def __init__(self, client) -> None:
        self._client = client

    @classmethod
    def for_channel(cls, channel: grpc.aio.Channel) -> GrpcPolicy:
        return cls(policy_pb2_grpc.PolicyServiceStub(channel))

    async def record_approval(self, *, request_id: str, tenant_id: str, session_id: str, approval_id: str,
                              decision: str, approver: str) -> None:
        with domain_errors("policy"):
            # Value() is typed as returning int; the field is typed as the enum class.
            number = cast(policy_pb2.ApprovalDecision, policy_pb2.ApprovalDecision.Value(decision))
            await self._client.RecordApproval(policy_pb2.RecordApprovalRequest(
                request_id=request_id, tenant_id=tenant_id, session_id=session_id, approval_id=approval_id,
                decision=number, approver=approver))
