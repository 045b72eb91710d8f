"""An open finding on reproducibility: the first batched forward pass of a fresh process
sometimes gives other numbers than every later one, on this 2-core machine with 2 threads.

Each of N fresh processes builds the tiny test model, encodes 8 news questions and scores
their answers (`answer_logprobs`, one padded batch of 8) three times; the script counts the
distinct hashes of the log-probs per call. Seen on 2026-12-03 (torch 2.13.0's CPU build):
about 1 process in 10 scored its *first* call otherwise (log-probs up to 2e-3 apart, only
in rows 4-7 of the batch: the second thread's half), its later calls as every other
process; none of 40 processes with one thread (`--threads 1`) did, nor any of 40 that ran a
large parallel operation before building the model (`--warm`). Traced to the rotary
embedding's cos/sin in the first call (values off by ~1e-4 in the second thread's half);
the separate operations (multiply, cat, cos) did not reproduce it, and under a
TorchDispatchMode that logs every operation it did not happen: a race below unpact, not
found. The flaky unit test it explains: `test_resume_after_a_crash_ends_with_the_same_weights`
run alone (its first unlearning is the process's first forward pass).

Run:  .venv/bin/python benchmarks/first_forward.py [--processes 30] [--threads 2] [--warm]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys

CHILD = r"""
import hashlib, sys, torch
import unpact
if "--warm" in sys.argv:
    torch.ones(1 << 24).cos().sum()
    torch.randn(512, 512) @ torch.randn(512, 512)
from unpact.data import load_benchmark
from unpact.scoring import answer_logprobs
from unpact.testing import tiny_model
from unpact.unlearn.loop import encode_items
lm = tiny_model(seed=3)
enc = encode_items(lm, load_benchmark("news").split("forget")[:8])
found = []
for _ in range(3):
    with torch.no_grad():
        lps = answer_logprobs(lm.model, enc["prompts"], enc["answers"])
    found.append(hashlib.md5(b"".join(t.numpy().tobytes() for t in lps)).hexdigest()[:8])
print(" ".join(found))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warm", action="store_true", help="a large parallel op first")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    seen: collections.Counter[str] = collections.Counter()
    for n in range(args.processes):
        cmd = [sys.executable, "-c", CHILD, *(["--warm"] if args.warm else [])]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        seen[out.stdout.strip().splitlines()[-1]] += 1
        print(f"\r{n + 1}/{args.processes}", end="", file=sys.stderr)
    print(file=sys.stderr)
    for calls, count in seen.most_common():
        first, *later = calls.split()
        mark = "" if first in later else "   <- first call differs"
        print(f"{count:4d} processes: {calls}{mark}")


if __name__ == "__main__":
    main()
