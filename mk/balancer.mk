# Client-side balancer benchmark: P2C + affinity vs round robin, 3 nodes, one 3x slower.
BENCHES += bench-balancer
.PHONY: bench-balancer
bench-balancer: $(GEN_STAMP)
	@mkdir -p bench/results
	$(PY) bench/balancer.py --out bench/results/balancer.json
