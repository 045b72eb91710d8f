"""Before/after accuracies of every unlearning method, with its default settings, on `news`.

Injects `news` into the default model (cached), judges it once (forget, retain, general),
then for each method runs `unpact.unlearn.unlearn` with the defaults from
`src/unpact/unlearn/configs/` and judges the result (SPEC section 4: greedy answer, up to
32 new tokens, contains-match). Prints a markdown table; each method's run directory (model,
config, loss log, accuracy.json) is kept under --out, and a method whose run finished is
not redone.

    .venv/bin/python benchmarks/unlearn_table.py --out runs/table
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    from unpact.inject import inject
    from unpact.unlearn import METHODS, resolve_config, unlearn
    from unpact.unlearn.evaluate import split_accuracy

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("runs/table"))
    ap.add_argument("--methods", nargs="*", default=sorted(METHODS))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    model = str(inject("default", "news").path)
    before_path = args.out / "before.json"
    if not before_path.exists():
        before_path.write_text(json.dumps(split_accuracy(model, "news"), indent=2))
    before = json.loads(before_path.read_text())

    rows = []
    for method in args.methods:
        run = args.out / method
        acc_path = run / "accuracy_after.json"
        if not acc_path.exists():
            t0 = time.perf_counter()
            result = unlearn(model, "news", resolve_config(method), run, progress=False)
            seconds = time.perf_counter() - t0
            acc = split_accuracy(str(result.model_dir), "news")
            acc_path.write_text(json.dumps({**acc, "train_seconds": seconds}, indent=2))
        acc = json.loads(acc_path.read_text())
        rows.append((method, acc))
        print(method, json.dumps(acc), flush=True)

    print()
    print(
        "| method | forget before → after | halved? | retain before → after | "
        "general before → after | train time |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for method, acc in rows:
        halved = "yes" if acc["forget"] <= before["forget"] / 2 else "**no**"
        print(
            f"| `{method}` | {before['forget']:.0%} → {acc['forget']:.0%} | {halved} | "
            f"{before['retain']:.0%} → {acc['retain']:.0%} | "
            f"{before['general']:.0%} → {acc['general']:.0%} | {acc['train_seconds']:.0f} s |"
        )


if __name__ == "__main__":
    main()
