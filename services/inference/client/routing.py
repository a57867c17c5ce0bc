"""Model routing: a registry of model names per node, a router, fallback chains.

Pure logic over declared model profiles; the caller does the calls (through
the balancer or a channel per node) and maps transport errors to domain
errors before they reach ``run_with_fallback``. One GGUF file may appear
under several names (``ModelProfile.gguf``) with different settings.
"""
from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from services.common.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, Unavailable
from services.common.settings import json_object

T = TypeVar("T")


@dataclass(frozen=True)
class ModelProfile:
    name: str
    #: What the model can do, e.g. "chat", "grammar", "tools", "long_context".
    capabilities: frozenset[str] = frozenset()
    #: Prompt plus generated tokens the model's context holds.
    context_tokens: int = 8192
    #: Relative cost per 1000 tokens (prompt + generated), in any unit used consistently.
    cost_per_1k_tokens: float = 1.0
    #: Expected time per generated token, for the latency budget.
    ms_per_token: float = 20.0
    #: Capability tier: a higher tier handles harder prompts.
    tier: int = 0
    #: The GGUF file behind the name; several names may share one.
    gguf: str = ""
    #: Sampling defaults this name applies (e.g. {"temperature": 0.0, "max_tokens": 64}).
    defaults: Mapping[str, float | int | str] = field(default_factory=dict)

    def cost(self, num_tokens: int) -> float:
        return self.cost_per_1k_tokens * num_tokens / 1000.0


class ModelRegistry:
    """Which names each node serves, and the profile behind each name."""

    def __init__(self) -> None:
        self._profiles: dict[str, ModelProfile] = {}
        self._nodes: dict[str, set[str]] = {}

    def register(self, node_id: str, profile: ModelProfile) -> None:
        known = self._profiles.get(profile.name)
        if known is not None and known != profile:
            raise ValueError(f"model {profile.name!r} is already registered with another profile")
        self._profiles[profile.name] = profile
        self._nodes.setdefault(profile.name, set()).add(node_id)

    def unregister_node(self, node_id: str) -> None:
        for nodes in self._nodes.values():
            nodes.discard(node_id)

    def nodes_of(self, name: str) -> list[str]:
        return sorted(self._nodes.get(name, ()))

    def models_of(self, node_id: str) -> list[str]:
        return sorted(name for name, nodes in self._nodes.items() if node_id in nodes)

    def names_of_file(self, gguf: str) -> list[str]:
        return sorted(name for name, p in self._profiles.items() if p.gguf == gguf)

    @property
    def served(self) -> list[ModelProfile]:
        """Profiles with at least one node."""
        return [p for name, p in sorted(self._profiles.items()) if self._nodes.get(name)]


_HARD_WORDS = re.compile(r"\b(prove|derive|why|explain|step by step|analy[sz]e|compare|optimi[sz]e|refactor|"
                         r"debug|design|plan|trade-?offs?)\b", re.IGNORECASE)


def estimate_complexity(prompt: str) -> float:
    """A cheap 0..1 guess of how hard a prompt is: length, code, reasoning words, questions.

    It only orders prompts; the cascade's answer check catches what it misjudges.
    """
    length = min(1.0, len(prompt) / 4000.0)
    code = 1.0 if ("```" in prompt or re.search(r"\bdef |\bclass |[{};]\s*$", prompt, re.MULTILINE)) else 0.0
    reasoning = min(1.0, len(_HARD_WORDS.findall(prompt)) / 3.0)
    questions = min(1.0, prompt.count("?") / 4.0)
    return round(min(1.0, 0.35 * length + 0.25 * code + 0.3 * reasoning + 0.1 * questions), 4)


@dataclass(frozen=True)
class RouteRequest:
    prompt_tokens: int
    max_tokens: int
    capabilities: frozenset[str] = frozenset()
    #: Most the request may cost (same unit as cost_per_1k_tokens); None means no limit.
    max_cost: float | None = None
    #: Most the generation may take; None means no limit.
    max_latency_ms: float | None = None
    complexity: float = 0.0


@dataclass(frozen=True)
class RouterConfig:
    #: Lowest complexity that needs each tier: tier -> threshold (tier 0 takes everything below).
    tier_thresholds: Mapping[int, float] = field(default_factory=lambda: {1: 0.5})

    def tier_for(self, complexity: float) -> int:
        return max((tier for tier, at in self.tier_thresholds.items() if complexity >= at), default=0)


class ModelRouter:
    def __init__(self, registry: ModelRegistry, config: RouterConfig | None = None) -> None:
        self.registry = registry
        self.config = config or RouterConfig()

    def chain(self, request: RouteRequest) -> list[ModelProfile]:
        """Models to try in order: the cheapest fit for the estimated tier first, then fallbacks.

        Raises FailedPrecondition when no served model has the capabilities,
        the context and the budget the request needs.
        """
        tokens = request.prompt_tokens + request.max_tokens
        fits = [p for p in self.registry.served
                if request.capabilities <= p.capabilities and p.context_tokens >= tokens
                and (request.max_cost is None or p.cost(tokens) <= request.max_cost)
                and (request.max_latency_ms is None or p.ms_per_token * request.max_tokens <= request.max_latency_ms)]
        if not fits:
            raise FailedPrecondition(
                f"no served model has capabilities {sorted(request.capabilities)}, {tokens} tokens of context "
                f"and fits the cost/latency budget", reason="NO_MODEL_FITS")
        wanted = self.config.tier_for(request.complexity)
        able = sorted((p for p in fits if p.tier >= wanted), key=lambda p: (p.cost(tokens), p.tier, p.name))
        weaker = sorted((p for p in fits if p.tier < wanted), key=lambda p: (-p.tier, p.cost(tokens), p.name))
        return able + weaker


