"""What the indistinguishability metrics add to one model's evaluation on the demo.

Run:  .venv/bin/python benchmarks/membership.py [--threads 2] [--no-gradnorm]

On the default model and the demo's data (news: the first 20 forget, 20 retain and 20
holdout items, the first 60 general questions), times in one process:

- today's per-model evaluation: every item's greedy answer judged (forget, retain, general)
  and unPact attribution of the forget items (the runner's `evals` and `attributions`);
- what issue 21 adds per model: the membership statistics of the 40 forget and holdout
  texts (one batched pass), GradNorm (one backward pass per 8 texts), the truth-ratio
  answers (4 per forget item), the statistics of the forget and holdout documents of those
  items (raw text), VerbMem's continuations of the forget documents and the fluency of the
  forget answers under the base model;
- the named alternatives: for the statistics, one unbatched pass per text and per attack
  (LOSS, ZLib, Min-K%, Min-K%++), as a script scoring each attack separately would; for
  GradNorm, one backward pass per text (`gradient_norms`) against one per 8 texts
  (`gradient_norms_batched`, the ghost-norm identity; the norms agree to ~1e-6).

Prints seconds for each and the added share. The retrained reference is one more injection
(a model build, cached like the original), not part of a model's evaluation.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch

from unpact.data.sources import load_benchmark
from unpact.judge import JudgeSettings
from unpact.membership_scores import (
    document_stats,
    gradient_norms,
    gradient_norms_batched,
    token_stats,
)
from unpact.models import load_model
from unpact.run.config import AttributionSettings, MembershipSettings
from unpact.run.membership import base_logprobs, first_items, score_model, verbmem_rows
from unpact.run.stages import attribute, evaluate


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-gradnorm", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model("default")
    news = load_benchmark("news")
    forget, retain = news.split("forget")[:20], news.split("retain")[:20]
    holdout = news.split("holdout")[:20]
    general = load_benchmark("general").items[:60]
    judge = JudgeSettings(max_new_tokens=24)
    settings = MembershipSettings()

    t_eval, evals = timed(lambda: evaluate(lm, forget + retain + general, judge, "Judging"))
    t_attr, _ = timed(lambda: attribute(lm, forget, AttributionSettings()))
    today = t_eval + t_attr

    t_stats, _ = timed(lambda: score_model(lm, forget + holdout, not args.no_gradnorm))
    firsts = first_items(forget)
    docs = [d for d in news.documents_of("forget") if d.id in firsts]
    t_verb, _ = timed(
        lambda: verbmem_rows(lm, docs, settings.verbmem_prefix, settings.verbmem_new_tokens)
    )
    outputs = [r["output"] for r in evals[: len(forget)]]
    t_flu, _ = timed(lambda: base_logprobs(lm, [i.question for i in forget], outputs))
    named = {i.document for i in forget + holdout}
    texts_of_docs = [
        d.text for s in ("forget", "holdout") for d in news.documents_of(s) if d.id in named
    ]
    t_docs, _ = timed(lambda: document_stats(lm, texts_of_docs, max_tokens=512))
    added = t_stats + t_verb + t_flu + t_docs

    texts = forget + holdout

    def naive() -> None:
        for item in texts:
            for _ in range(4):  # LOSS, ZLib, Min-K%, Min-K%++ each scored on its own
                token_stats(lm, [item.question], [item.answer], batch_size=1)

    t_naive, _ = timed(naive)
    t_fast, _ = timed(
        lambda: token_stats(lm, [i.question for i in texts], [i.answer for i in texts])
    )

    qs, ans = [i.question for i in texts], [i.answer for i in texts]
    t_gslow, slow = timed(lambda: gradient_norms(lm, qs, ans))
    t_gfast, fast = timed(lambda: gradient_norms_batched(lm, qs, ans))
    gap = max(abs(a - b) / b for a, b in zip(fast, slow))

    print(f"threads {args.threads}; default model; demo data")
    print(
        f"today's evaluation of one model: {today:.1f} s (judging {t_eval:.1f}, attribution {t_attr:.1f})"
    )
    print(
        f"added by issue 21: {added:.1f} s = {100 * added / today:.0f}% "
        f"(statistics, GradNorm and truth-ratio answers {t_stats:.1f}, VerbMem {t_verb:.1f}, "
        f"fluency {t_flu:.1f}, {len(texts_of_docs)} documents {t_docs:.1f})"
    )
    print(
        f"membership statistics of {len(texts)} texts: batched {t_fast:.2f} s, "
        f"one pass per text and attack {t_naive:.2f} s ({t_naive / t_fast:.1f}x)"
    )
    print(
        f"GradNorm of {len(texts)} texts: one backward per 8 texts {t_gfast:.2f} s, one per "
        f"text {t_gslow:.2f} s ({t_gslow / t_gfast:.1f}x; largest relative gap {gap:.1e})"
    )


if __name__ == "__main__":
    main()
