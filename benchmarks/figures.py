"""What the figures step costs at scale: every registered metric of one method's records
and its bootstrap interval (`results.method_metrics`, 1000 resamples), on the demo's
records of one method copied N times (each copy with its own ids), so that a benchmark of
thousands of items can be timed without running one.

    .venv/bin/python benchmarks/figures.py --copies 1 10     # needs runs/demo (the demo)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import yaml

from unpact.metrics import ItemRecord
from unpact.results import method_metrics
from unpact.run.config import StatisticsSettings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--method", default="ga_gd")
    parser.add_argument("--copies", type=int, nargs="+", default=[1, 10])
    args = parser.parse_args()
    results = json.loads((args.run / "results.json").read_text(encoding="utf-8"))
    config = yaml.safe_load((args.run / "config.yaml").read_text(encoding="utf-8"))
    keys = {f.name for f in dataclasses.fields(ItemRecord)}
    rows = [json.loads(x) for x in (args.run / "items.jsonl").read_text().split("\n") if x]
    mine = [
        ItemRecord(**{k: v for k, v in r.items() if k in keys})
        for r in rows
        if r["method"] == args.method
    ]
    for copies in args.copies:
        records = [dataclasses.replace(r, id=f"{r.id}-{i}") for i in range(copies) for r in mine]
        began = time.perf_counter()
        found = method_metrics(
            records,
            results["attacks"],
            config["collapse_threshold"],
            StatisticsSettings(**config["statistics"]),
        )
        took = time.perf_counter() - began
        print(f"{len(records)} records: {took:.1f} s for {len(found['ci'])} intervals")


if __name__ == "__main__":
    main()
