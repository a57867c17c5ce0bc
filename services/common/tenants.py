"""Per-tenant economics settings: what a tenant's requests may share and how they are queued.

Parsed from JSON (a node or gateway setting), e.g.
``{"default": {"cache": true}, "free-tier": {"cache": false, "max_priority": "batch"}}``.
Unknown keys or values are refused naming the setting, so a typo does not
silently change how a tenant is served.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

from services.common.errors import InvalidArgument
from services.common.settings import json_object

PRIORITY_NAMES = ("interactive", "normal", "batch")


@dataclass(frozen=True)
class TenantPolicy:
    #: Identical in-flight requests of this tenant share one decode.
    merge: bool = True
    #: Exact response cache (answers are never shared across tenants).
    cache: bool = True
    #: Requests may opt into the semantic cache.
    semantic_cache: bool = True
    #: The best class this tenant's requests get; better ones are lowered to it.
    max_priority: str = "interactive"
    #: Most one routed ("auto") request may cost, in the model profiles' cost
    #: unit; 0 means no cap. Applied by the balancer's router.
    route_max_cost: float = 0.0

    def clamp_priority(self, priority: str) -> str:
        """The class a request asking for ``priority`` is queued in."""
        return PRIORITY_NAMES[max(PRIORITY_NAMES.index(priority), PRIORITY_NAMES.index(self.max_priority))]


_TYPES = {f.name: f.type for f in fields(TenantPolicy)}


def parse_tenant_policies(text: str, field_name: str = "tenant_policies") -> dict[str, TenantPolicy]:
    """``{"tenant": {...}}`` -> policies; the key "default" applies to tenants not listed."""
    raw = json_object(text, field_name)
    policies: dict[str, TenantPolicy] = {}
    for tenant, values in raw.items():
        if not isinstance(values, dict):
            raise InvalidArgument(f"{field_name}: settings of {tenant!r} must be an object", field=field_name)
        for key, value in values.items():
            expected = _TYPES.get(key)
            if expected is None:
                raise InvalidArgument(f"{field_name}: {tenant!r} has unknown key {key!r}", field=field_name)
            if (expected == "bool") != isinstance(value, bool) or (expected == "str" and not isinstance(value, str)) \
                    or (expected == "float" and not (isinstance(value, (int, float)) and value >= 0)):
                raise InvalidArgument(f"{field_name}: {tenant!r}.{key} must be a {expected}"
                                      + (" >= 0" if expected == "float" else ""), field=field_name)
        if values.get("max_priority", "interactive") not in PRIORITY_NAMES:
            raise InvalidArgument(f"{field_name}: {tenant!r}.max_priority must be one of {', '.join(PRIORITY_NAMES)}",
                                  field=field_name)
        policies[tenant] = TenantPolicy(**values)
    return policies


def policy_for(policies: Mapping[str, TenantPolicy], tenant_id: str) -> TenantPolicy:
    return policies.get(tenant_id) or policies.get("default") or TenantPolicy()
