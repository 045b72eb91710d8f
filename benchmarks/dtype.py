"""What evaluating in bfloat16 (a run's `dtype:`, `unpact audit --dtype`) changes against
float32: the greedy answers and verdicts the judge reads, the answers' log-probs, and the
time, on the same items in one run.

Run:  .venv/bin/python benchmarks/dtype.py [--model default] [--items 60] [--dtype bfloat16]

On a CPU without native bfloat16 kernels the time says little; on a GPU bfloat16 is the
dtype a large model is served in.
"""

from __future__ import annotations

import argparse
import time

from unpact.data import load_benchmark
from unpact.judge import answer_items
from unpact.models import load_model
from unpact.run.config import JudgeSettings
from unpact.scoring import score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    args = parser.parse_args()
    items = load_benchmark("general").items[: args.items]
    judged, scores = {}, {}
    for dtype in ("float32", args.dtype):
        lm = load_model(args.model, dtype=dtype)
        began = time.perf_counter()
        judged[dtype] = answer_items(lm, items, JudgeSettings(), f"judging ({dtype})")
        seconds = time.perf_counter() - began
        scores[dtype] = [
            s.lp for s in score(lm, [i.question for i in items], [i.answer for i in items])
        ]
        correct = sum(ok for _, ok in judged[dtype])
        print(f"{dtype:9} judged {len(items)} items in {seconds:.1f} s: {correct} correct")
    a, b = judged["float32"], judged[args.dtype]
    text = sum(x[0] == y[0] for x, y in zip(a, b))
    verdict = sum(x[1] == y[1] for x, y in zip(a, b))
    gaps = sorted(abs(x - y) for x, y in zip(scores["float32"], scores[args.dtype]))
    print(f"same greedy answer: {text} of {len(items)}; same verdict: {verdict} of {len(items)}")
    print(
        f"|mean answer log-prob difference|: median {gaps[len(gaps) // 2]:.2e}, "
        f"max {gaps[-1]:.2e} nats"
    )


if __name__ == "__main__":
    main()
