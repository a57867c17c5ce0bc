"""Who may call which RPC, and what a caller's identity fixes in its requests.

The one authorisation table of the mesh. A caller is a client key (of one
tenant, with a role) or a service identity (``service:<name>``); health and
reflection are open to anyone and never reach this table.

Tenant and role come from the caller, never from the body:

- a client's request with an empty ``tenant_id`` gets the key's tenant; one
  naming another tenant is refused (PERMISSION_DENIED, ``TENANT_MISMATCH``);
- a request's ``role`` may name the key's role or a weaker one (``ROLE_ORDER``),
  never a stronger one (``ROLE_NOT_GRANTED``); empty means the key's role;
- a service acting for a client forwards the client's principal in
  ``x-llmesh-principal`` metadata; that header is trusted only from service
  identities, and the forwarded client is then bound as above. A service
  acting for no client (a task worker, policy writing audit entries) names
  the tenant in the body, as the store and policy contracts say.
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from services.common import errors
from services.common.auth import ROLE_ORDER, Principal

#: Metadata carrying the client a service acts for.
PRINCIPAL_HEADER = "x-llmesh-principal"

CLIENT = "client"
GATEWAY = "service:gateway"
ORCHESTRATOR = "service:orchestrator"
TOOLS = "service:tools"
POLICY = "service:policy"
STORE = "service:store"
INFERENCE = "service:inference"
#: Every service of the mesh (refusal reports go to policy from any of them).
SERVICES = frozenset({GATEWAY, ORCHESTRATOR, TOOLS, POLICY, STORE, INFERENCE})

_AGENT = "/llmesh.orchestrator.v1.AgentService/"
_INFERENCE = "/llmesh.inference.v1.InferenceService/"
_TOOLS = "/llmesh.tools.v1.ToolService/"
_POLICY = "/llmesh.policy.v1.PolicyService/"
_STORE = "/llmesh.store.v1.StoreService/"

# Method (full name, or a service prefix ending in "/") -> callers allowed.
# The longest matching entry wins; a method matching none is refused.
TABLE: Mapping[str, frozenset[str]] = {
    # Clients (directly, or through the REST gateway) drive agents.
    _AGENT: frozenset({CLIENT, GATEWAY}),
    # Generation is for clients and for the services that generate for them.
    _INFERENCE: frozenset({CLIENT, GATEWAY, ORCHESTRATOR}),
    # Freeing a session's cells is the orchestrator's business (it owns sessions).
    _INFERENCE + "ReleaseSession": frozenset({ORCHESTRATOR}),
    # Anyone in the mesh may see the tool catalogue; only the agent loop runs tools.
    _TOOLS + "ListTools": frozenset({CLIENT, GATEWAY, ORCHESTRATOR}),
    _TOOLS + "ExecuteTool": frozenset({ORCHESTRATOR}),
    _TOOLS + "ExecuteTools": frozenset({ORCHESTRATOR}),
    # Decisions are asked by the tools service before it runs anything;
    # approvals are recorded by the orchestrator when a person answers.
    _POLICY + "Evaluate": frozenset({TOOLS}),
    _POLICY + "RecordApproval": frozenset({ORCHESTRATOR}),
    # Audit reads are a tenant's own (bound to the caller's tenant).
    _POLICY + "ListAudit": frozenset({CLIENT, GATEWAY}),
    _POLICY + "VerifyAudit": frozenset({CLIENT, GATEWAY}),
    # Refused calls are written to the audit trail by whichever service refused them.
    _POLICY + "RecordAccessDenials": SERVICES,
    # The store is the services' own.
    _STORE: frozenset({ORCHESTRATOR, POLICY, TOOLS}),
    # Approvals are the policy replicas' shared book; WatchApprovals shows every tenant's.
    _STORE + "OpenApproval": frozenset({POLICY}),
    _STORE + "GetApproval": frozenset({POLICY}),
    _STORE + "DecideApproval": frozenset({POLICY}),
    _STORE + "NoteApprovalAudit": frozenset({POLICY}),
    _STORE + "ListApprovals": frozenset({POLICY}),
    _STORE + "WatchApprovals": frozenset({POLICY}),
    # /v1/responses keeps each response chain as a session of the caller's tenant (docs/openai.md).
    **{_STORE + method: frozenset({ORCHESTRATOR, GATEWAY}) for method in (
        "CreateSession", "AppendMessages", "ListMessages", "AppendEvents", "ReadEvents", "WatchEvents",
        "AcquireSessionLock", "ReleaseSessionLock")},
    # Session controls carry a run's cancel and approval answers between orchestrator replicas.
    _STORE + "PostSessionControl": frozenset({ORCHESTRATOR}),
    _STORE + "WatchSessionControls": frozenset({ORCHESTRATOR}),
}


def allowed_callers(method: str) -> frozenset[str]:
    best = ""
    for entry in TABLE:
        if (method == entry or (entry.endswith("/") and method.startswith(entry))) and len(entry) > len(best):
            best = entry
    return TABLE.get(best, frozenset()) if best else frozenset()


def authorize(method: str, caller: Principal) -> None:
    """Raise PermissionDenied naming the RPC unless ``caller`` may call ``method``."""
    if caller.name not in allowed_callers(method):
        raise errors.PermissionDenied(f"{caller.name} may not call {method}", reason="RPC_NOT_ALLOWED",
                                      metadata={"rpc": method, "caller": caller.name})


def effective_principal(caller: Principal, forwarded: str | None) -> Principal:
    """The principal a call acts for: the forwarded client when a service sends one, else the caller."""
    if forwarded is None:
        return caller
    if not caller.is_service:
        raise errors.PermissionDenied(f"only mesh services may send {PRINCIPAL_HEADER}",
                                      reason="PRINCIPAL_FORWARD_NOT_ALLOWED", field=PRINCIPAL_HEADER)
    return decode_principal(forwarded, via=caller.service)


def encode_principal(principal: Principal) -> str:
    return json.dumps({"tenant_id": principal.tenant_id, "key_id": principal.key_id, "role": principal.role},
                      separators=(",", ":"))


def decode_principal(text: str, *, via: str) -> Principal:
    try:
        raw = json.loads(text)
        tenant, key_id, role = raw["tenant_id"], raw["key_id"], raw["role"]
    except (ValueError, TypeError, KeyError):
        raise errors.InvalidArgument(f"{PRINCIPAL_HEADER}: expected a JSON object with tenant_id, key_id and role",
                                     field=PRINCIPAL_HEADER) from None
    if not all(isinstance(v, str) and v for v in (tenant, key_id, role)):
        raise errors.InvalidArgument(f"{PRINCIPAL_HEADER}: tenant_id, key_id and role must be non-empty strings",
                                     field=PRINCIPAL_HEADER)
    return Principal(tenant_id=tenant, key_id=key_id, role=role, via=via)


def bind_request(request: Any, principal: Principal) -> None:
    """Fix ``tenant_id`` and ``role`` of a client's request from its principal (in place)."""
    if principal.is_service:
        return
    fields = request.DESCRIPTOR.fields_by_name if hasattr(request, "DESCRIPTOR") else {}
    if "tenant_id" in fields:
        named = request.tenant_id
        if not named:
            request.tenant_id = principal.tenant_id
        elif named != principal.tenant_id:
            raise errors.PermissionDenied("tenant_id names another tenant than the caller's key",
                                          reason="TENANT_MISMATCH", field="tenant_id")
    if "role" in fields and fields["role"].type == fields["role"].TYPE_STRING:
        request.role = narrowed_role(request.role, principal.role)


def narrowed_role(asked: str, granted: str) -> str:
    """The role a call runs as: ``granted`` when none is asked, else ``asked`` if it is not stronger."""
    if not asked or asked == granted:
        return granted
    if asked in ROLE_ORDER and granted in ROLE_ORDER and ROLE_ORDER.index(asked) < ROLE_ORDER.index(granted):
        return asked
    raise errors.PermissionDenied(f"role {asked!r} is not granted to this key (its role is {granted!r})",
                                  reason="ROLE_NOT_GRANTED", field="role")
