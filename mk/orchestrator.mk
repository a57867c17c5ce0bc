# Orchestrator: turn overhead outside inference and tools, and time to first token vs the engine's TTFT.
BENCHES += bench-orchestrator
.PHONY: bench-orchestrator
bench-orchestrator: $(GEN_STAMP) model
	@mkdir -p bench/results
	PYTHONPATH=.:gen $(PY) bench/orchestrator.py --out bench/results/orchestrator.json
