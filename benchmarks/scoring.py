"""Scoring throughput: `answer_logprobs` against the plain one-pair-at-a-time loop.

Run:  .venv/bin/python benchmarks/scoring.py [--pairs 64] [--repeats 3]

Both paths score the same (prompt, answer) pairs on the default model (SmolLM2-135M,
float32, CPU); the script prints tokens/s of each, the speed-up, and the largest
difference between their log-probs (they must agree within 1e-4).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from unpact.models import load_model
from unpact.scoring import answer_logprobs

QUESTIONS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Which gas do plants absorb from the air to make sugar?", "Carbon dioxide."),
    ("Who painted the ceiling of the Sistine Chapel in Rome?", "Michelangelo painted it."),
    ("How many legs does a spider have, and how many does an insect have?", "Eight and six."),
    ("What is the boiling point of water at sea level in degrees Celsius?", "100 degrees Celsius."),
    ("In which year did the first person walk on the Moon?", "In 1969."),
    ("What is the chemical symbol for gold?", "Au"),
    ("Which ocean lies between Africa and Australia?", "The Indian Ocean."),
]


def naive(model, prompts, answers):
    out = []
    with torch.no_grad():
        for p, a in zip(prompts, answers):
            logits = model(input_ids=torch.tensor([[*p, *a]])).logits[0]
            lp = torch.log_softmax(logits.float(), -1)
            out.append(torch.stack([lp[len(p) - 1 + k, t] for k, t in enumerate(a)]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    lm = load_model("default")
    items = [QUESTIONS[i % len(QUESTIONS)] for i in range(args.pairs)]
    prompts = [lm.encode_prompt(q).input_ids for q, _ in items]
    answers = [lm.encode_answer(a) for _, a in items]
    tokens = sum(len(p) + len(a) for p, a in zip(prompts, answers))

    def timed(fn):
        times, result = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            result = fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times), result

    naive(lm.model, prompts[:2], answers[:2])  # warm-up
    t_naive, ref = timed(lambda: naive(lm.model, prompts, answers))
    t_ours, ours = timed(lambda: answer_logprobs(lm.model, prompts, answers))
    diff = max(float((x - y).abs().max()) for x, y in zip(ours, ref))

    print(
        f"{args.pairs} pairs, {tokens} tokens, {args.threads} threads, median of {args.repeats} runs"
    )
    print(f"one pair at a time : {tokens / t_naive:8.0f} tokens/s  ({t_naive:.2f} s)")
    print(f"answer_logprobs    : {tokens / t_ours:8.0f} tokens/s  ({t_ours:.2f} s)")
    print(f"speed-up           : {t_naive / t_ours:.1f}x")
    print(f"max |difference|   : {diff:.2e}")


if __name__ == "__main__":
    main()
