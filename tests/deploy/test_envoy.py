"""The generated Envoy bootstrap, loaded into Envoy's own protos (xds-protos)."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.route.v3 import route_components_pb2

# Imported for their side effect: the typed_config Any types resolve.
from envoy.extensions.filters.http.grpc_json_transcoder.v3 import transcoder_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from google.api import annotations_pb2, http_pb2
from google.protobuf import descriptor_pb2, json_format

from deploy.envoy import EnvoySettings, build_descriptor_set, render, render_yaml
from services.common.errors import InvalidArgument
from services.inference.client.config import BalancerSettings

ROOT = Path(__file__).resolve().parents[2]
BALANCER = BalancerSettings(nodes=("10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"), health_interval_s=2.0,
                            eject_after_failures=4, ejection_base_s=3.0, ejection_max_s=90.0, max_attempts=3)


@pytest.fixture(scope="module")
def descriptor() -> bytes:
    return build_descriptor_set()


def load(text: str) -> bootstrap_pb2.Bootstrap:
    # ParseDict rejects unknown fields and wrongly typed values: Envoy's own schema.
    return json_format.ParseDict(yaml.safe_load(text), bootstrap_pb2.Bootstrap())


def connection_manager(bootstrap: bootstrap_pb2.Bootstrap) -> hcm_pb2.HttpConnectionManager:
    manager = hcm_pb2.HttpConnectionManager()
    bootstrap.static_resources.listeners[0].filter_chains[0].filters[0].typed_config.Unpack(manager)
    return manager


def cluster(bootstrap: bootstrap_pb2.Bootstrap, name: str) -> cluster_pb2.Cluster:
    return next(c for c in bootstrap.static_resources.clusters if c.name == name)


def test_inference_cluster_carries_the_balancer_policy(descriptor: bytes) -> None:
    inference = cluster(load(render_yaml(BALANCER, EnvoySettings(), descriptor)), "inference")
    assert inference.lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert inference.least_request_lb_config.choice_count.value == 2
    assert inference.type == cluster_pb2.Cluster.STATIC
    addresses = [e.endpoint.address.socket_address for e in inference.load_assignment.endpoints[0].lb_endpoints]
    assert [(a.address, a.port_value) for a in addresses] == [(f"10.0.0.{i}", 50051) for i in (1, 2, 3)]
    options = http_protocol_options_pb2.HttpProtocolOptions()
    inference.typed_extension_protocol_options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].Unpack(options)
    assert options.explicit_http_config.HasField("http2_protocol_options")


def test_active_grpc_health_checks_use_the_readiness_name(descriptor: bytes) -> None:
    bootstrap = load(render_yaml(BALANCER, EnvoySettings(unhealthy_threshold=3), descriptor))
    check = cluster(bootstrap, "inference").health_checks[0]
    assert check.grpc_health_check.service_name == "llmesh.inference.v1.InferenceService"
    assert check.interval.ToMilliseconds() == 2000 and check.unhealthy_threshold.value == 3
    orchestrator = cluster(bootstrap, "orchestrator").health_checks[0]
    assert orchestrator.grpc_health_check.service_name == "llmesh.orchestrator.v1.AgentService"


def test_outlier_detection_and_circuit_breakers(descriptor: bytes) -> None:
    inference = cluster(load(render_yaml(BALANCER, EnvoySettings(max_requests=77), descriptor)), "inference")
    outlier = inference.outlier_detection
    assert outlier.consecutive_5xx.value == 4 and outlier.consecutive_gateway_failure.value == 4
    assert outlier.base_ejection_time.seconds == 3 and outlier.max_ejection_time.seconds == 90
    thresholds = inference.circuit_breakers.thresholds[0]
    assert thresholds.max_requests.value == 77 and thresholds.max_retries.value == 64


def test_retries_go_to_another_host_before_the_response_starts(descriptor: bytes) -> None:
    manager = connection_manager(load(render_yaml(BALANCER, EnvoySettings(), descriptor)))
    routes = {r.match.prefix: r.route for r in manager.route_config.virtual_hosts[0].routes}
    policy = routes["/llmesh.inference.v1.InferenceService/"].retry_policy
    assert {"unavailable", "resource-exhausted", "reset", "connect-failure"} <= set(policy.retry_on.split(","))
    assert policy.num_retries.value == 2
    assert policy.retry_host_predicate[0].name == "envoy.retry_host_predicates.previous_hosts"
    assert routes["/llmesh.orchestrator.v1.AgentService/"].cluster == "orchestrator"
    assert routes["/llmesh.inference.v1.InferenceService/"].timeout.ToSeconds() == 0, "streams are not cut"


def routes_by_cluster(bootstrap: bootstrap_pb2.Bootstrap) -> dict[str, route_components_pb2.RouteAction]:
    (host,) = connection_manager(bootstrap).route_config.virtual_hosts
    return {r.route.cluster: r.route for r in host.routes}


def test_orchestrator_calls_hash_the_session_header_onto_a_replica(descriptor: bytes) -> None:
    bootstrap = load(render_yaml(BALANCER, EnvoySettings(), descriptor))
    orchestrator = cluster(bootstrap, "orchestrator")
    assert orchestrator.lb_policy == cluster_pb2.Cluster.RING_HASH
    assert orchestrator.ring_hash_lb_config.minimum_ring_size.value >= 1024
    assert not orchestrator.HasField("least_request_lb_config")
    routes = routes_by_cluster(bootstrap)
    (policy,) = routes["orchestrator"].hash_policy
    assert policy.header.header_name == "x-llmesh-session" and policy.terminal
    # Only the header is hashed: nothing that every call of a method shares (the
    # path, the connection) pins calls without it to one replica; they get no hash,
    # and a hashing balancer picks a random healthy host for them.
    assert not policy.header.HasField("regex_rewrite")
    assert [p.WhichOneof("policy_specifier") for p in routes["orchestrator"].hash_policy] == ["header"]
    # Retries still move to a replica not tried yet; health checks and ejection still apply.
    assert routes["orchestrator"].retry_policy.retry_host_predicate[0].name == \
        "envoy.retry_host_predicates.previous_hosts"
    assert orchestrator.health_checks and orchestrator.outlier_detection.consecutive_5xx.value == 4


def test_inference_keeps_least_request_and_no_session_hash(descriptor: bytes) -> None:
    bootstrap = load(render_yaml(BALANCER, EnvoySettings(), descriptor))
    assert cluster(bootstrap, "inference").lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert not routes_by_cluster(bootstrap)["inference"].hash_policy, "the balancer's own affinity decides there"


def test_inference_can_hash_the_prefix_header_onto_a_node(descriptor: bytes) -> None:
    bootstrap = load(render_yaml(BALANCER, EnvoySettings(inference_lb_policy="RING_HASH"), descriptor))
    inference = cluster(bootstrap, "inference")
    assert inference.lb_policy == cluster_pb2.Cluster.RING_HASH
    assert inference.ring_hash_lb_config.minimum_ring_size.value >= 1024
    routes = routes_by_cluster(bootstrap)
    (policy,) = routes["inference"].hash_policy
    assert policy.header.header_name == "x-llmesh-prefix" and policy.terminal
    assert routes["inference"].retry_policy.retry_host_predicate[0].name == \
        "envoy.retry_host_predicates.previous_hosts"
    # The orchestrator keeps its own session hash.
    assert routes["orchestrator"].hash_policy[0].header.header_name == "x-llmesh-session"
    maglev = load(render_yaml(BALANCER, EnvoySettings(inference_lb_policy="MAGLEV", prefix_header="x-prefix"),
                              descriptor))
    assert cluster(maglev, "inference").lb_policy == cluster_pb2.Cluster.MAGLEV
    assert routes_by_cluster(maglev)["inference"].hash_policy[0].header.header_name == "x-prefix"


def test_prefix_key_is_the_first_block_hash_of_the_tenant() -> None:
    from services.inference.client.core.picker import prefix_key
    from services.inference.core.prefixes import text_prefix_hashes

    prompt = "system: answer in French. " * 20
    key = prefix_key("acme", prompt)
    assert key == f"{text_prefix_hashes('acme', prompt)[0]:016x}" and len(key) == 16
    assert prefix_key("acme", prompt + "user: bonjour") == key, "only the first block counts"
    assert prefix_key("globex", prompt) != key
    assert prefix_key("acme", prompt[:100]) == "", "shorter than a block"


def test_maglev_least_request_and_another_header(descriptor: bytes) -> None:
    maglev = load(render_yaml(BALANCER, EnvoySettings(orchestrator_lb_policy="MAGLEV", session_header="x-session"),
                              descriptor))
    assert cluster(maglev, "orchestrator").lb_policy == cluster_pb2.Cluster.MAGLEV
    assert cluster(maglev, "orchestrator").maglev_lb_config.table_size.value == 65537
    assert routes_by_cluster(maglev)["orchestrator"].hash_policy[0].header.header_name == "x-session"
    plain = load(render_yaml(BALANCER, EnvoySettings(orchestrator_lb_policy="LEAST_REQUEST"), descriptor))
    assert cluster(plain, "orchestrator").lb_policy == cluster_pb2.Cluster.LEAST_REQUEST
    assert cluster(plain, "orchestrator").least_request_lb_config.choice_count.value == 2
    assert not routes_by_cluster(plain)["orchestrator"].hash_policy


def test_session_header_from_the_environment(descriptor: bytes) -> None:
    from services.common.settings import load_settings

    settings = load_settings(EnvoySettings, "envoy", [], {"LLMESH_ENVOY_SESSION_HEADER": "x-tenant-session",
                                                          "LLMESH_ENVOY_ORCHESTRATOR_LB_POLICY": "MAGLEV"})
    bootstrap = load(render_yaml(BALANCER, settings, descriptor))
    assert routes_by_cluster(bootstrap)["orchestrator"].hash_policy[0].header.header_name == "x-tenant-session"


def test_transcoder_serves_the_rest_routes_of_the_protos(descriptor: bytes) -> None:
    manager = connection_manager(load(render_yaml(BALANCER, EnvoySettings(), descriptor)))
    assert [f.name for f in manager.http_filters] == ["envoy.filters.http.grpc_json_transcoder",
                                                      "envoy.filters.http.router"]
    transcoder = transcoder_pb2.GrpcJsonTranscoder()
    manager.http_filters[0].typed_config.Unpack(transcoder)
    assert "llmesh.inference.v1.InferenceService" in transcoder.services
    assert "llmesh.orchestrator.v1.AgentService" in transcoder.services
    files = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(transcoder.proto_descriptor_bin).file}
    assert "google/api/http.proto" in files, "imports are embedded"
    generate = next(m for m in files["llmesh/inference/v1/inference.proto"].service[0].method if m.name == "Generate")
    rule = http_pb2.HttpRule()
    rule.ParseFromString(generate.options.Extensions[annotations_pb2.http].SerializeToString())
    assert rule.post == "/v1/inference:generate"


def test_dns_nodes_make_a_strict_dns_cluster(descriptor: bytes) -> None:
    settings = BalancerSettings(nodes=("dns:inference-nodes.llmesh.svc:50051",), dns_refresh_s=5.0)
    inference = cluster(load(render_yaml(settings, EnvoySettings(), descriptor)), "inference")
    assert inference.type == cluster_pb2.Cluster.STRICT_DNS
    assert inference.dns_refresh_rate.seconds == 5
    socket = inference.load_assignment.endpoints[0].lb_endpoints[0].endpoint.address.socket_address
    assert (socket.address, socket.port_value) == ("inference-nodes.llmesh.svc", 50051)


@pytest.mark.parametrize(("balancer", "envoy", "field"), [
    (BalancerSettings(), {}, "nodes"),
    (BALANCER, {"orchestrator_target": "orchestrator"}, "orchestrator_target"),
    (BALANCER, {"listen_port": 0}, "listen_port"),
    (BALANCER, {"tls_name": "a/b", "tls_dir": "/tls"}, "tls_name"),
    (BALANCER, {"downstream_client_cert": True}, "downstream_client_cert"),
    (BALANCER, {"orchestrator_lb_policy": "ROUND_ROBIN"}, "orchestrator_lb_policy"),
    (BALANCER, {"session_header": ""}, "session_header"),
    (BALANCER, {"session_header": "X-Llmesh-Session"}, "session_header"),
    (BALANCER, {"session_header": ":path"}, "session_header"),
    (BALANCER, {"inference_lb_policy": "RANDOM"}, "inference_lb_policy"),
    (BALANCER, {"inference_lb_policy": "MAGLEV", "prefix_header": "X-Prefix"}, "prefix_header"),
])
def test_bad_settings_name_the_field(descriptor: bytes, balancer: BalancerSettings, envoy: dict, field: str) -> None:
    with pytest.raises(InvalidArgument) as raised:
        render_yaml(balancer, EnvoySettings(**envoy), descriptor)
    assert raised.value.field == field


INTERNAL = ("store", "policy", "tools")


@pytest.mark.parametrize("tls_dir", ["", "/etc/llmesh/credentials/tls"])
def test_only_the_client_apis_are_exposed(descriptor: bytes, tls_dir: str) -> None:
    bootstrap = load(render_yaml(BALANCER, EnvoySettings(tls_dir=tls_dir), descriptor))
    assert sorted(c.name for c in bootstrap.static_resources.clusters) == ["inference", "orchestrator"]
    manager = connection_manager(bootstrap)
    (host,) = manager.route_config.virtual_hosts
    assert sorted(r.match.prefix for r in host.routes) == ["/llmesh.inference.v1.InferenceService/",
                                                          "/llmesh.orchestrator.v1.AgentService/"]
    assert sorted(r.route.cluster for r in host.routes) == ["inference", "orchestrator"]
    transcoder = transcoder_pb2.GrpcJsonTranscoder()
    manager.http_filters[0].typed_config.Unpack(transcoder)
    assert sorted(transcoder.services) == ["llmesh.inference.v1.InferenceService",
                                           "llmesh.orchestrator.v1.AgentService"]
    text = yaml.safe_dump(render(BALANCER, EnvoySettings(tls_dir=tls_dir), descriptor))  # descriptor is base64
    addresses = {e.endpoint.address.socket_address.address for c in bootstrap.static_resources.clusters
                 for e in c.load_assignment.endpoints[0].lb_endpoints}
    for name in INTERNAL:
        assert f"llmesh.{name}.v1" not in text and f"/{name}" not in text and name not in addresses
    assert not any(f.name.endswith("_target") and f.name != "orchestrator_target"
                   for f in dataclasses.fields(EnvoySettings)), "no setting names an internal service"


def test_no_header_is_touched_so_the_clients_key_reaches_the_service(descriptor: bytes) -> None:
    manager = connection_manager(load(render_yaml(BALANCER, EnvoySettings(tls_dir="/tls"), descriptor)))
    (host,) = manager.route_config.virtual_hosts
    assert not manager.route_config.request_headers_to_remove and not host.request_headers_to_remove
    assert not any(r.request_headers_to_remove for r in host.routes)
    transcoder = transcoder_pb2.GrpcJsonTranscoder()
    manager.http_filters[0].typed_config.Unpack(transcoder)
    assert not transcoder.HasField("request_validation_options")


def test_plaintext_has_no_tls_anywhere(descriptor: bytes) -> None:
    bootstrap = load(render_yaml(BALANCER, EnvoySettings(), descriptor))
    assert not bootstrap.static_resources.listeners[0].filter_chains[0].HasField("transport_socket")
    assert not any(c.HasField("transport_socket") for c in bootstrap.static_resources.clusters)


def upstream_tls(bootstrap: bootstrap_pb2.Bootstrap, name: str) -> tls_pb2.UpstreamTlsContext:
    socket = cluster(bootstrap, name).transport_socket
    assert socket.name == "envoy.transport_sockets.tls"
    context = tls_pb2.UpstreamTlsContext()
    assert socket.typed_config.Unpack(context)
    return context


def test_tls_listener_serves_envoys_mesh_certificate(descriptor: bytes) -> None:
    bootstrap = load(render_yaml(BALANCER, EnvoySettings(tls_dir="/etc/llmesh/credentials/tls"), descriptor))
    socket = bootstrap.static_resources.listeners[0].filter_chains[0].transport_socket
    assert socket.name == "envoy.transport_sockets.tls"
    context = tls_pb2.DownstreamTlsContext()
    assert socket.typed_config.Unpack(context)
    (certificate,) = context.common_tls_context.tls_certificates
    assert certificate.certificate_chain.filename == "/etc/llmesh/credentials/tls/envoy.pem"
    assert certificate.private_key.filename == "/etc/llmesh/credentials/tls/envoy-key.pem"
    assert list(context.common_tls_context.alpn_protocols) == ["h2", "http/1.1"]
    assert not context.require_client_certificate.value, "clients prove who they are with keys"
    strict = load(render_yaml(BALANCER, EnvoySettings(tls_dir="/tls", downstream_client_cert=True), descriptor))
    context = tls_pb2.DownstreamTlsContext()
    strict.static_resources.listeners[0].filter_chains[0].transport_socket.typed_config.Unpack(context)
    assert context.require_client_certificate.value
    assert context.common_tls_context.validation_context.trusted_ca.filename == "/tls/ca.pem"


@pytest.mark.parametrize("name", ["inference", "orchestrator"])
def test_tls_clusters_present_a_client_certificate_and_trust_only_the_mesh_ca(descriptor: bytes, name: str) -> None:
    bootstrap = load(render_yaml(BALANCER, EnvoySettings(tls_dir="/creds/tls", tls_name="edge"), descriptor))
    common = upstream_tls(bootstrap, name).common_tls_context
    (certificate,) = common.tls_certificates
    assert certificate.certificate_chain.filename == "/creds/tls/edge.pem"
    assert certificate.private_key.filename == "/creds/tls/edge-key.pem"
    assert common.validation_context.trusted_ca.filename == "/creds/tls/ca.pem"
    (san,) = common.validation_context.match_typed_subject_alt_names
    assert san.san_type == san.DNS and san.matcher.exact == name, "the service's own name, not its address"
    assert list(common.alpn_protocols) == ["h2"]
    # Active health checks use the cluster's transport socket: none of their own.
    assert not cluster(bootstrap, name).health_checks[0].HasField("transport_socket_match_criteria")


def test_tls_names_match_what_init_tls_makes(tmp_path: Path) -> None:
    from services.common.identity import init_tls, tls_files

    init_tls(tmp_path)
    settings = EnvoySettings(tls_dir=str(tmp_path / "tls"))
    for path in (settings.tls_file("ca.pem"), settings.certificate()["certificate_chain"]["filename"],
                 settings.certificate()["private_key"]["filename"]):
        assert Path(path).is_file(), path
    from cryptography import x509

    for name in ("inference", "orchestrator"):
        cert = x509.load_pem_x509_certificate(tls_files(tmp_path, name).cert.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert name in sans.get_values_for_type(x509.DNSName), "Envoy matches the upstream on this name"


def test_command_line_reads_the_inference_environment(tmp_path: Path) -> None:
    out = tmp_path / "envoy.yaml"
    env = {**os.environ, "LLMESH_INFERENCE_NODES": "10.1.0.1:50051,10.1.0.2:50051"}
    subprocess.run([sys.executable, "-m", "deploy.envoy", "--listen-port", "9090", "--out", str(out)],
                   cwd=ROOT, env=env, check=True, timeout=60)
    bootstrap = load(out.read_text())
    assert bootstrap.static_resources.listeners[0].address.socket_address.port_value == 9090
    assert len(cluster(bootstrap, "inference").load_assignment.endpoints[0].lb_endpoints) == 2
