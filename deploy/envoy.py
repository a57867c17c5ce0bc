"""Render an Envoy bootstrap for llmesh from the same settings as the balancer.

    LLMESH_INFERENCE_NODES=dns:inference-nodes:50051 python -m deploy.envoy --out envoy.yaml

The inference cluster carries the policy of ``services.inference.client``
translated to Envoy: LEAST_REQUEST with two choices (power of two choices
on outstanding requests), active ``grpc.health.v1`` checks on the readiness
name, outlier ejection after ``eject_after_failures`` consecutive failures
with ejection time growing from ``ejection_base_s`` to ``ejection_max_s``,
and retries on another host for failures Envoy sees before the response
started (Envoy cannot retry once bytes went downstream, which matches
"retry only before the first token"). Every cluster has circuit breakers.
The gRPC-JSON transcoder serves the ``google.api.http`` REST routes of the
protos; the descriptor set is built from ``protos/`` and embedded.

Orchestrator calls are spread by a consistent hash (``RING_HASH`` or
``MAGLEV``) of the ``session_header`` a client sends (``x-llmesh-session:
<session_id>``, gRPC metadata or an HTTP header), so the calls of one session
keep reaching the replica that holds its cached context and live events. It
is locality only: any replica serves any call, and a call without the header
goes to a random healthy replica.

With ``inference_lb_policy`` set to a hashing policy, inference calls are
spread the same way by the ``prefix_header`` a client sends (a key of its
prompt's first text block, ``services.inference.client.core.picker.prefix_key``),
so prompts that start alike reach the node that caches that start. Off by
default: it replaces least-request balancing for every inference call.

Envoy is the mesh's edge: it routes only the client APIs, the orchestrator
(``AgentService``) and inference (``InferenceService``). The store, policy
and tools are the services' own and get no cluster, route or REST mapping
here, so nothing outside the cluster reaches them through Envoy.

Envoy authenticates nobody. A client's ``authorization: Bearer <key>``
travels untouched to the service, which authenticates the client and checks
the authorisation table: on gRPC it is request metadata already, and the
transcoder sends every HTTP header of a REST request along as gRPC
metadata, so an ``Authorization`` header reaches the service the same way.

With ``tls_dir`` set (the ``tls/`` folder of the mesh's credentials,
``python -m services.common.identity init-tls``), the listener serves TLS
with ``<tls_name>.pem`` and every cluster talks mutual TLS to its upstreams
(the services require a client certificate signed by the mesh CA): Envoy
presents the same certificate and trusts only ``ca.pem``. Active health
checks use the cluster's transport socket, so they ride the same TLS.
"""
from __future__ import annotations

import base64
import dataclasses
import ipaddress
import re
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from services.common.errors import require
from services.common.settings import load_settings
from services.inference.client.config import BalancerSettings, load_balancer_settings
from services.inference.client.discovery import DNS_PREFIX, split_host_port

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"

INFERENCE_SERVICE = "llmesh.inference.v1.InferenceService"
AGENT_SERVICE = "llmesh.orchestrator.v1.AgentService"
#: The only gRPC services Envoy exposes: cluster name -> full service name.
#: Never the store, policy or tools: those are for the mesh's services only.
EXPOSED: dict[str, str] = {"inference": INFERENCE_SERVICE, "orchestrator": AGENT_SERVICE}
TYPE_PREFIX = "type.googleapis.com/"
# gRPC statuses worth another host while nothing reached the client yet.
RETRY_ON = "unavailable,resource-exhausted,cancelled,connect-failure,refused-stream,reset"
#: Load balancing policies a cluster may use; the hashing ones hash
#: ``session_header`` (orchestrator) or ``prefix_header`` (inference).
HASH_POLICIES = ("RING_HASH", "MAGLEV")
ORCHESTRATOR_LB_POLICIES = (*HASH_POLICIES, "LEAST_REQUEST")
INFERENCE_LB_POLICIES = ORCHESTRATOR_LB_POLICIES
# HTTP/2 header names are lowercase tokens; pseudo-headers (":path") are not a session.
_HEADER_NAME = re.compile(r"^[a-z0-9][a-z0-9!#$%&'*+.^_`|~-]*$")


