"""Peak memory of unPact attribution on a long prompt (default 512 tokens), default model.

Run:  .venv/bin/python benchmarks/attribution_memory.py [--tokens 512] [--budget 4096]

Prints the prompt length, the time taken and the process's peak resident memory (which
includes the float32 model itself, ~0.5 GB). Batches are bounded by the token budget, so the
peak does not grow with the n variants of a long prompt.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from unpact.attribution import attribute
from unpact.models import load_model

TEXT = (
    "The archive of the fictional harbour town of Vostrand records that the glassmaker Mira "
    "Quintrell opened her workshop beside the old lighthouse, that the mayor Orla Bettancourt "
    "granted it a charter, and that the lantern festival of Tarnwick began the same autumn. "
)


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--budget", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model("default")
    ids = lm.tokenizer(TEXT * 40, add_special_tokens=False)["input_ids"][: args.tokens]
    prompt = lm.tokenizer.decode(ids) + " Who opened the workshop?"
    after_load = peak_gb()
    start = time.perf_counter()
    rec = attribute(lm, prompt, "Mira Quintrell", token_budget=args.budget)
    seconds = time.perf_counter() - start
    print(
        f"prompt: {len(rec.units)} units, {len(rec.input_ids)} input tokens; answer {len(rec.answer_ids)} tokens"
    )
    print(
        f"time: {seconds:.1f} s; peak RSS after loading the model {after_load:.2f} GB, "
        f"during attribution {peak_gb():.2f} GB (target: fits in 4 GB)"
    )
    print(f"KeyTokens: {rec.key_token_texts}")


if __name__ == "__main__":
    main()
