"""Where a cold run's time went, stage by stage: `python scripts/stage_times.py RUN_DIR`.

Reads `stage_seconds` (the wall time of each stage the run computed) and
`stage_seconds_cached` (for each stage read from the cache, the time computing it took when
it was made) from RUN_DIR/results.json, or from RUN_DIR/<benchmark>/results.json for a grid
(`unpact run paper --out RUN_DIR`), and prints per run: the cold time by kind of stage
(injection, unlearning, evaluation, attribution, each attack, ...), the five slowest single
stages, the stages' cold total and how much of it this call computed, and the run's own
clock; then the grid's totals by kind. A run resumed after a stop, or re-run on a warm
cache, so still shows what its stages cost cold (stages cached by code older than these
notes have no time and are counted as unknown).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

# "attacking:npo_kl with probab (25 items)" -> "attack probab"
ATTACK = re.compile(r"^attacking:.* with (\S+)")


def kind(stage: str) -> str:
    """The kind of a stage name as the runner writes it (`kind:model[:what]`)."""
    head, _, rest = stage.partition(":")
    if head == "attacking":
        found = ATTACK.match(stage)
        return f"attack {found.group(1)}" if found else "attack"
    if head == "evaluating":
        split = re.search(r"\((\w+)\)$", rest)
        return f"evaluation {split.group(1)}" if split else "evaluation"
    return {"inject": "injection", "unlearn": "unlearning", "attributing": "attribution"}.get(
        head, head
    )


def minutes(seconds: float) -> str:
    return f"{seconds / 60:6.1f} min"


def runs(root: Path) -> dict[str, dict]:
    """name -> results.json of each run under `root` (one, or one per grid member)."""
    if (root / "results.json").is_file():
        top = json.loads((root / "results.json").read_text())
        if "runs" not in top:
            return {root.name: top}
        names = list(top["runs"])
    else:  # a grid stopped before its end: the runs that finished
        names = sorted(p.parent.name for p in root.glob("*/results.json"))
    if not names:
        sys.exit(f"{root}: no results.json here or in its subfolders")
    return {
        name: json.loads((root / name / "results.json").read_text())
        for name in names
        if (root / name / "results.json").is_file()
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path, metavar="RUN_DIR", help="a run or a grid's folder")
    found = runs(parser.parse_args().run)
    grid: dict[str, float] = defaultdict(float)
    clock = cold = 0.0
    for name, results in found.items():
        here = results.get("stage_seconds") or {}
        stages = (results.get("stage_seconds_cached") or {}) | here
        by_kind: dict[str, float] = defaultdict(float)
        for stage, seconds in stages.items():
            by_kind[kind(stage)] += seconds
            grid[kind(stage)] += seconds
        clock += results["seconds"]
        cold += sum(stages.values())
        print(
            f"## {name}: stages {minutes(sum(stages.values()))} cold, "
            f"{minutes(sum(here.values()))} of it computed in this call; "
            f"{minutes(results['seconds'])} on the run's clock"
        )
        for k, seconds in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            print(f"  {k:28} {minutes(seconds)}")
        print("  slowest stages:")
        for stage, seconds in sorted(stages.items(), key=lambda kv: -kv[1])[:5]:
            print(f"    {stage:50} {minutes(seconds)}")
    if len(found) > 1:
        print(
            f"## all {len(found)} runs: stages {minutes(cold)} cold; "
            f"{minutes(clock)} on the runs' clocks"
        )
        for k, seconds in sorted(grid.items(), key=lambda kv: -kv[1]):
            print(f"  {k:28} {minutes(seconds)}")


if __name__ == "__main__":
    main()
