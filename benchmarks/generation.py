"""Generation on the demo's questions: unpact's `generate` against transformers' `generate`
called directly with the same batches and settings, in one process.

Run:  .venv/bin/python benchmarks/generation.py [--threads 2] [--samples 10] [--items 100]

The demo's questions (news: the first 20 forget and 20 retain items, then the first 60
general-knowledge questions), chat-templated, on the default model in float32:

- greedy 24-token answers in left-padded batches of 16 (what judging does), and the answers
  of both compared token by token;
- 10 seeded samples per question at temperature 1 (what PROBAB does), for the first 20
  questions, transformers seeded as unpact seeds each prompt, so the samples of both are
  compared token by token too;
- the named alternatives: transformers' `model.generate` on the same left-padded batches
  with the same settings (greedy) and per prompt with `num_return_sequences` (samples), and
  transformers' greedy generation one prompt at a time (a naive loop).

Prints tokens per second for each, and where the time goes: the share of the wall time
spent inside the model's forward passes (the rest is generate's own per-step work:
logits processors, stopping criteria, cache bookkeeping, and unpact's encoding/decoding).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

import unpact  # noqa: F401  (MKL's reproducible mode before torch runs)
from unpact.data.sources import load_benchmark
from unpact.models import load_model
from unpact.scoring import generate, left_padded, sample_seed, stop_ids, until_stop

# greedy decoding as unpact asks transformers for it (scoring.generated_rows)
GREEDY = {
    "max_new_tokens": 24,
    "do_sample": False,
    "temperature": None,
    "top_k": None,
    "top_p": None,
}


class ForwardTimer:
    """Seconds spent in the model's forward passes (a wrapper around `model.forward`)."""

    def __init__(self, model: Any) -> None:
        self.model, self.seconds, self.calls = model, 0.0, 0
        self._forward = model.forward

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return self._forward(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
                self.calls += 1

        model.forward = timed

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0


def hf_generate(lm: Any, prompts: list[tuple[int, ...]], batch: int, **kw: Any) -> list[list[int]]:
    """transformers' generate on left-padded batches of `batch`, as unpact calls it."""
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    stops = stop_ids(lm)
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        ids, mask = left_padded(chunk, pad)
        with torch.no_grad():
            gen = lm.model.generate(
                input_ids=ids,
                attention_mask=mask,
                pad_token_id=pad,
                eos_token_id=stops,
                repetition_penalty=1.0,
                min_p=None,
                **kw,
            )
        out += [until_stop(row, set(stops)) for row in gen[:, ids.shape[1] :].tolist()]
    return out


def timed(label: str, fn: Any, timer: ForwardTimer, tokens: Any) -> tuple[float, Any]:
    timer.reset()
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    n = tokens(result)
    share = timer.seconds / seconds if seconds else float("nan")
    print(
        f"{label:58s} {seconds:7.2f} s  {n:6d} tokens  {n / seconds:7.1f} tok/s  "
        f"forward {share:4.0%} of the time ({timer.calls} calls)"
    )
    return seconds, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--sampled-items", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    news, general = load_benchmark("news"), load_benchmark("general")
    items = news.split("forget")[:20] + news.split("retain")[:20] + general.items[:60]
    items = items[: args.items]
    lm = load_model("default")
    encoded = [lm.encode_prompt(i.question) for i in items]
    prompts = [e.input_ids for e in encoded]
    timer = ForwardTimer(lm.model)
    print(f"{len(prompts)} prompts, default model, float32, {args.threads} threads\n")
    generate(lm, encoded[:2], max_new_tokens=4)  # warm-up

    def count(gens: Any) -> int:
        return sum(len(g.token_ids) for gs in gens for g in gs)

    def count_ids(rows: Any) -> int:
        return sum(len(r) for r in rows)

    t_ours, ours = timed(
        "unpact generate, greedy 24 tokens, batches of 16",
        lambda: generate(lm, encoded, max_new_tokens=24),
        timer,
        count,
    )
    t_hf, theirs = timed(
        "transformers generate, same batches and settings",
        lambda: hf_generate(lm, prompts, 16, **GREEDY),
        timer,
        count_ids,
    )
    same = sum(list(o[0].token_ids) == t for o, t in zip(ours, theirs))
    print(f"  greedy answers equal token for token: {same} of {len(prompts)}")
    t_one, _ = timed(
        "transformers generate, one prompt at a time (naive loop)",
        lambda: hf_generate(lm, prompts, 1, **GREEDY),
        timer,
        count_ids,
    )
    sampled = prompts[: args.sampled_items]
    t_s, ours_s = timed(
        f"unpact generate, {args.samples} samples x {len(sampled)} questions",
        lambda: generate(
            lm, encoded[: len(sampled)], max_new_tokens=24, num_samples=args.samples, seed=0
        ),
        timer,
        count,
    )

    def hf_samples() -> list[list[int]]:
        rows: list[list[int]] = []
        for p in sampled:
            torch.manual_seed(sample_seed(0, p))  # the seed unpact gives this prompt
            rows += hf_generate(
                lm, [p], 1, max_new_tokens=24, do_sample=True, temperature=1.0, top_k=0,
                top_p=1.0, num_return_sequences=args.samples,
            )  # fmt: skip
        return rows

    t_hs, theirs_s = timed(
        "transformers generate, same samples per prompt", hf_samples, timer, count_ids
    )
    rows_s = [list(g.token_ids) for gs in ours_s for g in gs]
    same_s = sum(a == b for a, b in zip(rows_s, theirs_s))
    print(f"  samples equal token for token: {same_s} of {len(rows_s)}")
    print(
        f"\ngreedy: unpact {t_hf / t_ours:.2f}x transformers' speed on the same batches "
        f"({t_one / t_ours:.1f}x the one-prompt loop); samples: {t_hs / t_s:.2f}x"
    )


if __name__ == "__main__":
    main()
