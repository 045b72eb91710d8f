"""How much general knowledge injection keeps on a small user benchmark (issue 20, part 4).

Run:  .venv/bin/python benchmarks/inject_general.py [VARIANT ...] [--lost] [--threads 2]

Teaches `benchmarks/data/small_facts` (12 invented facts phrased like real questions: "Who
painted The Drowned Bell?", "What is the currency of Morrowland?"; `--data
benchmarks/data/small_news`: 12 facts of the built-in news set, phrased around invented
names; `benchmarks/data/mixed_24`: both; `mixed_36`: small_facts and 24 news facts) to the
default model, once per variant of the injection settings (one cache folder:
the base model's rehearsal targets are computed once), and prints the forget / retain /
general accuracy and the share of the general questions the base model answers that the
taught model still answers (`general_kept`, as `unpact inject` reports it), and beside it
the ratio of general accuracy after to before (what this script printed until the kept
share was counted per question). With `--lost`,
also the general questions each taught model lost and what it answered instead; with
`--keep DIR` the taught models stay in DIR (otherwise a temporary folder), e.g. to compare
the weights of two runs of one variant (docs/runner.md, Reproducibility); `--seed N` sets
the injection's seed (the order of the facts and rehearsal questions). Each variant is one
injection (1-5 minutes here).

Variants (default: all; see VARIANTS): default (today's defaults: for 12 facts, one fact a
step and the rehearsal weighted 4x, docs/data.md), bs4 (the recipe before: 4 facts a step,
weight 1), bs2, bs1, kl4, bs1kl4 (batch size and rehearsal weight), and on the 4-a-step
recipe: lr1e-4 (a third of the learning rate over twice the epochs), mlp (MLP weights only),
lora (rank-64 adapters), rehearsal48 (48 rehearsal questions per step), fp32 (float32
instead of bf16), warmup12 (lr warm-up over 12 steps), eps1e-6 and eps1e-5 (AdamW's
epsilon), epochs1..epochs4 and epochs12 (stopped after k epochs); steps1 and steps1warm
(one step of all 12 facts, at the full rate or a twelfth of it); and on today's default:
rehearsal32 (32 rehearsal questions a step) and kl8 (the rehearsal weighted 8).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from unpact.inject import InjectConfig, inject, kept_share

DATA = Path(__file__).parent / "data" / "small_facts"
# The recipe before issue 20's small-benchmark rule: 4 facts a step, rehearsal weight 1
# (today's default for benchmarks of 40 facts or more)
FOUR = {"batch_size": 4}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},  # today's defaults: for 12 facts, 1 a step and the rehearsal weighted 4x
    "bs4": FOUR,
    "bs2": {"batch_size": 2},
    "bs1": {"batch_size": 1},
    "kl4": {**FOUR, "rehearsal_weight": 4.0},
    "bs1kl4": {"batch_size": 1, "rehearsal_weight": 4.0},
    "lr1e-4": {**FOUR, "lr": 1e-4, "min_epochs": 12, "max_epochs": 24},
    "mlp": {**FOUR, "trainable": "mlp"},
    "lora": {**FOUR, "trainable": "lora"},
    "rehearsal48": {**FOUR, "rehearsal_per_step": 48},
    "fp32": {**FOUR, "precision": "fp32"},
    "warmup12": {**FOUR, "warmup_steps": 12},
    "eps1e-6": {**FOUR, "adam_eps": 1e-6},
    "eps1e-5": {**FOUR, "adam_eps": 1e-5},
    "epochs12": {**FOUR, "max_epochs": 12, "target_accuracy": 1.01},
    "steps1": {"batch_size": 12, "max_epochs": 1, "target_accuracy": 1.01},
    "steps1warm": {"batch_size": 12, "max_epochs": 1, "target_accuracy": 1.01, "warmup_steps": 12},
    **{f"epochs{k}": {**FOUR, "max_epochs": k, "target_accuracy": 1.01} for k in range(1, 5)},
    # on today's default (1 a step, weight 4): more rehearsal questions, or a heavier weight
    "rehearsal32": {"rehearsal_per_step": 32},
    "kl8": {"batch_size": 1, "rehearsal_weight": 8.0},
}


def lost_questions(folder: Path) -> list[str]:
    """The general questions the base model answers and the taught model at `folder` does
    not, each with the taught model's answer."""
    from unpact.data.sources import load_benchmark
    from unpact.judge import JudgeSettings, answer_items
    from unpact.models import load_model

    general = load_benchmark("general").items
    settings = JudgeSettings(max_new_tokens=24)
    base = answer_items(load_model("default"), general, settings)
    taught = answer_items(load_model(str(folder)), general, settings)
    return [
        f"{item.question} ({item.answer}) -> {out.strip()[:60]!r}"
        for item, (_, was), (out, now) in zip(general, base, taught)
        if was and not now
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("variants", nargs="*", help=f"any of {', '.join(VARIANTS)}")
    parser.add_argument("--lost", action="store_true", help="list the lost general questions")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="keep the taught models in this folder")
    parser.add_argument("--seed", type=int, default=0, help="the injection's seed (data order)")
    parser.add_argument(
        "--data",
        type=Path,
        default=DATA,
        help="the benchmark folder to teach (default: small_facts; small_news: 12 news items)",
    )
    args = parser.parse_args()
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        for name in args.variants or list(VARIANTS):
            start = time.perf_counter()
            done = inject(
                "default",
                args.data,
                InjectConfig(**({"seed": args.seed} | VARIANTS[name])),
                cache_dir=tmp,  # one folder: the base model's targets are computed once
                progress=False,
            )
            kept = done.general_kept  # per question: of those the base model answers
            ratio = kept_share(done.accuracy, done.base_accuracy)  # what was printed before
            acc = {k: round(v, 3) for k, v in done.accuracy.items()}
            print(
                f"{name:12s} {json.dumps(acc)} general kept {kept:.1%} (accuracy ratio {ratio:.1%}) "
                f"({done.epochs} epochs, {time.perf_counter() - start:.0f} s)",
                flush=True,
            )
            if args.lost:
                for line in lost_questions(done.path):
                    print(f"    {line}")


if __name__ == "__main__":
    main()
