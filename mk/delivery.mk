# Delivery beyond the open stream: the webhook outbox (SQLite and PostgreSQL, a store kill, a dead
# destination) and WebSocket resumes; writes bench/results/delivery.json.
.PHONY: bench-delivery
bench-delivery: $(GEN_STAMP)
	@mkdir -p bench/results
	$(PY) bench/delivery_bench.py --out bench/results/delivery.json
