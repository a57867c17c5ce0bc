"""One-page benchmark report: bench/results/*.json -> report.html + report.png.

Each benchmark writes its own JSON shape, so the report finds what it plots
by key names, wherever they sit in a file:

- throughput vs concurrency: lists of objects with ``concurrency`` and a
  ``throughput*`` or ``*_per_s`` number (one line per list);
- latency percentiles: numbers named like ``ttft_ms_p95``,
  ``inter_token_ms_p50``, ``overhead_ms_p99`` (TTFT, inter-token and
  non-LLM overhead, one bar group per benchmark);
- event throughput: numbers whose name contains ``events_per_s``.

Every scalar of every file is also listed in a table, so nothing a
benchmark measured is hidden by the choice of plots.

    python bench/report.py [--results bench/results]
"""
from __future__ import annotations

import argparse
import datetime as dt
import html
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

PERCENTILE_KEY = re.compile(r"^(?P<metric>[a-z_]*(ttft|ttfb|inter_token|itl|overhead|first_event)[a-z_]*)"
                            r"_ms_(?P<p>p\d+)$")
EVENT_RATE_KEY = re.compile(r"events_per_s(_|$)")
THROUGHPUT_KEY = re.compile(r"^(throughput.*|.*_per_s)$")


@dataclass
class ReportData:
    # (label, [(concurrency, throughput)])
    throughput_curves: list[tuple[str, list[tuple[float, float]]]] = field(default_factory=list)
    # label -> {"ttft p95": value_ms, ...}
    percentiles: dict[str, dict[str, float]] = field(default_factory=dict)
    # label -> events per second
    event_rates: dict[str, float] = field(default_factory=dict)
    # file name -> [(dotted key, value)]
    scalars: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)


def _walk(value: Any, path: str) -> Iterator[tuple[str, Any]]:
    """(dotted path, value) of every node under ``value``."""
    yield path, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _walk(item, f"{path}.{key}" if path else str(key))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _curve(points: list[Any]) -> list[tuple[float, float]] | None:
    if not points or not all(isinstance(p, dict) and _is_number(p.get("concurrency")) for p in points):
        return None
    key = next((k for k in points[0] if THROUGHPUT_KEY.match(k) and _is_number(points[0][k])), None)
    if key is None:
        return None
    return sorted((float(p["concurrency"]), float(p[key])) for p in points if _is_number(p.get(key)))


def extract(results: dict[str, Any]) -> ReportData:
    """What to plot and list, from ``{benchmark name: parsed JSON}``."""
    data = ReportData()
    for name, doc in sorted(results.items()):
        rows: list[tuple[str, Any]] = []
        for path, value in _walk(doc, ""):
            leaf = path.rsplit(".", 1)[-1]
            label = f"{name}.{path.rsplit('.', 1)[0]}" if "." in path else name
            if isinstance(value, list):
                curve = _curve(value)
                if curve:
                    data.throughput_curves.append((f"{name}.{path}", curve))
                continue
            if isinstance(value, (str, bool)) or _is_number(value):
                rows.append((path, value))
            if not _is_number(value):
                continue
            match = PERCENTILE_KEY.match(leaf)
            if match:
                data.percentiles.setdefault(label, {})[f"{match['metric']} {match['p']}"] = float(value)
            elif EVENT_RATE_KEY.search(leaf):
                data.event_rates[f"{name}.{path}"] = float(value)
        data.scalars[name] = rows
    return data


def load_results(folder: Path) -> dict[str, Any]:
    results = {}
    for path in sorted(folder.glob("*.json")):
        try:
            results[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            results[path.stem] = {"unreadable": f"{exc}"}
    return results


def _say_empty(ax: Any, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _plot_throughput(ax: Any, data: ReportData) -> None:
    ax.set_title("Throughput vs concurrency")
    if not data.throughput_curves:
        _say_empty(ax, "no concurrency sweep in the results")
        return
    for label, curve in data.throughput_curves:
        xs, ys = zip(*curve, strict=True)
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("per second")
    ax.set_xscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _plot_percentiles(ax: Any, data: ReportData) -> None:
    ax.set_title("Latency percentiles (ms, log scale)")
    if not data.percentiles:
        _say_empty(ax, "no TTFT / inter-token percentiles")
        return
    # One bar per (benchmark, metric, percentile), grouped by benchmark.
    bars = [(f"{label}: {key}", value) for label in sorted(data.percentiles)
            for key, value in sorted(data.percentiles[label].items())]
    names, values = zip(*bars, strict=True)
    ax.barh(names, values)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)


def _plot_events(ax: Any, data: ReportData) -> None:
    ax.set_title("Event throughput (events/s)")
    if not data.event_rates:
        _say_empty(ax, "no event throughput in the results")
        return
    labels = sorted(data.event_rates)
    ax.barh(labels, [data.event_rates[label] for label in labels])
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="x", alpha=0.3)


def render(results: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """Write report.png (the three plots) and report.html (plots + every scalar)."""
    data = extract(results)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1, 3, figsize=(20, 7))
    _plot_throughput(axes[0], data)
    _plot_percentiles(axes[1], data)
    _plot_events(axes[2], data)
    fig.tight_layout()
    png = out_dir / "report.png"
    fig.savefig(png, dpi=100)
    plt.close(fig)
    page = out_dir / "report.html"
    page.write_text(_html(data, png.name))
    return page, png


def _html(data: ReportData, png_name: str) -> str:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>llmesh benchmarks</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;font-size:12px;"
        "margin:0 1.5em 1.5em 0;display:inline-table;vertical-align:top}td,th{border:1px solid #ccc;"
        "padding:2px 6px;text-align:left}th{background:#eee}img{max-width:100%}</style></head><body>",
        f"<h1>llmesh benchmarks</h1><p>Generated {stamp} from bench/results/*.json.</p>",
        f"<img src='{html.escape(png_name)}' alt='throughput, latency percentiles, event throughput'>",
        "<h2>All measured values</h2>",
    ]
    for name, rows in data.scalars.items():
        parts.append(f"<table><tr><th colspan='2'>{html.escape(name)}</th></tr>")
        for key, value in rows:
            shown = f"{value:,.3f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)
            parts.append(f"<tr><td>{html.escape(key)}</td><td>{html.escape(shown)}</td></tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    page, png = render(load_results(args.results), args.results)
    print(f"wrote {page} and {png}")


if __name__ == "__main__":
    main()
