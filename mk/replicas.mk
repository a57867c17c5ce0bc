# Replicas sharing their state through the store: `make bench-replicas` writes
# bench/results/replicas.json (cross-replica Cancel delay, approvals lost,
# events lost or duplicated across SIGKILLed replicas, S1 ops/s two vs one).
BENCHES += bench-replicas
.PHONY: bench-replicas
bench-replicas: $(GEN_STAMP) system-deps
	@mkdir -p bench/results
	$(PY) bench/replicas.py --out bench/results/replicas.json
