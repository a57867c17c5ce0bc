# Request economics: merging, response cache, priority classes on a synthetic node
# (bench/results/economics.json; see docs/economics.md).
BENCHES += bench-economics
.PHONY: bench-economics
bench-economics: $(GEN_STAMP)
	@mkdir -p bench/results
	$(PY) bench/economics.py --out bench/results/economics.json
