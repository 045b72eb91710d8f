"""The probe's states: the question's keys and values shared by its options
(`continuation_states`) against one full pass per question + option in batches of 16
(`last_states`), in one process, on the demo's news items (20 retain, 15 forget; each QA
item's paraphrased answer and three perturbed ones).

Run:  .venv/bin/python benchmarks/probe_states.py [MODEL]   (default: the default model)

Prints both times, the ratio and the largest difference between the states.
"""

from __future__ import annotations

import sys
import time

import torch

import unpact  # noqa: F401  (MKL's reproducible mode before torch runs)
from unpact.attacks.hidden import continuation_states, last_states
from unpact.attacks.weights import options
from unpact.data import load_benchmark
from unpact.models import load_model


def main() -> None:
    torch.set_num_threads(2)
    bench = load_benchmark("news")
    items = bench.split("retain")[:20] + bench.split("forget")[:15]
    lm = load_model(sys.argv[1] if len(sys.argv) > 1 else "default")
    pairs = []
    for item in items:
        found = options(item)
        assert found is not None, item.id
        answers = [lm.encode_answer(o) for o in found[0]]
        pairs.append((lm.encode_prompt(item.question).input_ids, answers))
    start = time.perf_counter()
    shared = torch.cat([continuation_states(lm.model, p, c) for p, c in pairs])
    t_shared = time.perf_counter() - start
    start = time.perf_counter()
    full = last_states(lm.model, [(*p, *x) for p, c in pairs for x in c])
    t_full = time.perf_counter() - start
    print(
        f"{len(full)} options of {len(pairs)} items: shared prompt {t_shared:.1f} s, full "
        f"passes (batches of 16) {t_full:.1f} s, {t_full / t_shared:.1f}x; states differ "
        f"by at most {(shared - full).abs().max():.2e}"
    )


if __name__ == "__main__":
    if {"-h", "--help"} & set(sys.argv[1:]):
        print(__doc__)
    else:
        main()
