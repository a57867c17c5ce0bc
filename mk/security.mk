# Hostile callers: `make bench-security` writes bench/results/security.json
# (escapes, red-team commands allowed wrongly, Evaluate p99 on 64 KiB, REST 5xx under fuzz).
BENCHES += bench-security
.PHONY: bench-security
bench-security: $(GEN_STAMP)
	@mkdir -p bench/results
	$(PY) bench/security.py --out bench/results/security.json
