"""Load test of the remote backend: scoring requests against a real HTTP server.

Run:  .venv/bin/python benchmarks/remote.py [--model default] [--requests 256] [--concurrency 16]

Starts `unpact serve`'s app (FastAPI + uvicorn, vLLM's reply formats) on 127.0.0.1 in this
process, then scores the same (prompt, answer) pairs of the built-in `news` benchmark:

- remote, `--concurrency` requests in flight (the backend as attribution uses it);
- remote, one request at a time (what a plain loop over an HTTP API does);
- local, the in-process hot path (`answer_logprobs`, batched), as the floor.

It prints requests/s, the p50/p99 latency of single requests, and the largest difference
between remote and local log-probs (must be < 1e-4), and writes build/bench-remote.json.
The server scores the requests waiting together in one padded pass (as vLLM batches
what is in flight), so concurrency both hides HTTP and JSON time behind model time and
batches the model's work (greedy generation is measured by benchmarks/serve_batch.py).
Bounded: --requests caps the work, --time-limit stops a slow run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from unpact.backends import open_model
from unpact.data import load_benchmark
from unpact.models import load_model
from unpact.remote import RemoteModel, RemoteSettings
from unpact.serve import BackgroundServer, make_app


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


def remote_pass(
    remote: RemoteModel, pairs: list[tuple[tuple[int, ...], tuple[int, ...]]], deadline: float
) -> tuple[float, list[float], list[list[float]]]:
    latencies: list[float] = []

    def one(pair: tuple[tuple[int, ...], tuple[int, ...]]) -> list[float]:
        if time.monotonic() > deadline:
            raise TimeoutError("benchmark time limit reached")
        p, a = pair
        t0 = time.perf_counter()
        lps = remote.sequence_logprobs([*p, *a])
        latencies.append(time.perf_counter() - t0)
        return lps[len(p) - 1 :]

    start = time.perf_counter()
    out = remote.map(one, pairs)
    return time.perf_counter() - start, latencies, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default", help="local model to serve (or 'tiny')")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--time-limit", type=float, default=600.0, help="seconds, whole run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    deadline = time.monotonic() + args.time_limit

    if args.model == "tiny":
        from unpact.testing import tiny_model

        lm = tiny_model(0)
    else:
        lm = load_model(args.model)
    items = load_benchmark("news").items
    encoded = [lm.encode_prompt(i.question) for i in items]
    answers = [lm.encode_answer(i.answer) for i in items]
    pairs = [
        (encoded[k % len(items)].input_ids, answers[k % len(items)]) for k in range(args.requests)
    ]
    tokens = sum(len(p) + len(a) for p, a in pairs)
    rows = []
    with BackgroundServer(make_app(lm, "bench")) as url:
        for concurrency in (args.concurrency, 1):
            remote = open_model(
                f"openai:bench@{url}/v1", remote=RemoteSettings(concurrency=concurrency)
            )
            assert isinstance(remote, RemoteModel)
            remote.sequence_logprobs(list(pairs[0][0] + pairs[0][1]))  # connect, pick the mode
            seconds, latencies, remote_lps = remote_pass(remote, pairs, deadline)
            remote.close()
            rows.append(
                {
                    "path": f"remote, concurrency {concurrency}",
                    "seconds": seconds,
                    "requests_per_s": len(pairs) / seconds,
                    "tokens_per_s": tokens / seconds,
                    "p50_ms": 1000 * statistics.median(latencies),
                    "p99_ms": 1000 * percentile(latencies, 99),
                }
            )
    start = time.perf_counter()
    local_lps = lm.answer_logprobs([p for p, _ in pairs], [a for _, a in pairs])
    seconds = time.perf_counter() - start
    rows.append(
        {
            "path": "local answer_logprobs (batched, in-process)",
            "seconds": seconds,
            "requests_per_s": len(pairs) / seconds,
            "tokens_per_s": tokens / seconds,
            "p50_ms": None,
            "p99_ms": None,
        }
    )
    diff = max(abs(x - y) for r, loc in zip(remote_lps, local_lps) for x, y in zip(r, loc.tolist()))
    print(
        f"{len(pairs)} scoring requests ({tokens} tokens) on {args.model}, "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"{'path':45} {'s':>7} {'req/s':>8} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        p50 = "-" if r["p50_ms"] is None else f"{r['p50_ms']:.0f}"
        p99 = "-" if r["p99_ms"] is None else f"{r['p99_ms']:.0f}"
        print(
            f"{r['path']:45} {r['seconds']:7.2f} {r['requests_per_s']:8.1f} "
            f"{r['tokens_per_s']:8.0f} {p50:>8} {p99:>8}"
        )
    print(f"largest |remote - local| log-prob difference: {diff:.2e}")
    if diff >= 1e-4:
        raise SystemExit("remote and local log-probs disagree")
    Path("build").mkdir(exist_ok=True)
    Path("build/bench-remote.json").write_text(
        json.dumps({"model": args.model, "requests": len(pairs), "rows": rows, "max_diff": diff})
        + "\n"
    )


if __name__ == "__main__":
    main()
