# Exec-policy throughput: default policy evaluations per second in one process.
BENCHES += bench-policy
.PHONY: bench-policy
bench-policy: $(GEN_STAMP)
	@mkdir -p bench/results
	$(PY) bench/policy.py --out bench/results/policy.json
