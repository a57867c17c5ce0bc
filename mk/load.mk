# Load, soak and the benchmark report (docs/observability.md).
# `make bench-load`: scenarios S1-S3 against the whole mesh on loopback, inference
# in synthetic mode; writes bench/results/load.json (a few minutes, bounded).
# `make soak`: S4, a long run watching RSS and open files of every service
# (SOAK_MINUTES, default 30); on demand only, never in CI.
# `make bench-report`: bench/results/report.html + report.png from every result.
SOAK_MINUTES ?= 30
.PHONY: bench-load soak bench-report

bench-load: $(GEN_STAMP)
	@mkdir -p bench/results
	$(PY) bench/load.py --out bench/results/load.json

soak: $(GEN_STAMP)
	@mkdir -p bench/results
	$(PY) bench/load_soak.py --minutes $(SOAK_MINUTES) --out bench/results/soak.json

bench-report:
	$(PY) bench/report.py --results bench/results