@dataclass(frozen=True)
class EnvoySettings:
    # The one listener (gRPC and REST; TLS with tls_dir).
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    # Admin endpoint, bound to 127.0.0.1.
    admin_port: int = 9901
    # The orchestrator (host:port); inference nodes come from LLMESH_INFERENCE_NODES.
    # A name that resolves to every replica (a headless Service) lets Envoy balance them.
    orchestrator_target: str = "orchestrator:50052"
    # How Envoy picks an orchestrator replica: RING_HASH or MAGLEV (a consistent hash
    # of session_header; calls without it go to a random replica) or LEAST_REQUEST.
    orchestrator_lb_policy: str = "RING_HASH"
    # Header (gRPC metadata) naming the session of an orchestrator call; its value is hashed.
    session_header: str = "x-llmesh-session"
    # How Envoy picks an inference node: LEAST_REQUEST (two choices on active
    # requests), or RING_HASH / MAGLEV, a consistent hash of prefix_header, so
    # prompts that start alike reach the node caching that start (calls
    # without the header go to a random node).
    inference_lb_policy: str = "LEAST_REQUEST"
    # Header (gRPC metadata) carrying an inference call's prefix key: the hex
    # of its tenant's first text-block hash (docs/inference-client.md).
    prefix_header: str = "x-llmesh-prefix"
    # Folder of the mesh's TLS files as Envoy sees them (ca.pem and the
    # tls_name certificate, e.g. envoy.pem and envoy-key.pem); empty serves and
    # calls in plaintext.
    tls_dir: str = ""
    # Name of Envoy's certificate in tls_dir: served to clients and presented to
    # the services as its client certificate (init-tls makes "envoy").
    tls_name: str = "envoy"
    # With TLS on, also require clients of the listener to present a
    # certificate signed by the mesh CA (off: clients prove who they are with keys).
    downstream_client_cert: bool = False
    # Seconds an active gRPC health check may take.
    health_timeout_s: float = 1.0
    # Failed checks in a row that mark a host unhealthy.
    unhealthy_threshold: int = 2
    # Passed checks in a row that mark it healthy again.
    healthy_threshold: int = 1
    # Most hosts of a cluster that outlier detection may eject at once.
    max_ejection_percent: int = 50
    # Circuit breakers per cluster: connections, pending and active requests, retries.
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 4096
    max_retries: int = 64
    # A FileDescriptorSet for the transcoder; empty builds one from protos/.
    descriptor_path: str = ""
    # Where to write the YAML; empty prints it.
    out: str = ""

    def __post_init__(self) -> None:
        require(0 < self.listen_port < 65536, "listen_port", "must be a TCP port")
        require(0 < self.admin_port < 65536, "admin_port", "must be a TCP port")
        require(self.health_timeout_s > 0, "health_timeout_s", "must be > 0")
        require(self.unhealthy_threshold >= 1, "unhealthy_threshold", "must be >= 1")
        require(self.healthy_threshold >= 1, "healthy_threshold", "must be >= 1")
        require(0 <= self.max_ejection_percent <= 100, "max_ejection_percent", "must be 0..100")
        host, _, port = self.orchestrator_target.rpartition(":")
        require(bool(host) and port.isdigit(), "orchestrator_target", "must be host:port")
        require(self.orchestrator_lb_policy in ORCHESTRATOR_LB_POLICIES, "orchestrator_lb_policy",
                f"must be one of {', '.join(ORCHESTRATOR_LB_POLICIES)}")
        require(self.orchestrator_lb_policy not in HASH_POLICIES or bool(_HEADER_NAME.match(self.session_header)),
                "session_header", "must be a lowercase HTTP header name (a hashing orchestrator_lb_policy needs one)")
        require(self.inference_lb_policy in INFERENCE_LB_POLICIES, "inference_lb_policy",
                f"must be one of {', '.join(INFERENCE_LB_POLICIES)}")
        require(self.inference_lb_policy not in HASH_POLICIES or bool(_HEADER_NAME.match(self.prefix_header)),
                "prefix_header", "must be a lowercase HTTP header name (a hashing inference_lb_policy needs one)")
        require(bool(self.tls_name) and "/" not in self.tls_name, "tls_name", "must be a file name stem")
        require(not self.downstream_client_cert or bool(self.tls_dir), "downstream_client_cert",
                "needs tls_dir")

    def tls_file(self, name: str) -> str:
        """A file of the mesh's TLS folder, as Envoy opens it."""
        return str(PurePosixPath(self.tls_dir) / name)

    def certificate(self) -> dict[str, Any]:
        return {"certificate_chain": {"filename": self.tls_file(f"{self.tls_name}.pem")},
                "private_key": {"filename": self.tls_file(f"{self.tls_name}-key.pem")}}


def duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def build_descriptor_set() -> bytes:
    """All llmesh protos with their imports, as the transcoder needs them."""
    import google.api  # googleapis-common-protos ships the annotation protos
    import grpc_tools
    from grpc_tools import protoc

    googleapis = Path(google.api.__path__[0]).parent.parent
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "llmesh.pb"
        rc = protoc.main(["grpc_tools.protoc", f"-I{PROTOS}", f"-I{googleapis}", f"-I{well_known}",
                          "--include_imports", f"--descriptor_set_out={out}", *sources])
        if rc != 0:
            raise RuntimeError("protoc could not build the descriptor set")
        return out.read_bytes()


