"""gRPC face of the policy service: decode, call the core, encode."""
from __future__ import annotations

import grpc
from llmesh.policy.v1 import policy_pb2, policy_pb2_grpc
from prometheus_client import Counter, Gauge

from services.policy import convert
from services.policy.core.policy_service import PolicyService

DECISIONS = Counter("llmesh_policy_decisions_total", "Evaluate decisions.", ["decision", "approved_by_cache"])
APPROVALS_HELD = Gauge("llmesh_policy_approvals_held", "Approvals held in memory (bounded by max_pending_approvals).")


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, service: PolicyService) -> None:
        self.service = service

    async def Evaluate(self, request: policy_pb2.EvaluateRequest,
                       context: grpc.aio.ServicerContext) -> policy_pb2.EvaluateResponse:
        result = await self.service.evaluate(convert.tool_call(request), approval_id=request.approval_id)
        DECISIONS.labels(result.verdict.decision.name.lower(), str(result.approved_by_cache).lower()).inc()
        return convert.evaluate_response(result)

    async def RecordApproval(self, request: policy_pb2.RecordApprovalRequest,
                             context: grpc.aio.ServicerContext) -> policy_pb2.RecordApprovalResponse:
        result = await self.service.record_approval(request.tenant_id, request.session_id, request.approval_id,
                                                    request.decision, request.approver, request.request_id)
        return convert.approval_response(result)

    async def ListAudit(self, request: policy_pb2.ListAuditRequest,
                        context: grpc.aio.ServicerContext) -> policy_pb2.ListAuditResponse:
        limit = convert.page_size(request.page_size)
        records = await self.service.list_audit(request.tenant_id, convert.after_seq_from(request), limit + 1)
        more = len(records) > limit
        records = records[:limit]
        return policy_pb2.ListAuditResponse(
            entries=[convert.audit_entry(r) for r in records],
            next_page_token=convert.page_token(records[-1].seq) if more else "",
        )

    async def VerifyAudit(self, request: policy_pb2.VerifyAuditRequest,
                          context: grpc.aio.ServicerContext) -> policy_pb2.VerifyAuditResponse:
        return convert.verify_response(await self.service.verify_audit(request.tenant_id))
