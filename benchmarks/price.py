"""Price performance: studies per hour per CPU core and the cost of 1,000 studies.

From the figures of one ``make bench`` run (build/bench/end_to_end.json and inference.json): the node
used ``cpu_seconds`` of CPU time for one four-series study, first C-STORE to SEG received (receive,
job, send; its process's user + system time, measured). Per study, the network itself took
``volume_ms`` on every core of the machine. For another engine the same study costs the node's CPU
seconds with the INT8 network's share replaced by that engine's: cpu - int8 volume s x cores +
engine volume s x cores. Studies per hour per core = 3600 / CPU seconds per study; the cost of 1,000
studies = 1,000 x CPU seconds / 3600 x the price of a core-hour (stated, ``--price``).

Usage: python benchmarks/price.py [--price USD_PER_CORE_HOUR] [--results DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, markdown_table, save_result

#: USD per vCPU-hour, a typical on-demand price of a general-purpose cloud VM (2026); change with --price.
DEFAULT_PRICE = 0.048
COMPARED = ("node", "ov-int8", "ov-fp32", "onnxruntime", "torch")


def price_performance(inference: dict[str, Any], end_to_end: dict[str, Any],
                      price: float = DEFAULT_PRICE) -> dict[str, Any]:
    """Rows of studies/hour/core and cost per 1,000 studies, for the node and each engine in its place."""
    cores = int(inference["machine"]["cores"] or 1)
    engines = {e["engine"]: e for e in inference["engines"]}
    node_cpu = float(end_to_end["cpu_seconds"])
    node_engine = "node" if "node" in engines else "ov-int8"
    node_net = engines[node_engine]["volume_ms"] / 1000.0 * cores if node_engine in engines else 0.0
    rows = []
    for key in COMPARED:
        if key not in engines:
            continue
        cpu = max(node_cpu - node_net + engines[key]["volume_ms"] / 1000.0 * cores, 1e-9)
        rows.append({
            "engine": key,
            "label": ("the node: " if key == node_engine else "the node with ") + engines[key]["label"],
            "cpu_seconds": cpu,
            "studies_per_hour_per_core": 3600.0 / cpu,
            "usd_per_1000": 1000.0 * cpu / 3600.0 * price,
        })
    return {"price_per_core_hour": price, "cores": cores, "rows": rows}


def table(result: dict[str, Any]) -> str:
    """The markdown table."""
    rows = [[r["label"], f"{r['cpu_seconds']:.2f}", f"{r['studies_per_hour_per_core']:.0f}",
             f"${r['usd_per_1000']:.2f}"] for r in result["rows"]]
    return markdown_table(
        ["configuration", "CPU s per study", "studies / hour / core",
         f"cost of 1,000 studies at ${result['price_per_core_hour']:.3f} per core-hour"], rows)


def main() -> int:
    """Read the run's results, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--price", type=float, default=DEFAULT_PRICE)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    try:
        inference = json.loads((args.results / "inference.json").read_text())
        e2e = json.loads((args.results / "end_to_end.json").read_text())
    except FileNotFoundError as exc:
        print(f"error: {exc.filename} is missing; run benchmarks/inference.py and end_to_end.py first")
        return 2
    result = price_performance(inference, e2e, args.price)
    result["markdown"] = table(result)
    print(result["markdown"])
    print(f"saved {save_result('price', result, args.results)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
