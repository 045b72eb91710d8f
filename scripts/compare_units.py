"""Join two grid runs that differ only in attribution units (RESULTS.md, "Word-unit
KeyTokens"): per benchmark and method, FocusOnKey's recovery with token units (first run)
and word units (second run), the second run's other attacks, and both runs' KeyToken
precision / recall against the benchmark's keywords, as markdown tables.

    .venv/bin/python scripts/compare_units.py runs/paper runs/paper_words
"""

from __future__ import annotations

import json
import sys
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


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: compare_units.py TOKEN_RUN_DIR WORD_RUN_DIR")
    runs = [json.loads((Path(d) / "results.json").read_text())["runs"] for d in argv]
    print(tables(*runs))


if __name__ == "__main__":
    main(sys.argv[1:])