def _endpoints(targets: Sequence[str]) -> tuple[str, list[dict[str, Any]]]:
    """Cluster discovery type and endpoints for host:port / dns:host:port entries."""
    needs_dns = False
    endpoints = []
    for entry in targets:
        host, port = split_host_port(entry.removeprefix(DNS_PREFIX))
        try:
            ipaddress.ip_address(host)
        except ValueError:
            needs_dns = True
        endpoints.append({"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}})
    return ("STRICT_DNS" if needs_dns else "STATIC"), endpoints


def _cluster(name: str, targets: Sequence[str], health_service: str, balancer: BalancerSettings,
             envoy: EnvoySettings) -> dict[str, Any]:
    kind, endpoints = _endpoints(targets)
    cluster: dict[str, Any] = {
        "name": name,
        "type": kind,
        "connect_timeout": "1s",
        **_lb_policy(envoy.orchestrator_lb_policy if name == "orchestrator" else envoy.inference_lb_policy),
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            },
        },
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
        "health_checks": [{
            "timeout": duration(envoy.health_timeout_s),
            "interval": duration(balancer.health_interval_s),
            "unhealthy_threshold": envoy.unhealthy_threshold,
            "healthy_threshold": envoy.healthy_threshold,
            "grpc_health_check": {"service_name": health_service},
        }],
        "outlier_detection": {
            "consecutive_5xx": balancer.eject_after_failures,
            "consecutive_gateway_failure": balancer.eject_after_failures,
            "interval": duration(balancer.health_interval_s),
            "base_ejection_time": duration(balancer.ejection_base_s),
            "max_ejection_time": duration(balancer.ejection_max_s),
            "max_ejection_percent": envoy.max_ejection_percent,
        },
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "max_connections": envoy.max_connections,
            "max_pending_requests": envoy.max_pending_requests,
            "max_requests": envoy.max_requests,
            "max_retries": envoy.max_retries,
        }]},
    }
    if kind == "STRICT_DNS":
        cluster["dns_refresh_rate"] = duration(balancer.dns_refresh_s)
    if envoy.tls_dir:
        # Requests and active health checks alike go through this socket.
        cluster["transport_socket"] = _upstream_tls(name, envoy)
    return cluster


def _lb_policy(policy: str) -> dict[str, Any]:
    if policy == "RING_HASH":
        # The ring's size bounds how evenly sessions spread; 1024 entries per few hosts is plenty.
        return {"lb_policy": "RING_HASH",
                "ring_hash_lb_config": {"minimum_ring_size": 1024, "hash_function": "XX_HASH"}}
    if policy == "MAGLEV":
        return {"lb_policy": "MAGLEV", "maglev_lb_config": {"table_size": 65537}}
    # Two random hosts, the one with fewer active requests wins.
    return {"lb_policy": "LEAST_REQUEST", "least_request_lb_config": {"choice_count": 2}}


def _upstream_tls(name: str, envoy: EnvoySettings) -> dict[str, Any]:
    """Mutual TLS to the services of cluster ``name``.

    Envoy presents its own certificate (the services refuse clients without
    one signed by the mesh CA) and trusts only the mesh CA. It checks the
    upstream's certificate for the service's own name, not for the address
    it dialled: ``init-tls`` puts each service's name in its certificate
    (besides localhost, 127.0.0.1 and ::1), while Envoy reaches it under a
    Kubernetes DNS name or a pod IP (headless Service) that no certificate
    lists. So no ``sni`` and no address check; a certificate of another mesh
    service is refused all the same.
    """
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                # gRPC servers speak HTTP/2 over TLS only when ALPN says so.
                "alpn_protocols": ["h2"],
                "tls_certificates": [envoy.certificate()],
                "validation_context": {
                    "trusted_ca": {"filename": envoy.tls_file("ca.pem")},
                    "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": name}}],
                },
            },
        },
    }


def _downstream_tls(envoy: EnvoySettings) -> dict[str, Any]:
    """TLS on the listener with Envoy's certificate; a client certificate only if asked for."""
    common: dict[str, Any] = {
        # gRPC needs h2; REST clients may speak HTTP/1.1 (the codec is AUTO).
        "alpn_protocols": ["h2", "http/1.1"],
        "tls_certificates": [envoy.certificate()],
    }
    context: dict[str, Any] = {
        "@type": TYPE_PREFIX + "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": common,
    }
    if envoy.downstream_client_cert:
        common["validation_context"] = {"trusted_ca": {"filename": envoy.tls_file("ca.pem")}}
        context["require_client_certificate"] = True
    return {"name": "envoy.transport_sockets.tls", "typed_config": context}


