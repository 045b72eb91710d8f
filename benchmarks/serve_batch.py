"""Greedy generation through `unpact serve`: requests batched (`--max-num-seqs 16`, the
default) against each generated on its own (`--max-num-seqs 1`, as the server generated
them before 2026-12-07; the log-probs its replies report are scored in batches by both),
in one run.

Run:  .venv/bin/python benchmarks/serve_batch.py [--model default] [--items 64] [--tokens 24]

Serves the model (the app `unpact serve` runs, on 127.0.0.1 in this process) twice, once
per setting, and asks each for greedy answers to the questions of the built-in `news`
benchmark (forget, then retain; `--items` of them, `--tokens` tokens each) as an audit asks
a served model: unpact's remote client, 16 requests in flight (`remote.concurrency`). Then
the same questions through the local `generate` (batches of 16, in-process) as the floor.
It prints each one's seconds and answers per second, the speedup of batching, and how many
answers each served setting gives that the local model gives too (greedy: all of them, but
for float rounding in a batch), and writes build/bench-serve-batch.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from unpact.backends import open_model
from unpact.data import load_benchmark
from unpact.models import load_model
from unpact.remote import RemoteSettings
from unpact.scoring import generate
from unpact.serve import BackgroundServer, make_app


def served(lm, questions: list[str], tokens: int, max_num_seqs: int) -> tuple[float, list[str]]:
    """Seconds and answers of the questions asked of `lm` served with `max_num_seqs`."""
    with BackgroundServer(make_app(lm, "bench", max_num_seqs=max_num_seqs)) as url:
        remote = open_model(f"openai:bench@{url}/v1", remote=RemoteSettings(concurrency=16))
        generate(remote, questions[:2], max_new_tokens=tokens)  # warm-up (chat template)
        start = time.perf_counter()
        gens = generate(
            remote, questions, max_new_tokens=tokens, progress=f"served, {max_num_seqs}"
        )
        return time.perf_counter() - start, [g[0].text for g in gens]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--items", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--out", default="build/bench-serve-batch.json")
    args = ap.parse_args()

    torch.manual_seed(0)
    bench = load_benchmark("news")
    questions = [i.question for s in ("forget", "retain") for i in bench.split(s)][: args.items]
    lm = load_model(args.model)

    start = time.perf_counter()
    local = [g[0].text for g in generate(lm, questions, max_new_tokens=args.tokens)]
    local_s = time.perf_counter() - start
    alone_s, alone = served(lm, questions, args.tokens, 1)
    batched_s, batched = served(lm, questions, args.tokens, 16)

    n = len(questions)
    result = {
        "model": args.model,
        "items": n,
        "tokens": args.tokens,
        "threads": torch.get_num_threads(),
        "served_alone_s": round(alone_s, 2),
        "served_batched_s": round(batched_s, 2),
        "local_s": round(local_s, 2),
        "speedup": round(alone_s / batched_s, 2),
        "alone_equal_local": sum(a == b for a, b in zip(alone, local)),
        "batched_equal_local": sum(a == b for a, b in zip(batched, local)),
    }
    print(
        f"{n} greedy answers of {args.tokens} tokens, 16 requests in flight:\n"
        f"  served, --max-num-seqs 1   {alone_s:7.1f} s  {n / alone_s:6.2f} answers/s\n"
        f"  served, --max-num-seqs 16  {batched_s:7.1f} s  {n / batched_s:6.2f} answers/s"
        f"  ({result['speedup']}x)\n"
        f"  local generate (floor)     {local_s:7.1f} s  {n / local_s:6.2f} answers/s\n"
        f"  answers equal to local: {result['alone_equal_local']}/{n} alone, "
        f"{result['batched_equal_local']}/{n} batched"
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
