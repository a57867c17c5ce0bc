# Store: schema migrations and the benchmark (both backends in one run).
BENCHES += bench-store
.PHONY: store-migrate migrate-store bench-store

# DATABASE_URL=postgresql://... make store-migrate (default: SQLite under data/)
store-migrate migrate-store: $(GEN_STAMP)
	$(PY) -m services.store.migrate $(if $(DATABASE_URL),--database-url $(DATABASE_URL))

bench-store: $(GEN_STAMP)
	@mkdir -p bench/results
	$(PY) bench/store_bench.py --out bench/results/store.json
