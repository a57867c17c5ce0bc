# REST/SSE layer: `make bench-gateway` measures its overhead over fake backends.
.PHONY: bench-gateway run-gateway
bench-gateway: $(GEN_STAMP)
	$(PY) bench/gateway_bench.py --out bench/results/gateway.json

# Starts the REST layer alone, against services started by `make run` (default ports).
run-gateway: $(GEN_STAMP)
	LLMESH_GATEWAY_ORCHESTRATOR_TARGET=127.0.0.1:50052 LLMESH_GATEWAY_TOOLS_TARGET=127.0.0.1:50053 \
	LLMESH_GATEWAY_POLICY_TARGET=127.0.0.1:50054 LLMESH_GATEWAY_INFERENCE_TARGET=127.0.0.1:50051 \
	LLMESH_GATEWAY_STORE_TARGET=127.0.0.1:50055 \
	LLMESH_GATEWAY_INFERENCE_NODES=127.0.0.1:50051 $(PY) -m services.gateway
