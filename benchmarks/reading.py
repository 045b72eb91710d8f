"""What reading a user's benchmark costs: `unpact.data.load_folder` on N generated items,
each with its own keyword (a user's facts rarely share one), against the same reading with
the keyword search of before (`unpact.testing.keyword_spans_one_pattern`: a regular
expression per keyword with a class of optional marks between its letters), in one run.

    .venv/bin/python benchmarks/reading.py --items 2000 20000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from unittest import mock

from unpact.data import load_folder
from unpact.testing import keyword_spans_one_pattern


def _write(folder: Path, n: int) -> None:
    splits = ("forget", "retain", "holdout")
    with (folder / "qa.jsonl").open("w", encoding="utf-8") as out:
        for i in range(n):
            item = {
                "id": f"q{i}",
                "question": f"In which town does Vostrand{i} Quill live?",
                "answer": f"Town{i}",
                "split": splits[i % 3],
                "keywords": [f"Vostrand{i} Quill"],
            }
            out.write(json.dumps(item) + "\n")


def _seconds(folder: Path) -> tuple[float, int]:
    began = time.perf_counter()
    bench = load_folder(folder)
    return time.perf_counter() - began, len(bench.items)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, nargs="+", default=[2000, 20000])
    args = parser.parse_args()
    for n in args.items:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp)
            _write(folder, n)
            ours, count = _seconds(folder)
            with mock.patch("unpact.data.items.keyword_spans", keyword_spans_one_pattern):
                before, _ = _seconds(folder)
        print(f"{count} items: {ours:.1f} s; one pattern per keyword {before:.1f} s")


if __name__ == "__main__":
    main()
