# Inference node benchmark: batching vs serial, KV reuse, fair prefill (bench/results/inference.json).
.PHONY: bench-inference
bench-inference: $(GEN_STAMP) model
	$(PY) bench/inference_bench.py --out bench/results/inference.json
