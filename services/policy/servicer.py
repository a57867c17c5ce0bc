"""gRPC face of the policy service: decode, call the core, encode."""
from __future__ import annotations

import grpc
from llmesh.policy.v1 import policy_pb2, policy_pb2_grpc
from prometheus_client import Counter, Gauge, Histogram

from services.policy import convert
from services.policy.core.policy_service import PolicyService

DECISIONS = Counter("llmesh_policy_decisions_total", "Evaluate decisions.", ["decision", "approved_by_cache"])
EVALUATION_SECONDS = Histogram(
    "llmesh_policy_evaluation_seconds", "Time spent judging one call and redacting it, off the event loop.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0))
APPROVALS_HELD = Gauge("llmesh_policy_approvals_held",
                       "Approvals held in this process: all of them with the memory backend "
                       "(max_pending_approvals), the cached session grants with the store (approval_cache_grants).")


class PolicyServicer(policy_pb2_grpc.PolicyServiceServicer):
    def __init__(self, service: PolicyService) -> None:
        self.service = service

    async def Evaluate(self, request: policy_pb2.EvaluateRequest,
                       context: grpc.aio.ServicerContext) -> policy_pb2.EvaluateResponse:
        result = await self.service.evaluate(convert.tool_call(request), approval_id=request.approval_id)
        DECISIONS.labels(result.verdict.decision.name.lower(), str(result.approved_by_cache).lower()).inc()
        EVALUATION_SECONDS.observe(result.evaluation_s)
        return convert.evaluate_response(result)

    async def RecordApproval(self, request: policy_pb2.RecordApprovalRequest,
                             context: grpc.aio.ServicerContext) -> policy_pb2.RecordApprovalResponse:
        result = await self.service.record_approval(request.tenant_id, request.session_id, request.approval_id,
                                                    request.decision, request.approver, request.request_id)
        return convert.approval_response(result)

    async def ListAudit(self, request: policy_pb2.ListAuditRequest,
                        context: grpc.aio.ServicerContext) -> policy_pb2.ListAuditResponse:
        records, token = await self.service.list_audit_page(request.tenant_id, request.after_seq,
                                                            request.page_size, request.page_token)
        return policy_pb2.ListAuditResponse(entries=[convert.audit_entry(r) for r in records],
                                            next_page_token=token)

    async def RecordAccessDenials(self, request: policy_pb2.RecordAccessDenialsRequest,
                                  context: grpc.aio.ServicerContext) -> policy_pb2.RecordAccessDenialsResponse:
        recorded = await self.service.record_access_denials(
            [convert.denial(d, f"denials[{i}]") for i, d in enumerate(request.denials)])
        return policy_pb2.RecordAccessDenialsResponse(recorded=recorded)

    async def VerifyAudit(self, request: policy_pb2.VerifyAuditRequest,
                          context: grpc.aio.ServicerContext) -> policy_pb2.VerifyAuditResponse:
        return convert.verify_response(await self.service.verify_audit(request.tenant_id))
