"""RESULTS.md's tables for issue 22 from finished runs: `python scripts/robust_tables.py
RUN_DIR [RUN_DIR ...]` (e.g. runs/robust runs/robust_relearn).

Per benchmark of each run: each attack's recovery with its 95% interval / the same attack
on the never-taught reference, and what quantization and relearning did to the original;
then the exact McNemar counts pooled over benchmarks (recovered only from the unlearned
model / only from the reference, each verdict's numbers in results.json), over all three
benchmarks and over the QA ones (news, books), per method and attack.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from scipy.stats import binomtest

BENCHMARKS = ("news", "books", "wmdp")
PAIRS = re.compile(r"only here: (\d+), only there: (\d+)")


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def table(results: dict) -> list[str]:
    attacks = list(results["attacks"])
    lines = [
        "| method | forgotten | " + " | ".join(attacks) + " |",
        "| --- | --- |" + " --- |" * len(attacks),
    ]
    for m, v in results["methods"].items():
        cells = []
        for a in attacks:
            lo, hi = v["ci"].get(f"recovery.{a}") or [None, None]
            ctl = (v.get("recovery_control") or {}).get(a)
            cells.append(
                f"{pct(v['recovery'].get(a))} [{pct(lo)}, {pct(hi)}]"
                + (f" / {pct(ctl)}" if ctl is not None else "")
            )
        lines.append(f"| {m} | {v['forgotten']} | " + " | ".join(cells) + " |")
    base = {
        k: {s: pct(x) for s, x in b.items()} for k, b in results.get("attack_baselines", {}).items()
    }
    return [*lines, f"\nthe original after each attack: {base}"]


def pooled(runs: list[Path], benchmarks: tuple[str, ...]) -> dict[tuple[str, str], list[int]]:
    counts: dict[tuple[str, str], list[int]] = {}
    for root in runs:
        for b in benchmarks:
            path = root / b / "results.json"
            if not path.is_file():
                continue
            for method, verdicts in json.loads(path.read_text())["verdicts"].items():
                for v in verdicts:
                    pair = _pair(v)
                    if pair is not None:
                        c = counts.setdefault((v["test"], method), [0, 0])
                        c[0] += pair[0]
                        c[1] += pair[1]
    return counts


def _pair(verdict: dict) -> tuple[int, int] | None:
    """An attack's McNemar counts against its control: its verdict's numbers, or (a
    results.json from before they were written) the sentence's. The forgotten line's
    counts, against the reference's answers, are not an attack's."""
    if "recovered" in verdict:
        if "only_here" not in verdict:  # no control
            return None
        return verdict["only_here"], verdict["only_reference"]
    found = PAIRS.search(verdict["detail"])
    return None if found is None else (int(found.group(1)), int(found.group(2)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR", help="a finished run")
    runs = parser.parse_args().runs
    missing = [r for r in runs if not any((r / b / "results.json").is_file() for b in BENCHMARKS)]
    if missing:  # printed empty tables, as if the runs had recovered nothing
        parser.error(f"{missing[0]}: no {'/'.join(BENCHMARKS)}/results.json here")
    for root in runs:
        for b in BENCHMARKS:
            path = root / b / "results.json"
            if path.is_file():
                print(f"\n#### {root.name}: {b}\n")
                print("\n".join(table(json.loads(path.read_text()))))
    for name, benches in (
        ("all three benchmarks", BENCHMARKS),
        ("news and books", ("news", "books")),
    ):
        print(f"\npooled McNemar, {name} (only here / only there, p):")
        counts = pooled(runs, benches)
        for attack in sorted({a for a, _ in counts}):
            rows = {m: c for (a, m), c in counts.items() if a == attack}
            total = [sum(c[i] for c in rows.values()) for i in (0, 1)]
            p = binomtest(total[0], sum(total)).pvalue if sum(total) else 1.0
            each = "  ".join(f"{m} {c[0]}/{c[1]}" for m, c in rows.items())
            print(f"  {attack}: {each}  all {total[0]}/{total[1]} p = {p:.2g}")


if __name__ == "__main__":
    main()
