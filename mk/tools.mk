# Tool executor: `make bench-tools` writes bench/results/tools.json.
BENCHES += bench-tools
.PHONY: bench-tools
bench-tools: $(GEN_STAMP)
	@mkdir -p bench/results
	$(PY) bench/tools_bench.py --out bench/results/tools.json
