"""Per-tenant economics policies parsed from JSON."""
from __future__ import annotations

import pytest

from services.common.errors import InvalidArgument
from services.common.tenants import TenantPolicy, parse_tenant_policies, policy_for


def test_listed_tenant_default_and_built_in_fallback():
    policies = parse_tenant_policies('{"default": {"cache": false}, "free": {"merge": false, "max_priority": "batch"}}')
    assert policy_for(policies, "free") == TenantPolicy(merge=False, max_priority="batch")
    assert policy_for(policies, "other") == TenantPolicy(cache=False)
    assert policy_for({}, "other") == TenantPolicy()


@pytest.mark.parametrize("asked,cap,queued", [("interactive", "batch", "batch"), ("batch", "normal", "batch"),
                                              ("interactive", "normal", "normal"), ("normal", "interactive", "normal")])
def test_priority_is_lowered_to_the_tenant_cap(asked, cap, queued):
    assert TenantPolicy(max_priority=cap).clamp_priority(asked) == queued


@pytest.mark.parametrize("text", ["not json", "[]", '{"t": 1}', '{"t": {"cash": true}}', '{"t": {"cache": "yes"}}',
                                  '{"t": {"max_priority": "urgent"}}', '{"t": {"max_priority": 3}}'])
def test_bad_policies_are_refused_naming_the_setting(text):
    with pytest.raises(InvalidArgument) as caught:
        parse_tenant_policies(text)
    assert caught.value.field == "tenant_policies"
