# Shared prefixes: a new session's TTFT when its tenant already holds its prefix, KV cells of 16 sessions
# sharing one, and prefix-aware routing over synthetic nodes; writes bench/results/prefix.json.
.PHONY: bench-prefix
bench-prefix: $(GEN_STAMP)
	@mkdir -p bench/results
	$(PY) bench/prefix_bench.py --out bench/results/prefix.json
