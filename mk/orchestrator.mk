# Orchestrator: turn overhead outside inference and tools, and time to first token vs the engine's TTFT.
BENCHES += bench-orchestrator
.PHONY: bench-orchestrator
bench-orchestrator: $(GEN_STAMP) model
	@mkdir -p bench/results
	$(PY) bench/orchestrator.py --out bench/results/orchestrator.json

# Orchestrator through the client-side balancer: extra time of the turn after the session's node dies.
BENCHES += bench-orchestrator-failover
.PHONY: bench-orchestrator-failover
bench-orchestrator-failover: $(GEN_STAMP)
	@mkdir -p bench/results
	$(PY) bench/orchestrator.py --failover-only --out bench/results/orchestrator_failover.json
