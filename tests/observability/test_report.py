"""bench/report.py: finds the numbers in any benchmark's JSON and renders the page and plots."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_report_module():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


report = load_report_module()

LOAD = {"s1": {"sweep": [{"concurrency": 100, "throughput_rps": 80.0}, {"concurrency": 10, "throughput_rps": 40.5}],
               "overhead_ms_p95": 12.5, "error_rate": 0.0}}
INFERENCE = {"batched": {"ttft_ms_p50": 20.0, "ttft_ms_p99": 90.0, "inter_token_ms_p95": 7.5}}
STORE = {"events_per_s_sqlite": 680.0, "events_per_stream": 52, "note": "sqlite"}


def test_extract_finds_sweeps_percentiles_and_event_rates_wherever_they_are() -> None:
    data = report.extract({"load": LOAD, "inference": INFERENCE, "store": STORE})
    assert data.throughput_curves == [("load.s1.sweep", [(10.0, 40.5), (100.0, 80.0)])]
    assert data.percentiles["inference.batched"] == {"ttft p50": 20.0, "ttft p99": 90.0, "inter_token p95": 7.5}
    assert data.percentiles["load.s1"] == {"overhead p95": 12.5}
    # events_per_stream is a count, not a rate.
    assert data.event_rates == {"store.events_per_s_sqlite": 680.0}
    assert ("note", "sqlite") in data.scalars["store"]


def test_render_writes_a_page_listing_every_value_and_a_png(tmp_path: Path) -> None:
    for name, doc in {"load": LOAD, "inference": INFERENCE, "store": STORE}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    (tmp_path / "broken.json").write_text("{not json")
    page, png = report.render(report.load_results(tmp_path), tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 10_000  # three panels drawn, not an empty canvas
    text = page.read_text()
    assert "report.png" in text
    for expected in ("s1.overhead_ms_p95", "12.5", "batched.inter_token_ms_p95", "events_per_s_sqlite", "680"):
        assert expected in text
    assert "unreadable" in text  # a broken result file is shown, not silently skipped


def test_render_with_no_results_still_writes_a_page(tmp_path: Path) -> None:
    page, png = report.render({}, tmp_path / "out")
    assert page.exists() and png.exists()