def _route(service: str, cluster: str, balancer: BalancerSettings, envoy: EnvoySettings) -> dict[str, Any]:
    route: dict[str, Any] = {
        "match": {"prefix": f"/{service}/"},
        "route": {
            "cluster": cluster,
            # Generations stream for as long as they take.
            "timeout": "0s",
            "retry_policy": {
                "retry_on": RETRY_ON,
                "num_retries": balancer.max_attempts - 1,
                # A retry goes to a host not tried yet, like the client balancer.
                "retry_host_predicate": [{
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {
                        "@type": TYPE_PREFIX + "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
                    },
                }],
                "host_selection_retry_max_attempts": 5,
                "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.250s"},
            },
        },
    }
    hashed = {"orchestrator": (envoy.orchestrator_lb_policy, envoy.session_header),
              "inference": (envoy.inference_lb_policy, envoy.prefix_header)}
    policy, header = hashed[cluster]
    if policy in HASH_POLICIES:
        # Only the header: a call without it gets no hash, and the hashing balancer then
        # picks a random healthy host. (Hashing ":path" instead would send every call
        # of one RPC method to one host.)
        route["route"]["hash_policy"] = [{"header": {"header_name": header}, "terminal": True}]
    return route


def render(balancer: BalancerSettings, envoy: EnvoySettings, descriptor: bytes | None = None) -> dict[str, Any]:
    """The bootstrap as plain data (what ``yaml.safe_dump`` writes)."""
    require(bool(balancer.nodes), "nodes", "at least one inference node (LLMESH_INFERENCE_NODES)")
    if descriptor is None:
        descriptor = Path(envoy.descriptor_path).read_bytes() if envoy.descriptor_path else build_descriptor_set()
    targets = {"inference": balancer.nodes, "orchestrator": (envoy.orchestrator_target,)}
    health_names = {"inference": balancer.health_service, "orchestrator": AGENT_SERVICE}
    clusters = [_cluster(name, targets[name], health_names[name], balancer, envoy) for name in EXPOSED]
    routes = [_route(service, name, balancer, envoy) for name, service in EXPOSED.items()]
    transcoder = {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            "proto_descriptor_bin": base64.b64encode(descriptor).decode("ascii"),
            # Only the exposed services get REST routes; the other protos' google.api.http
            # paths match no route here and are answered 404 by the router.
            "services": list(EXPOSED.values()),
            "print_options": {"add_whitespace": False, "always_print_primitive_fields": True,
                              "preserve_proto_field_names": True},
            # gRPC errors become HTTP status codes with a JSON google.rpc.Status body.
            "convert_grpc_status": True,
        },
    }
    # No header is added or removed: a client's ``authorization`` reaches the
    # service as metadata (the transcoder forwards a REST request's headers as
    # gRPC metadata), and the service authenticates the client, not Envoy.
    connection_manager = {
        "@type": TYPE_PREFIX + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "llmesh",
        "codec_type": "AUTO",
        "route_config": {"name": "llmesh", "virtual_hosts": [{"name": "llmesh", "domains": ["*"], "routes": routes}]},
        "http_filters": [transcoder, {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        }],
    }
    filter_chain: dict[str, Any] = {"filters": [{
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": connection_manager,
    }]}
    if envoy.tls_dir:
        filter_chain["transport_socket"] = _downstream_tls(envoy)
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": envoy.admin_port}}},
        "static_resources": {
            "listeners": [{
                "name": "llmesh",
                "address": {"socket_address": {"address": envoy.listen_host, "port_value": envoy.listen_port}},
                "filter_chains": [filter_chain],
            }],
            "clusters": clusters,
        },
    }


def render_yaml(balancer: BalancerSettings, envoy: EnvoySettings, descriptor: bytes | None = None) -> str:
    return yaml.safe_dump(render(balancer, envoy, descriptor), sort_keys=False, width=120)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "-h" in args or "--help" in args:
        print(__doc__)
        print("flags: " + " ".join("--" + f.name.replace("_", "-") for f in dataclasses.fields(EnvoySettings)))
        print("balancer settings come from LLMESH_INFERENCE_* (see docs/inference-client.md)")
        return 0
    envoy = load_settings(EnvoySettings, "envoy", args)
    text = render_yaml(load_balancer_settings(), envoy)
    if envoy.out:
        Path(envoy.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
