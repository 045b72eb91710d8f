"""RESULTS.md's tables for issue 21 from a finished `unpact run indist --out RUN_DIR`:
`python scripts/indist_tables.py RUN_DIR`.

Per benchmark: the taught original, the never-taught reference and each method, with forget
accuracy after unlearning, the LOSS, Min-K% and GradNorm AUCs (forget against holdout) and
MUSE's PrivLeak with their 95% bootstrap intervals, TOFU's truth ratio and forget quality,
extraction strength, the share of degenerate forget answers and PROBAB's recovery rate.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from robust_tables import BENCHMARKS, pct  # this folder's: the same benchmarks and percentages

HEAD = (
    "| model | forget acc. after | LOSS AUC | Min-K% AUC | GradNorm AUC | PrivLeak (Min-K%) "
    "| truth ratio | forget quality | extraction strength | degenerate | recovery PROBAB |"
)


def num(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def with_ci(row: dict, name: str, show=num) -> str:
    """`name`'s value and its interval, from the row's `ci`."""
    parent, _, child = name.partition(".")
    value = row.get(parent)
    if child:
        value = (value or {}).get(child)
    lo, hi = row.get("ci", {}).get(name) or [None, None]
    return "–" if value is None else f"{show(value)} [{show(lo)}, {show(hi)}]"


def table(results: dict) -> list[str]:
    lines = [HEAD, "|" + " --- |" * HEAD.count(" | ") + " --- |"]
    rows = {**results.get("references", {}), **results["methods"]}
    for label, row in rows.items():
        cells = [
            pct(row.get("forget_acc_after")),
            with_ci(row, "mia_auc.loss"),
            with_ci(row, "mia_auc.min_k"),
            with_ci(row, "mia_auc.gradnorm"),
            with_ci(row, "privleak", pct),
            num(row.get("truth_ratio")),
            num(row.get("forget_quality"), ".2g"),
            num(row.get("extraction_strength")),
            pct(row.get("degenerate")),
            pct((row.get("recovery") or {}).get("probab")),
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run's --out folder")
    args = parser.parse_args()
    for bench in BENCHMARKS:
        path = args.run / bench / "results.json"
        if not path.is_file():
            continue
        results = json.loads(path.read_text())
        print(f"### {bench}\n")
        print("\n".join(table(results)))
        print()


if __name__ == "__main__":
    main()