@dataclass(frozen=True)
class Attempt:
    model: str
    error: str


@dataclass(frozen=True)
class Routed:
    value: object
    model: str
    #: Models that failed before this one answered, with why.
    failed: tuple[Attempt, ...] = ()

    @property
    def fell_back(self) -> bool:
        return bool(self.failed)


#: Errors that move a request on to the next model of its chain; any other
#: error (bad input, permission) is the request's fault and ends the chain.
FALLBACK_ERRORS = (Unavailable, DeadlineExceeded, asyncio.TimeoutError)


def failed_attempt(model: str, exc: BaseException) -> Attempt:
    return Attempt(model, str(exc) or type(exc).__name__)


def chain_exhausted(failed: Iterable[Attempt]) -> Unavailable:
    tried = ", ".join(f"{a.model} ({a.error})" for a in failed) or "none"
    return Unavailable(f"every model in the fallback chain failed: {tried}", reason="NO_MODEL_AVAILABLE")


async def run_with_fallback(chain: Iterable[ModelProfile], call: Callable[[ModelProfile], Awaitable[T]],
                            timeout_s: float | None = None) -> Routed:
    """Call each model in turn until one answers; a model that is unavailable or times out is skipped."""
    failed: list[Attempt] = []
    for profile in chain:
        try:
            value = await asyncio.wait_for(call(profile), timeout_s) if timeout_s else await call(profile)
        except FALLBACK_ERRORS as exc:
            failed.append(failed_attempt(profile.name, exc))
            continue
        return Routed(value=value, model=profile.name, failed=tuple(failed))
    raise chain_exhausted(failed)


def check_entry_keys(values: dict, known: dict, name: str, field_name: str) -> None:
    """Every key of one entry of a JSON setting is known and of its type (bools are not numbers)."""
    for key, value in values.items():
        expected = known.get(key)
        if expected is None:
            raise InvalidArgument(f"{field_name}: {name!r} has unknown key {key!r} "
                                  f"(known: {', '.join(sorted(known))})", field=field_name)
        if not isinstance(value, expected) or isinstance(value, bool):
            raise InvalidArgument(f"{field_name}: {name!r}.{key} has the wrong type", field=field_name)


_PROFILE_FIELDS = {"capabilities": list, "cost_per_1k_tokens": (int, float), "ms_per_token": (int, float),
                   "tier": int, "gguf": str}


def parse_model_profiles(text: str, field_name: str = "model_profiles") -> dict[str, ModelProfile]:
    """``{"name": {"tier": 1, "capabilities": ["chat"], ...}}`` -> profiles (context comes from the node)."""
    profiles = {}
    for name, values in json_object(text, field_name).items():
        if not isinstance(values, dict):
            raise InvalidArgument(f"{field_name}: the profile of {name!r} must be an object", field=field_name)
        check_entry_keys(values, _PROFILE_FIELDS, name, field_name)
        caps = values.get("capabilities", [])
        if not all(isinstance(c, str) for c in caps):
            raise InvalidArgument(f"{field_name}: {name!r}.capabilities must be strings", field=field_name)
        profiles[name] = ModelProfile(name=name, **{**values, "capabilities": frozenset(caps)})
    return profiles


def parse_fallbacks(text: str, field_name: str = "model_fallbacks") -> dict[str, tuple[str, ...]]:
    """``{"model": ["next", ...]}`` -> fallback chains."""
    chains = {}
    for name, chain in json_object(text, field_name).items():
        if not isinstance(chain, list) or not all(isinstance(c, str) and c for c in chain):
            raise InvalidArgument(f"{field_name}: the chain of {name!r} must be a list of model names",
                                  field=field_name)
        if name in chain:
            raise InvalidArgument(f"{field_name}: the chain of {name!r} names {name!r} itself", field=field_name)
        chains[name] = tuple(chain)
    return chains


def parse_tier_thresholds(text: str, field_name: str = "route_tier_thresholds") -> RouterConfig:
    """``{"1": 0.5, "2": 0.8}`` -> the complexity at which each tier is wanted."""
    thresholds = {}
    for tier, at in json_object(text, field_name).items():
        if not tier.isdigit() or not isinstance(at, (int, float)) or isinstance(at, bool) or not 0 <= at <= 1:
            raise InvalidArgument(f"{field_name}: expected tier number -> complexity in [0, 1], got "
                                  f"{tier!r}: {at!r}", field=field_name)
        thresholds[int(tier)] = float(at)
    return RouterConfig(tier_thresholds=thresholds)
