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

`--in-new-threads N` asks whether a process's later threads meet it too: one process scores
the same batch N times, each time first in a new Python thread (as `unpact serve` scores in
its request threads), whose first parallel operation makes OpenMP start a new team of
threads. On 2026-12-07, 150 of 150 such first passes gave the same log-probs (2 threads):
only a process's first team was seen to differ.

Run:  .venv/bin/python benchmarks/first_forward.py [--processes 60] [--threads 2]
      .venv/bin/python benchmarks/first_forward.py --in-new-threads 150
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

# the same batch, scored first in each of N new threads of one process
IN_NEW_THREADS = r"""
import collections, hashlib, sys, threading, torch
import unpact
from unpact.data import load_benchmark
from unpact.scoring import answer_logprobs
from unpact.testing import tiny_model
from unpact.unlearn.loop import encode_items
lm = tiny_model(seed=3)
enc = encode_items(lm, load_benchmark("news").split("forget")[:8])
seen = collections.Counter()
def first_pass():
    with torch.no_grad():
        lps = answer_logprobs(lm.model, enc["prompts"], enc["answers"])
    seen[hashlib.md5(b"".join(t.numpy().tobytes() for t in lps)).hexdigest()[:8]] += 1
for _ in range(int(sys.argv[1])):
    thread = threading.Thread(target=first_pass)
    thread.start()
    thread.join()
for digest, count in seen.most_common():
    print(f"{count:4d} threads: {digest}")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=60)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--in-new-threads", type=int, default=0, metavar="N")
    args = parser.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    if args.in_new_threads:
        cmd = [sys.executable, "-c", IN_NEW_THREADS, str(args.in_new_threads)]
        print(subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout)
        return
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
