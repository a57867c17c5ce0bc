# Authentication and TLS cost: `make bench-auth` writes bench/results/auth.json
# (p50 added by checking a cached key, tokens/s with mutual TLS vs plaintext).
BENCHES += bench-auth
.PHONY: bench-auth
bench-auth: $(GEN_STAMP)
	@mkdir -p bench/results
	$(PY) bench/auth.py --out bench/results/auth.json
