"""Join two grid runs that differ only in attribution units (RESULTS.md, "Word-unit
KeyTokens"): per benchmark and method, FocusOnKey's recovery with token units (first run)
and word units (second run), the second run's other attacks, and both runs' KeyToken
precision / recall against the benchmark's keywords, as markdown tables.

    .venv/bin/python scripts/compare_units.py runs/paper runs/paper_words
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from results_figures import ci, num, pct  # the same cells as RESULTS.md's other tables


def _cell(m: dict[str, Any], attack: str) -> str:
    return pct(m["recovery"].get(attack)) + ci(m, f"recovery.{attack}")


def _pr(m: dict[str, Any]) -> str:
    return f"{num(m.get('keyword_precision_before'))} / {num(m.get('keyword_recall_before'))}"


def tables(tokens: dict[str, Any], words: dict[str, Any]) -> str:
    out = []
    for bench, run in words.items():
        out += [
            f"#### {bench}",
            "",
            "| method | forgotten | FocusOnKey, token units | FocusOnKey, word units "
            "| keywords only (word KeyTokens) | paraphrase "
            "| KeyToken precision / recall vs keywords, words (tokens) |",
            "|---|---|---|---|---|---|---|",
        ]
        for label, m in run["methods"].items():
            t = tokens[bench]["methods"][label]
            out.append(
                f"| {label} | {m['forgotten']} | {_cell(t, 'focus_on_key')} "
                f"| {_cell(m, 'focus_on_key')} | {_cell(m, 'keyword_only')} "
                f"| {_cell(m, 'paraphrase')} | {_pr(m)} ({_pr(t)}) |"
            )
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("tokens", type=Path, metavar="TOKEN_RUN_DIR", help="grid, token units")
    parser.add_argument("words", type=Path, metavar="WORD_RUN_DIR", help="grid, word units")
    args = parser.parse_args()
    runs = []
    for folder in (args.tokens, args.words):
        path = folder / "results.json"
        if not path.is_file():
            parser.error(f"{folder}: no results.json here")
        results = json.loads(path.read_text())
        if "runs" not in results:
            parser.error(f"{path}: one run's results, not a grid's (`unpact run paper`)")
        runs.append(results["runs"])
    print(tables(*runs))


if __name__ == "__main__":
    main()
