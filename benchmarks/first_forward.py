"""The first batched forward pass of a fresh process, against its later ones (a race found
on 2026-12-03, worked around in `unpact.determinism.start_threads`).

Each of N fresh processes builds the tiny test model, creates accelerate's `Accelerator`
and seeds as an unlearning does, encodes 8 news questions and scores their answers
(`answer_logprobs`, one padded batch of 8) three times; the script counts the distinct
hashes of the log-probs per call. Before the workaround, on this 2-core machine with 2
threads (torch 2.13.0's CPU build), 5 of 90 such processes scored their *first* call
otherwise (log-probs up to 2e-3 apart, only in rows 4-7 of the batch: the second thread's
half; traced to the rotary embedding's cos/sin, off by ~1e-4 there) and their later calls
as every other process; none of 40 with one thread did. One small parallel operation
before the model is built (what `import unpact` now runs) left none of 120 processes
differing (nor 80 others after a larger one). The cause, a race below unpact in the first parallel region of a process, was
not found: the separate operations (multiply, cat, cos) did not reproduce it, nor did the
forward pass under a TorchDispatchMode. Run alone, the unit test
`test_resume_after_a_crash_ends_with_the_same_weights` failed about one run in five for it
(its first unlearning was the process's first forward pass); 15 of 15 passed after.

Run:  .venv/bin/python benchmarks/first_forward.py [--processes 60] [--threads 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys

CHILD = r"""
import hashlib, sys, torch
import unpact  # starts the thread pool (unpact.determinism.start_threads)
from accelerate import Accelerator
from accelerate.utils import set_seed
from unpact.data import load_benchmark
from unpact.scoring import answer_logprobs
from unpact.testing import tiny_model
from unpact.unlearn.loop import encode_items
lm = tiny_model(seed=3)
Accelerator(cpu=True, device_placement=False)
set_seed(0)
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
    parser.add_argument("--processes", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    seen: collections.Counter[str] = collections.Counter()
    for n in range(args.processes):
        cmd = [sys.executable, "-c", CHILD]
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
